"""A per-step linear forecaster: each cached step's feature is a fitted weighted sum of the last full-step features.

The weights come from least squares on recorded trajectories (`lesa.calibrate.fit_linear`); they depend only on the
step, like L2P's per-timestep linear weights, so a forecast costs `history` multiply-adds per element.
"""

from __future__ import annotations

import torch

from .base import Policy


class LinearForecastPolicy(Policy):
    """F_hat(s) = sum_j w[s][j] * F(f_j), f_0 the last full step, f_1 the one before, ..."""

    name = "linear"

    def __init__(self, weights: dict[int, list[float]]) -> None:
        if not weights:
            raise ValueError("LinearForecastPolicy needs fitted weights for at least one cached step")
        self.weights = weights
        self.history = max(len(w) for w in weights.values())
        self.features: list[torch.Tensor] = []  # newest first

    def begin(self, sigmas: torch.Tensor | None) -> None:
        self.features = []

    def observe(self, feature: torch.Tensor, step: int, sigma: float) -> None:
        self.features.insert(0, feature)
        del self.features[self.history :]

    def forecast(self, step: int, sigma: float) -> torch.Tensor:
        weights = self.weights.get(step)
        if weights is None:
            raise RuntimeError(
                f"linear forecaster: no fitted weights for cached step {step} (fitted: {sorted(self.weights)})"
            )
        if len(self.features) < len(weights):
            raise RuntimeError(
                f"linear forecaster: step {step} needs {len(weights)} full-step features, {len(self.features)} seen"
            )
        out = self.features[0] * weights[0]
        for w, feature in zip(weights[1:], self.features[1:], strict=False):
            out.add_(feature, alpha=w)
        return out

    def forecast_flops(self, numel: int) -> int:
        return 2 * self.history * numel
