"""The interface every caching policy implements, once per cache context (cond / uncond)."""

from __future__ import annotations

import torch


class Policy:
    """Per-context forecasting state. The runtime calls `begin` at the start of each generation, `observe` with the
    real tapped feature on full steps and `forecast` on cached steps."""

    name = "none"

    def begin(self, sigmas: torch.Tensor | None) -> None:
        """A new generation starts; `sigmas` is its full schedule when known."""

    def observe(self, feature: torch.Tensor, step: int, sigma: float) -> None:
        """A full step computed `feature`."""

    def forecast(self, step: int, sigma: float) -> torch.Tensor:
        """The tapped feature of cached step `step`."""
        raise RuntimeError(
            f"policy {self.name!r} cannot forecast (step {step}): its schedule must keep every step full"
        )

    def forecast_flops(self, numel: int) -> int:
        """Floating-point operations of one forecast of a feature with `numel` elements."""
        return 0

    def context_warning(self, context: str) -> str | None:
        """Why serving cache context `context` may be off (e.g. a learned policy not trained on it), or None; the
        runtime warns once per context."""
        return None
