"""The LESA predictor: B-spline KAN, stage experts and the saved artefact."""

from .experts import StageExpert, pad_window, stage_of
from .kan import KAN, KANLinear, bspline_bases, uniform_knots
from .model import LESAPredictor, PredictorConfig, check_predictor_dir, forecast_flops

__all__ = [
    "KAN",
    "KANLinear",
    "LESAPredictor",
    "PredictorConfig",
    "StageExpert",
    "bspline_bases",
    "check_predictor_dir",
    "forecast_flops",
    "pad_window",
    "stage_of",
    "uniform_knots",
]
