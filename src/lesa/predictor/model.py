"""The LESA predictor: per cache context, one expert per noise stage; saved as config.json + model.safetensors."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ..schedule import StepSchedule
from .artefact import PredictorArtefact
from .experts import StageExpert, pad_window, stage_of

FORMAT_VERSION = 1


@dataclass
class PredictorConfig:
    """Everything a predictor was trained for; saved as config.json beside the weights.

    Example:
        >>> config = PredictorConfig(
        ...     model_class="FluxTransformer2DModel", tap="t", num_steps=20, sigmas=[1 - i / 20 for i in range(21)],
        ...     feature_dim=6, kan_hidden=[8, 8],
        ... )
        >>> config.interval, config.warmup, config.schedule().full_steps(config.num_steps)
        (7, 3, [0, 1, 2, 3, 10, 17])
    """

    model_class: str
    tap: str
    num_steps: int
    sigmas: list[float]
    feature_dim: int
    dtype: str = "bfloat16"
    interval: int = 7
    warmup: int = 3
    forced_full_steps: list[int] = field(default_factory=list)
    # a searched schedule (`lesa train --set schedule=search`)
    explicit_full_steps: list[int] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=lambda: [0.9, 0.5])
    windows: list[int] = field(default_factory=lambda: [4, 8, 8])
    history: int = 8
    contexts: list[str] = field(default_factory=lambda: ["cond"])
    kan_hidden: list[int] = field(default_factory=lambda: [256, 256])
    gain: str = "kan"  # temporal gain network: "kan" (paper) or "mlp" (the paper's ablation)
    grid_size: int = 5
    spline_order: int = 3
    grid_range: list[float] = field(default_factory=lambda: [-3.0, 3.0])
    target: str = "feature"
    # "steps": the last K features, forecasts included (paper); "full": the last K full-step features, each
    # forecast scaled by its extrapolation distance (step - f0) / (f0 - f1) as TaylorSeer O1 is
    memory: str = "steps"
    gain_bias: float = 0.0  # constant added to the gain network's output (a calibrated start, e.g. the damping)
    # a learned (steps, history) table per context added to each step's folded filter: per-step filters, e.g.
    # started at the least-squares linear forecaster (`lesa train --set gain_init=linear`)
    step_filters: bool = False
    # a seed ensemble: `members` sets of stage experts (and step filters) whose folded coefficients are averaged, so
    # it forecasts at the cost of one predictor (`LESAPredictor.ensemble`)
    members: int = 1
    # a learned full-step correction (`lesa.correction`): one strength per step (used at the full steps), saved as
    # the tensor `correction`; in an ensemble the mean of the members'
    correction: bool = False
    base_model: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.windows) != len(self.thresholds) + 1:
            raise ValueError(
                f"windows has {len(self.windows)} entries but {len(self.thresholds)} thresholds make "
                f"{len(self.thresholds) + 1} stages"
            )
        if any(a <= b for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ValueError(f"thresholds must decrease strictly, got {self.thresholds}")
        if min(self.windows) < 1 or max(self.windows) > self.history:
            raise ValueError(f"every window K must lie in 1..history={self.history}, got {self.windows}")
        if self.memory not in ("steps", "full"):
            raise ValueError(f"memory must be 'steps' or 'full', got {self.memory!r}")
        if self.gain not in ("kan", "mlp"):
            raise ValueError(f"gain must be 'kan' or 'mlp', got {self.gain!r}")
        if self.members < 1:
            raise ValueError(f"members must be at least 1, got {self.members}")
        if len(self.sigmas) < self.num_steps:
            raise ValueError(f"sigmas has {len(self.sigmas)} values for {self.num_steps} steps")
        self.schedule()  # validates the schedule fields

    def schedule(self) -> StepSchedule:
        """The schedule the predictor was trained for."""
        return StepSchedule(self.interval, self.warmup, tuple(self.forced_full_steps), tuple(self.explicit_full_steps))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> PredictorConfig:
        """The config a saved config.json (`source`) describes. Every field that changes what the predictor computes
        is required: a default filled in silently (e.g. interval 7 for a predictor trained at 10) would run the
        weights as another predictor. Only the informational `base_model` and `format_version` may be absent."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a JSON object expected, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        missing = [name for name in sorted(known - set(_INFORMATIONAL_FIELDS)) if name not in data]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version!r} is not one this lesa understands (1..{FORMAT_VERSION})"
            )
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:  # a field of the wrong kind or value: name the file it came from
            raise ValueError(f"{source}: {e}") from e


# fields of PredictorConfig that do not change what a predictor computes (the rest are required in a config.json)
_INFORMATIONAL_FIELDS = ("base_model", "format_version")


