"""The schedule-free predictor (format 2): forecast coefficients and the full-step correction computed from continuous
quantities of the sigma schedule, never from a step index, so one predictor serves any step count, any shift of the
schedule (FLUX's resolution-dependent `mu`) and any placement of the full steps.

A cached step at sigma s forecasts the tapped feature from the last K full-step features h1 (newest), h2, ..., at
sigmas s1 < s2 < ... (sigmas fall as sampling goes on):

    forecast = h1 + u * sum_j a_j(x) * (h_j - h_{j+1}),   u = (s1 - s) / (s2 - s1),

u the extrapolation distance in units of the last gap between full steps (TaylorSeer O1 in sigma is a = (1, 0, ..)).
The multipliers a come from a small KAN of x = (sigma, log u, log of the ratio of the last two gaps, log of the last
gap), one per noise stage (hard routing by sigma, as format 1) and cache context. The learned full-step correction's
strength is a bilinear function of the sigma of the full step it corrects and of the length in sigma of the cache
cycle that step closes (a long cycle at 20 steps and a short one at 50 steps want different strengths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..schedule import StepSchedule, full_step_count, sigma_budget
from .artefact import PredictorArtefact
from .experts import pad_window, stage_of
from .kan import KAN

FORMAT_VERSION = 2
INPUTS = 4  # sigma, log u, log gap ratio, log gap
_MEMO_LIMIT = 100_000  # memoised coefficient vectors (a few MB)


@dataclass
class ScheduleFreeConfig:
    """What a schedule-free predictor computes and how it places full steps; saved as config.json.

    Example:
        >>> config = ScheduleFreeConfig(model_class="FluxModel", tap="t", feature_dim=6, placement_power=1.3)
        >>> config.full_steps([1 - i / 28 for i in range(29)], speedup=4)
        [0, 1, 2, 3, 8, 15, 23]
    """

    model_class: str
    tap: str
    feature_dim: int
    dtype: str = "float32"
    thresholds: list[float] = field(default_factory=lambda: [0.9, 0.5])
    window: int = 3  # K: full-step features a forecast reads
    contexts: list[str] = field(default_factory=lambda: ["cond"])
    hidden: int = 16  # width of the KAN's one hidden layer
    grid_size: int = 5
    spline_order: int = 3
    gain_bias: float = 0.0  # a_1 at the start (the damping of TaylorSeer O1; 0: reuse)
    correction: bool = True
    correction_knots: int = 11  # the correction strength's knots, evenly spaced in sigma over [0, 1] ...
    correction_gaps: int = 5  # ... times knots in the corrected cycle's length in sigma, log-spaced over [0.01, 1]
    # placement of a budget's full steps (`schedule.sigma_budget`): warm-up steps and the power of the sigma rule
    warmup: int = 3
    placement_power: float = 1.0
    default_speedup: float = 5.0  # the budget when a request names none
    trained_steps: list[int] = field(default_factory=list)  # step counts of the training recordings (informational)
    base_model: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if any(a <= b for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ValueError(f"thresholds must decrease strictly, got {self.thresholds}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.correction_knots < 2 or self.correction_gaps < 2:
            raise ValueError(
                f"correction_knots and correction_gaps must be at least 2, got {self.correction_knots}, "
                f"{self.correction_gaps}"
            )
        if not self.placement_power > 0:
            raise ValueError(f"placement_power must be positive, got {self.placement_power}")
        if not self.default_speedup >= 1:
            raise ValueError(f"default_speedup must be at least 1, got {self.default_speedup}")

    def placement(self, sigmas: Sequence[float], budget: int) -> StepSchedule:
        """The schedule of `budget` full steps on `sigmas` (the predictor's own placement)."""
        return sigma_budget(sigmas, budget, self.warmup, self.placement_power)

    def full_steps(
        self, sigmas: Sequence[float], speedup: float | None = None, full_steps: int | None = None
    ) -> list[int]:
        """The full steps of a run on `sigmas` at a speed-up or a full-step count (default: `default_speedup`)."""
        if speedup is None and full_steps is None:
            speedup = self.default_speedup
        budget = full_step_count(len(sigmas) - 1, speedup, full_steps)
        return self.placement(sigmas, budget).full_steps(len(sigmas) - 1)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ScheduleFreeConfig:
        """The config a saved config.json (`source`) describes; the fields that change what it computes are
        required."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a JSON object expected, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {version!r}, expected {FORMAT_VERSION} for this class")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls)} - {"base_model", "trained_steps", "default_speedup"}
        missing = sorted(n for n in required if n not in data)
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e


class SigmaExpert(nn.Module):
    """One stage of one context: the multipliers a(x) of the history's differences, a KAN plus a learned offset."""

    def __init__(self, config: ScheduleFreeConfig) -> None:
        super().__init__()
        terms = max(config.window - 1, 1)
        self.net = KAN([INPUTS, config.hidden, terms], grid_size=config.grid_size, spline_order=config.spline_order)
        self.bias = nn.Parameter(torch.zeros(terms))
        with torch.no_grad():  # the network's output starts at exactly 0: a = bias = (gain_bias, 0, ...)
            last = self.net[-1]
            last.base_weight.zero_()
            last.spline_weight.zero_()
            self.bias[0] = config.gain_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(0))[0] + self.bias


