"""The learned LESA forecast as a policy: history of the last features, coefficients per step (format 1) or from the
sigmas of the history and the step (schedule-free, format 2), stage experts."""

from __future__ import annotations

import torch

from ..predictor import LESAPredictor, ScheduleFreePredictor, forecast_flops
from .base import Policy


def check_width(width: int, feature: torch.Tensor) -> None:
    """Refuse a tapped feature of another width than the predictor was trained on."""
    if feature.shape[-1] != width:
        raise ValueError(
            f"predictor was trained on features of width {width}, but this model's tapped feature has width "
            f"{feature.shape[-1]} (shape {tuple(feature.shape)})"
        )


class LearnedPolicy(Policy):
    """What both learned policies share: the predictor, the context it serves, whether forecasts carry gradients,
    and the feature history."""

    name = "lesa"

    def __init__(self, predictor, context: str, differentiable: bool = False, history_grad: bool = False) -> None:
        self.predictor = predictor
        self.context = context
        self.differentiable = differentiable
        self.history_grad = differentiable and history_grad
        self.history: list[torch.Tensor] = []

    def context_warning(self, context: str) -> str | None:
        """A context the predictor has no experts of is served by another's (`resolve_context`)."""
        if context == self.context:
            return None
        return (
            f"the LESA predictor was trained on cache context(s) {self.predictor.config.contexts}, not {context!r}: "
            f"it serves {context!r} with what it learned for {self.context!r} (e.g. true CFG's uncond pass with a "
            "predictor recorded without true CFG); record and train with this context for forecasts of its own"
        )


class LESAPolicy(LearnedPolicy):
    """History of the last tapped features of one cache context (computed or forecast; with the predictor's memory
    "full" computed only): as many as the largest stage window K needs, in the dtype the runtime hands over.

    Inference computes each step's coefficients once per schedule and forecasts in the feature dtype. With
    `differentiable=True` (closed-loop training) a forecast carries gradients to the predictor's weights; the history
    keeps it detached (one-step gradients), unless `history_grad` (back-propagation through time).
    """

    def __init__(
        self, predictor: LESAPredictor, context: str, differentiable: bool = False, history_grad: bool = False
    ) -> None:
        super().__init__(predictor, context, differentiable, history_grad)
        self.sigmas: torch.Tensor | None = None
        self.table: list[tuple[list[float], float]] | None = None
        self.keep = max(predictor.config.windows)
        self.remember_forecasts = predictor.config.memory == "steps"

    def begin(self, sigmas: torch.Tensor | None) -> None:
        self.history = []
        schedule = sigmas if sigmas is not None else self.predictor.config.sigmas
        self.sigmas = self.predictor.check_schedule(schedule)
        if not self.differentiable:
            self.table = self.predictor.coefficient_table(self.context, self.sigmas)

    def _push(self, feature: torch.Tensor) -> None:
        self.history.append(feature)
        del self.history[: -self.keep]

    def observe(self, feature: torch.Tensor, step: int, sigma: float) -> None:
        check_width(self.predictor.config.feature_dim, feature)
        self._push(feature if self.history_grad else feature.detach())

    def forecast(self, step: int, sigma: float) -> torch.Tensor:
        if step >= self.predictor.config.num_steps:
            raise ValueError(
                f"step {step} is beyond the {self.predictor.config.num_steps} steps this predictor was trained for"
            )
        if not self.differentiable:
            coeffs, offset = self.table[step]
            out = LESAPredictor.apply_coefficients(self.history, coeffs, offset)
            if self.remember_forecasts:
                self._push(out)
            return out
        # under autograd where the runtime enables it (cached steps of closed-loop training, truncation aside)
        out = self.predictor.forecast([h.float() for h in self.history], self.context, step, self.sigmas)
        out = out.to(self.history[-1].dtype)
        if self.remember_forecasts:
            self._push(out if self.history_grad else out.detach())
        return out

    def forecast_flops(self, numel: int) -> int:
        return forecast_flops(max(self.predictor.config.windows), numel)


class ScheduleFreePolicy(LearnedPolicy):
    """The schedule-free predictor (format 2) as a policy: the last K full-step features of one cache context and the
    sigmas they were computed at; each cached step's coefficients come from those sigmas and its own, whatever the
    step count, shift or placement. With `differentiable=True` (closed-loop training) forecasts carry gradients to
    the predictor's weights, and with `history_grad` the kept features keep theirs."""

    def __init__(
        self, predictor: ScheduleFreePredictor, context: str, differentiable: bool = False, history_grad: bool = False
    ) -> None:
        super().__init__(predictor, context, differentiable, history_grad)
        self.past: list[float] = []  # the sigma of each kept feature

    def begin(self, sigmas: torch.Tensor | None) -> None:
        self.history, self.past = [], []

    def observe(self, feature: torch.Tensor, step: int, sigma: float) -> None:
        check_width(self.predictor.config.feature_dim, feature)
        keep = self.predictor.config.window
        self.history = [*self.history, feature if self.history_grad else feature.detach()][-keep:]
        self.past = [*self.past, float(sigma)][-keep:]

    def forecast(self, step: int, sigma: float) -> torch.Tensor:
        if not self.history:
            raise ValueError("the feature history is empty: at least one full step must run before a forecast")
        if not self.differentiable:
            coeffs = self.predictor.coefficient_list(self.context, sigma, self.past)
            return ScheduleFreePredictor.apply_coefficients(self.history, coeffs)
        out = self.predictor.forecast([h.float() for h in self.history], self.context, sigma, self.past)
        return out.to(self.history[-1].dtype)

    def forecast_flops(self, numel: int) -> int:
        return forecast_flops(self.predictor.config.window, numel)