class LESAPredictor(PredictorArtefact):
    """Forecasts the tapped feature of a cached step from the last K features of the same cache context.

    forecast = h[-1] + r(step) * alpha(step) * (w . h[-K:] + b), with (w, b) and the KAN behind alpha chosen by the
    stage of the current sigma; h holds the last K features (memory "steps", r = 1) or the last K full-step features
    (memory "full", r = the extrapolation distance). Master weights stay fp32; at inference the forecast runs in the
    feature's own dtype with the per-step coefficients computed once per sigma schedule.

    Example (an untrained predictor forecasting step 4 from the features of steps 0-3):
        >>> import torch
        >>> config = PredictorConfig(
        ...     model_class="FluxTransformer2DModel", tap="t", num_steps=20, sigmas=[1 - i / 20 for i in range(21)],
        ...     feature_dim=6, kan_hidden=[8, 8],
        ... )
        >>> history = [torch.randn(64, 6) for _ in range(4)]
        >>> LESAPredictor(config).forecast(history, "cond", step=4, sigmas=torch.tensor(config.sigmas)).shape
        torch.Size([64, 6])
    """

    config_class = PredictorConfig

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        kan_kwargs = dict(
            grid_size=config.grid_size, spline_order=config.spline_order, grid_range=tuple(config.grid_range)
        )

        def stage_experts() -> nn.ModuleDict:
            return nn.ModuleDict(
                {
                    ctx: nn.ModuleList(
                        StageExpert(
                            k,
                            len(config.sigmas),
                            tuple(config.kan_hidden),
                            gain=config.gain,
                            gain_bias=config.gain_bias,
                            **kan_kwargs,
                        )
                        for k in config.windows
                    )
                    for ctx in config.contexts
                }
            )

        def filter_table() -> nn.ParameterDict:
            return nn.ParameterDict(
                {ctx: nn.Parameter(torch.zeros(config.num_steps, config.history)) for ctx in config.contexts}
            )

        self.experts = stage_experts()
        if config.step_filters:
            self.step_filters = filter_table()
        if config.members > 1:  # the other members of a seed ensemble (member 0 is `experts` / `step_filters`)
            self.members = nn.ModuleList(
                nn.ModuleDict(
                    {"experts": stage_experts(), **({"step_filters": filter_table()} if config.step_filters else {})}
                )
                for _ in range(config.members - 1)
            )
        if config.correction:
            self.correction = nn.Parameter(torch.zeros(config.num_steps))
        self.full_steps = config.schedule().full_steps(config.num_steps)

    # -- routing and coefficients -------------------------------------------------------------------------------
    def past_steps(self, step: int) -> list[int]:
        """The steps whose features the forecast of `step` reads, oldest first."""
        if self.config.memory == "full":
            return [f for f in self.full_steps if f < step][-self.config.history :]
        return list(range(max(0, step - self.config.history), step))

    def reach(self, step: int) -> float:
        """r(step): 1 with memory "steps"; with memory "full" (step - f0) / (f0 - f1), f0 and f1 the last two full
        steps before it (0 before two full steps: the forecast is then the last feature)."""
        if self.config.memory == "steps":
            return 1.0
        before = [f for f in self.full_steps if f < step]
        return (step - before[-1]) / (before[-1] - before[-2]) if len(before) >= 2 else 0.0

    def expert(self, context: str, sigma: float) -> StageExpert:
        """The stage expert serving `context` at `sigma` (of member 0 in an ensemble)."""
        return self.experts[self.resolve_context(context)][stage_of(sigma, tuple(self.config.thresholds))]

    def resolve_context(self, context: str) -> str:
        """The context whose experts serve `context` (an unknown context is served by the first trained one)."""
        return context if context in self.experts else self.config.contexts[0]

    def check_schedule(self, sigmas: list[float] | torch.Tensor) -> torch.Tensor:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if sigmas.numel() != len(self.config.sigmas):
            raise ValueError(
                f"this predictor was trained on a sigma schedule of {len(self.config.sigmas)} values "
                f"({self.config.num_steps} steps); the pipeline's schedule has {sigmas.numel()} values. This is a "
                "format-1 predictor, which serves the one schedule it was trained on; a schedule-free predictor "
                "(format 2, `lesa train --recipe schedule-free`) serves any step count, resolution and speed-up"
            )
        shift = float((sigmas - torch.tensor(self.config.sigmas, dtype=torch.float32)).abs().max())
        if shift > 1e-3:
            warnings.warn(
                f"the pipeline's sigma schedule differs from the one this format-1 predictor was trained on (by up to "
                f"{shift:.3g}; e.g. another resolution under dynamic shifting, or another scheduler): it runs, "
                "but its per-step coefficients were learned for the other schedule. A schedule-free predictor "
                "(format 2) computes them from the schedule itself",
                stacklevel=4,
            )
        return sigmas

    @torch.no_grad()
    def coefficient_table(self, context: str, sigmas: list[float] | torch.Tensor) -> list[tuple[list[float], float]]:
        """Per step: (filter coefficients c[0..K-1], offset c0) with the gain folded in, as Python floats.

        Kept for the next generation with the same schedule until a weight changes in place (an optimiser step or
        `load_state_dict` bumps the tensors' version counters), so the gain networks run once, not per image."""
        sigmas = self.check_schedule(sigmas)
        context = self.resolve_context(context)
        weights = tuple((p.data_ptr(), p._version) for p in self.parameters())
        key = (tuple(sigmas.tolist()), weights)
        cache = self.__dict__.setdefault("_tables", {})  # context -> (key, table); not module state
        if context not in cache or cache[context][0] != key:
            cache[context] = (key, self._coefficient_table(context, sigmas))
        return cache[context][1]

    def _coefficient_table(self, context: str, sigmas: torch.Tensor) -> list[tuple[list[float], float]]:
        table = []
        for step in range(self.config.num_steps):
            c, c0 = self.step_coefficients(context, step, sigmas)
            table.append((c.tolist(), float(c0)))
        return table

    def step_coefficients(self, context: str, step: int, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, c0) of `step`: forecast = h[-1] + c0 + sum_k c[k] * window[k] over the last len(c) history entries
        (oldest first); the stage expert's filter times its gain and the reach r, plus the step's own filter; in an
        ensemble the mean over its members."""
        sigma = float(sigmas[step])
        context = self.resolve_context(context)
        stage = stage_of(sigma, tuple(self.config.thresholds))
        members = self.member_parts()
        r = self.reach(step)
        total_c, total_c0 = 0.0, 0.0
        for experts, filters in members:
            c, c0 = experts[context][stage].coefficients(sigma, sigmas)
            c, c0 = r * c, r * c0
            if filters is not None:
                own = filters[context][step]
                # a window of K entries is the last K of a window of `history` entries (pad_window pads the same way)
                c = torch.cat([c.new_zeros(len(own) - len(c)), c]) + own
            total_c, total_c0 = total_c + c, total_c0 + c0
        return total_c / len(members), total_c0 / len(members)

    def member_parts(self) -> list[tuple[nn.ModuleDict, nn.ParameterDict | None]]:
        """(stage experts, step filters or None) of each member: one, or the members of a seed ensemble."""
        parts = [(self.experts, getattr(self, "step_filters", None))]
        for m in self.members if self.config.members > 1 else []:
            parts.append((m["experts"], m["step_filters"] if "step_filters" in m else None))
        return parts

    # -- forecasting ----------------------------------------------------------------------------------------------
    @staticmethod
    def apply_coefficients(history: list[torch.Tensor], coeffs: list[float], offset: float) -> torch.Tensor:
        """h[-1] + offset + sum_k coeffs[k] * window[k], in the history's dtype (inference path, no autograd)."""
        window = pad_window(history, len(coeffs))
        out = history[-1] + offset
        for c, h in zip(coeffs, window, strict=True):
            out.add_(h, alpha=c)
        return out

    def forecast(self, history: list[torch.Tensor], context: str, step: int, sigmas: torch.Tensor) -> torch.Tensor:
        """Differentiable forecast (training path): history entries are (…) tensors, oldest first."""
        c, c0 = self.step_coefficients(context, step, sigmas)
        window = pad_window(history, len(c))
        out = history[-1] + c0
        for k, h in enumerate(window):
            out = out + c[k] * h
        return out

    def forward(self, history: list[torch.Tensor], context: str, step: int, sigmas: torch.Tensor) -> torch.Tensor:
        """Same as `forecast` (so DistributedDataParallel can wrap the predictor)."""
        return self.forecast(history, context, step, sigmas)

    @classmethod
    def ensemble(cls, predictors: list[LESAPredictor]) -> LESAPredictor:
        """A seed ensemble of predictors trained for the same schedule and architecture: its folded coefficients are
        the mean of theirs (a forecast costs what one predictor's does).

        Example:
            >>> config = PredictorConfig(
            ...     model_class="FluxTransformer2DModel", tap="t", num_steps=20, sigmas=[1 - i / 20 for i in range(21)],
            ...     feature_dim=6, kan_hidden=[8, 8],
            ... )
            >>> pair = LESAPredictor.ensemble([LESAPredictor(config), LESAPredictor(config)])
            >>> pair.config.members, pair.num_parameters() == 2 * LESAPredictor(config).num_parameters()
            (2, True)
        """
        if not predictors:
            raise ValueError("an ensemble needs at least one predictor")
        first = asdict(predictors[0].config)
        for i, p in enumerate(predictors[1:], 1):
            other = asdict(p.config)
            differ = sorted(k for k in first if k != "members" and first[k] != other[k])
            if differ:
                raise ValueError(f"predictor {i} differs from predictor 0 in {differ}: an ensemble needs equal configs")
        parts = [part for p in predictors for part in p.member_parts()]
        model = cls(PredictorConfig(**{**first, "members": len(parts)}))
        for (experts, filters), (into_experts, into_filters) in zip(parts, model.member_parts(), strict=True):
            into_experts.load_state_dict(experts.state_dict())
            if filters is not None:
                into_filters.load_state_dict(filters.state_dict())
        if model.config.correction:
            with torch.no_grad():  # each predictor weighs by its members (an ensemble of ensembles stays a mean)
                total = sum(p.correction * p.config.members for p in predictors)
                model.correction.copy_(total / model.config.members)
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def forecast_flops(window: int, numel: int) -> int:
    """Floating-point operations of one cached-step forecast: K multiply-adds per element plus the offset add."""
    return (2 * window + 1) * numel
