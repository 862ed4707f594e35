"""Stage experts: a learned K-tap filter over the feature history times a KAN-predicted temporal gain."""

from __future__ import annotations

import torch
from torch import nn

from .kan import KAN


def stage_of(sigma: float, thresholds: tuple[float, ...]) -> int:
    """Hard routing on the flow-matching time: stage 0 while sigma > thresholds[0], then 1, 2, ...

    With thresholds (0.9, 0.5): stage 0 for sigma > 0.9, stage 1 for 0.5 < sigma <= 0.9, stage 2 for sigma <= 0.5.
    """
    for stage, threshold in enumerate(thresholds):
        if sigma > threshold:
            return stage
    return len(thresholds)


def pad_window(history: list[torch.Tensor], window: int) -> list[torch.Tensor]:
    """The last `window` entries of `history`, left-padded by repeating the oldest when it is shorter."""
    if not history:
        raise ValueError("the feature history is empty: at least one full step must run before a forecast")
    recent = history[-window:]
    return [recent[0]] * (window - len(recent)) + recent


class StageExpert(nn.Module):
    """One noise stage: z = Linear(K -> 1) over each element's K history values; alpha = KAN(sigma_now - sigmas)."""

    def __init__(
        self,
        window: int,
        schedule_length: int,
        kan_hidden: tuple[int, ...],
        gain: str = "kan",
        gain_bias: float = 0.0,
        **kan_kwargs,
    ) -> None:
        super().__init__()
        self.window = window
        self.gain_bias = gain_bias
        self.mix = nn.Linear(window, 1)
        if gain == "kan":
            self.gain = KAN([schedule_length, *kan_hidden, 1], **kan_kwargs)
        else:  # the ablation's MLP of the same widths, last layer zeroed so the gain also starts at 0
            widths = [schedule_length, *kan_hidden, 1]
            layers: list[nn.Module] = []
            for a, b in zip(widths, widths[1:], strict=False):
                layers += [nn.Linear(a, b), nn.SiLU()]
            self.gain = nn.Sequential(*layers[:-1])
            nn.init.zeros_(self.gain[-1].weight)
            nn.init.zeros_(self.gain[-1].bias)
        with torch.no_grad():
            # Start the filter as a first difference (z = h[-1] - h[-2]): with the gain near zero the predictor
            # begins between reuse and linear extrapolation instead of at a random filter.
            self.mix.weight.zero_()
            self.mix.bias.zero_()
            self.mix.weight[0, -1] = 1.0
            if window > 1:
                self.mix.weight[0, -2] = -1.0

    @torch.no_grad()
    def zero_gain(self) -> None:
        """Make the gain network output exactly 0 (its last layer zeroed): alpha starts at `gain_bias`."""
        last = self.gain[-1]
        # KAN: the base path and the spline coefficients (not their scaler, or the spline would get no gradient)
        for name in ("weight", "bias", "base_weight", "spline_weight"):
            if getattr(last, name, None) is not None:
                getattr(last, name).zero_()

    def alpha(self, sigma_now: float, sigmas: torch.Tensor) -> torch.Tensor:
        """The scalar temporal gain for the current step (a 0-d tensor)."""
        x = (sigma_now - sigmas.to(self.mix.weight)).unsqueeze(0)
        return self.gain(x).reshape(()) + self.gain_bias

    def coefficients(self, sigma_now: float, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, c0) such that forecast = h[-1] + c0 + sum_k c[k] * h[k]: the gain folded into the filter."""
        a = self.alpha(sigma_now, sigmas)
        return a * self.mix.weight[0], a * self.mix.bias[0]
