"""The LESA predictors: format 1 (B-spline KAN gain over one sigma schedule, stage experts) and the schedule-free
format 2; the saved artefact both share."""

from .artefact import PredictorArtefact, check_predictor_dir, load_predictor
from .experts import StageExpert, pad_window, stage_of
from .kan import KAN, KANLinear, bspline_bases, uniform_knots
from .model import LESAPredictor, PredictorConfig, forecast_flops
from .schedule_free import ScheduleFreeConfig, ScheduleFreePredictor

__all__ = [
    "KAN",
    "KANLinear",
    "LESAPredictor",
    "PredictorArtefact",
    "PredictorConfig",
    "ScheduleFreeConfig",
    "ScheduleFreePredictor",
    "StageExpert",
    "bspline_bases",
    "check_predictor_dir",
    "forecast_flops",
    "load_predictor",
    "pad_window",
    "stage_of",
    "uniform_knots",
]
