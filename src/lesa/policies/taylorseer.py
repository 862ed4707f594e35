"""TaylorSeer on the tapped feature: finite differences between full steps, Taylor expansion on cached steps."""

from __future__ import annotations

import math

import torch

from .base import Policy


class TaylorSeerPolicy(Policy):
    """F_hat(k) = d0 + damping * sum_{i>=1} d_i k^i / i!, k = steps since the last full step.

    d0 is the last computed feature and d_{i+1} = (d_i(new) - d_i(old)) / (distance between the two full steps).
    damping = 1 is the published method; a fitted damping < 1 is our calibrated variant.
    """

    name = "taylorseer"

    def __init__(self, order: int = 1, damping: float = 1.0) -> None:
        if order < 0:
            raise ValueError(f"TaylorSeer order must be >= 0, got {order}")
        self.order = order
        self.damping = damping
        self.diffs: list[torch.Tensor] = []
        self.last_full: int | None = None

    def begin(self, sigmas: torch.Tensor | None) -> None:
        self.diffs, self.last_full = [], None

    def observe(self, feature: torch.Tensor, step: int, sigma: float) -> None:
        new = [feature]
        if self.last_full is not None:
            distance = step - self.last_full
            for i in range(min(self.order, len(self.diffs))):
                new.append((new[i] - self.diffs[i]) / distance)
        self.diffs, self.last_full = new, step

    def forecast(self, step: int, sigma: float) -> torch.Tensor:
        if self.last_full is None:
            raise RuntimeError(f"TaylorSeer: no feature computed before cached step {step}")
        k = step - self.last_full
        out = self.diffs[0]
        if len(self.diffs) > 1:
            out = out.clone()
            for i, d in enumerate(self.diffs[1:], start=1):
                out.add_(d, alpha=self.damping * k**i / math.factorial(i))
        return out

    def forecast_flops(self, numel: int) -> int:
        return 2 * self.order * numel