def _knot(t: float, n: int) -> tuple[int, float]:
    """The knot interval (index, weight of the next knot) of position t on knots 0..n-1."""
    i = min(int(t), n - 2)
    return i, t - i


def forecast_inputs(sigma: float, past: Sequence[float]) -> tuple[float, list[float]] | None:
    """(u, x) of a forecast at `sigma` from full steps at sigmas `past` (oldest first), or None when there is
    nothing to extrapolate (fewer than two, or a degenerate gap): the forecast is then the last feature."""
    if len(past) < 2:
        return None
    s1, s2 = float(past[-1]), float(past[-2])
    gap = s2 - s1
    if not gap > 1e-8:
        return None
    u = max((s1 - float(sigma)) / gap, 1e-4)
    ratio = (float(past[-3]) - s2) / gap if len(past) >= 3 and float(past[-3]) > s2 else 1.0
    return u, [4 * float(sigma) - 2, math.log(u), math.log(ratio), math.log(gap) + 3]


class ScheduleFreePredictor(PredictorArtefact):
    """Forecasts a cached step's tapped feature from the last K full-step features and the sigmas they were computed
    at (see the module docstring); any schedule, any placement.

    Example (an untrained predictor: TaylorSeer O1 in sigma, damped by 0.5, on any schedule):
        >>> import torch
        >>> config = ScheduleFreeConfig(model_class="FluxTransformer2DModel", tap="t", feature_dim=6, gain_bias=0.5)
        >>> predictor = ScheduleFreePredictor(config)
        >>> history = [torch.full((2, 6), v) for v in (0.0, 1.0, 2.0)]
        >>> predictor.forecast(history, "cond", sigma=0.45, past=[0.8, 0.7, 0.6])[0, 0].item()  # 2 + 0.5 * 1.5 * 1
        2.75
    """

    config_class = ScheduleFreeConfig

    def __init__(self, config: ScheduleFreeConfig) -> None:
        super().__init__()
        self.config = config
        stages = len(config.thresholds) + 1
        self.experts = nn.ModuleDict(
            {ctx: nn.ModuleList(SigmaExpert(config) for _ in range(stages)) for ctx in config.contexts}
        )
        if config.correction:
            self.correction = nn.Parameter(torch.zeros(config.correction_knots, config.correction_gaps))

    @classmethod
    def refuse_other_format(cls, config_file: Path, found: type) -> str:
        return (
            f"{config_file} holds a format-1 {found.__name__}, trained for one sigma schedule; it cannot run as a "
            "schedule-free predictor. Load it with lesa.load_predictor (it serves its own schedule), or train a "
            "schedule-free one: lesa train --recipe schedule-free --data REC [--data REC ...]"
        )

    def resolve_context(self, context: str) -> str:
        """The context whose experts serve `context` (an unknown one is served by the first trained)."""
        return context if context in self.experts else self.config.contexts[0]

    def coefficients(self, context: str, sigma: float, past: Sequence[float]) -> torch.Tensor:
        """c over the history (oldest first, as long as `past`) with forecast = h[-1] + sum_k c[k] * h[k]; with
        autograd to the weights."""
        past = list(past)[-self.config.window :]
        first = next(self.parameters())
        found = forecast_inputs(sigma, past)
        if found is None:
            return first.new_zeros(len(past))
        u, x = found
        stage = stage_of(float(sigma), tuple(self.config.thresholds))
        a = self.experts[self.resolve_context(context)][stage](first.new_tensor(x))
        n = len(past)
        parts = [first.new_zeros(()) for _ in range(n)]
        for j in range(min(n - 1, a.numel())):  # term j: u a_j (h_{n-1-j} - h_{n-2-j}), newest first
            parts[n - 1 - j] = parts[n - 1 - j] + u * a[j]
            parts[n - 2 - j] = parts[n - 2 - j] - u * a[j]
        return torch.stack(parts)

    @torch.no_grad()
    def coefficient_list(self, context: str, sigma: float, past: Sequence[float]) -> list[float]:
        """`coefficients` as Python floats, memoised by (context, sigmas) until a weight changes in place (an
        optimiser step or `load_state_dict` bumps the tensors' version counters): the network runs once per
        schedule and placement, not per image."""
        weights = tuple((p.data_ptr(), p._version) for p in self.parameters())
        key = (self.resolve_context(context), float(sigma), tuple(float(s) for s in past[-self.config.window :]))
        cache = self.__dict__.setdefault("_memo", {})  # not module state
        if cache.get("weights") != weights or len(cache) > _MEMO_LIMIT:  # bounded: a server meets many schedules
            cache.clear()
            cache["weights"] = weights
        if key not in cache:
            cache[key] = self.coefficients(context, sigma, past).tolist()
        return cache[key]

    def forecast(self, history: list[torch.Tensor], context: str, sigma: float, past: Sequence[float]) -> torch.Tensor:
        """Differentiable forecast from full-step features `history` computed at sigmas `past` (both oldest first)."""
        history = history[-self.config.window :]
        c = self.coefficients(context, sigma, past[-len(history) :])
        out = history[-1]
        for k, h in enumerate(history):
            out = out + c[k] * h
        return out

    def forward(self, history: list[torch.Tensor], context: str, sigma: float, past: Sequence[float]) -> torch.Tensor:
        """Same as `forecast` (so DistributedDataParallel can wrap the predictor)."""
        return self.forecast(history, context, sigma, past)

    @staticmethod
    def apply_coefficients(history: list[torch.Tensor], coeffs: list[float]) -> torch.Tensor:
        """h[-1] + sum_k coeffs[k] * h[k] over the last len(coeffs) entries, in the history's dtype (no autograd)."""
        window = pad_window(history, len(coeffs)) if coeffs else []
        out = history[-1].clone()
        for c, h in zip(coeffs, window, strict=True):
            if c:
                out.add_(h, alpha=c)
        return out

    def correction_strength(self, sigma: float, gap: float) -> torch.Tensor:
        """The learned correction's strength at a full step of sigma `sigma` closing a cache cycle `gap` long in
        sigma (bilinear between knots: sigma on [0, 1], log10 of the gap on [-2, 0])."""
        rows, cols = self.correction.shape
        i, wi = _knot(min(max(float(sigma), 0.0), 1.0) * (rows - 1), rows)
        j, wj = _knot((min(max(math.log10(max(float(gap), 1e-8)), -2.0), 0.0) + 2) / 2 * (cols - 1), cols)
        c = self.correction
        return (1 - wi) * ((1 - wj) * c[i, j] + wj * c[i, j + 1]) + wi * ((1 - wj) * c[i + 1, j] + wj * c[i + 1, j + 1])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
