"""benchmarks/gain_ceiling.py: the forecast increments it reads and the factor it scales them by."""

import importlib.util
from pathlib import Path

import torch
from conftest import SIGMAS, tiny_predictor

from lesa.predictor import LESAPredictor

spec = importlib.util.spec_from_file_location(
    "gain_ceiling", Path(__file__).parents[1] / "benchmarks" / "gain_ceiling.py"
)
gain_ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gain_ceiling)


def test_increments_and_scaled_forecasts():
    predictor = tiny_predictor(memory="full", interval=4, warmup=2, windows=[3, 3, 3], history=3)
    with torch.no_grad():
        for p in predictor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    feats = torch.randn(20, 5, 6)
    seen = list(gain_ceiling.increments(predictor, feats, "cond", SIGMAS))
    # every cached step once three full steps ran (full: 0, 1, 2, 6, 10, 14, 18)
    assert [s for s, *_ in seen] == [3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16, 17, 19]
    step, d, e, history = seen[0]
    assert d.abs().max() > 1e-3  # a nonzero increment, or the scaling below would prove nothing
    coeffs, offset = predictor.coefficient_table("cond", SIGMAS)[step]
    forecast = LESAPredictor.apply_coefficients([h.clone() for h in history], coeffs, offset)
    assert torch.allclose(history[-1] + d, forecast) and torch.allclose(history[-1] + e, feats[step])
    # the folded table scaled by f forecasts h[-1] + f * D; f = 0 is reuse
    gain_ceiling.scale_increments(predictor, lambda _c, s: 0.5 if s == step else 0.0)
    coeffs, offset = predictor.coefficient_table("cond", SIGMAS)[step]
    scaled = LESAPredictor.apply_coefficients([h.clone() for h in history], coeffs, offset)
    assert torch.allclose(scaled, history[-1] + 0.5 * d, atol=1e-6)
    coeffs, offset = predictor.coefficient_table("cond", SIGMAS)[step + 1]
    assert torch.allclose(LESAPredictor.apply_coefficients([h.clone() for h in history], coeffs, offset), history[-1])
