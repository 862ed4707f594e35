"""TeaCache (arXiv 2411.19108): skip the trunk while the accumulated, rescaled change of the first block's
timestep-modulated input stays below a threshold; a skipped step re-adds the last trunk residual.

The runtime asks `decide` at the first trunk block of every call (after step 0) and hands over the trunk input, so
the forecast is `trunk input + (last trunk output - its trunk input)`.
"""

from __future__ import annotations

import torch

from .base import Policy

# Published TeaCache polynomial for FLUX.1 (highest power first): relative input change -> relative output change.
FLUX_COEFFICIENTS: tuple[float, ...] = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new.float() - old.float()).abs().mean() / old.float().abs().mean().clamp_min(1e-12))


class TeaCachePolicy(Policy):
    """One cache context's TeaCache state. With `calibrate=True` every step is full and the pairs (relative input
    change, relative trunk-output change) are kept in `pairs` for fitting a model's own polynomial."""

    name = "teacache"

    def __init__(self, threshold: float, coefficients: tuple[float, ...], calibrate: bool = False) -> None:
        self.threshold = threshold
        self.coefficients = tuple(coefficients)
        self.calibrate = calibrate
        self.pairs: list[tuple[float, float]] = []
        self.begin(None)

    def begin(self, sigmas: torch.Tensor | None) -> None:
        self.last_step = len(sigmas) - 2 if sigmas is not None else None
        self.previous_modulated: torch.Tensor | None = None
        self.accumulated = 0.0
        self.trunk_in: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None
        self.last_change: float | None = None

    def _rescale(self, change: float) -> float:
        value = 0.0
        for c in self.coefficients:
            value = value * change + c
        return max(value, 0.0)  # a fitted polynomial can dip below zero; an estimated change cannot

    # outside torch.compile's graphs: a data-dependent Python decision (one graph break) whose step index and
    # accumulated change would otherwise be guarded on, and recompiled, at every step
    @torch.compiler.disable
    def decide(self, modulated: torch.Tensor, trunk_in: torch.Tensor, step: int) -> bool:
        """Whether step `step` runs the trunk, given the first block's modulated input and the trunk input."""
        self.trunk_in = trunk_in
        previous, self.previous_modulated = self.previous_modulated, modulated.detach()
        if previous is None or step == 0 or step == self.last_step or self.residual is None:
            self.accumulated, self.last_change = 0.0, None
            return True
        self.last_change = relative_l1(modulated, previous)
        if self.calibrate:
            return True
        self.accumulated += self._rescale(self.last_change)
        if self.accumulated < self.threshold:
            return False
        self.accumulated = 0.0
        return True

    def observe(self, feature: torch.Tensor, step: int, sigma: float) -> None:
        if self.calibrate and self.last_change is not None and self.last_output is not None:
            self.pairs.append((self.last_change, relative_l1(feature, self.last_output)))
        self.last_output = feature.detach()
        if self.trunk_in is not None and self.trunk_in.shape == feature.shape:
            self.residual = feature - self.trunk_in

    def forecast(self, step: int, sigma: float) -> torch.Tensor:
        if self.residual is None or self.trunk_in is None:
            raise RuntimeError(f"TeaCache: no trunk residual computed before cached step {step}")
        return self.trunk_in + self.residual

    def forecast_flops(self, numel: int) -> int:
        return numel
