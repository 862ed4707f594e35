"""FORA at whole-trunk granularity: a cached step reuses the last computed feature."""

from __future__ import annotations

import torch

from .base import Policy


class ReusePolicy(Policy):
    name = "fora"

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def begin(self, sigmas: torch.Tensor | None) -> None:
        self.last = None

    def observe(self, feature: torch.Tensor, step: int, sigma: float) -> None:
        self.last = feature

    def forecast(self, step: int, sigma: float) -> torch.Tensor:
        if self.last is None:
            raise RuntimeError(f"FORA: no feature computed before cached step {step}")
        return self.last
