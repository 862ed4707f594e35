"""Configuration dataclasses, one per caching method; each knows its schedule and builds its per-context policy."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .correction import FullStepCorrector
from .policies import (
    LESAPolicy,
    LinearForecastPolicy,
    Policy,
    ReusePolicy,
    ScheduleFreePolicy,
    TaylorSeerPolicy,
    TeaCachePolicy,
)
from .policies.teacache import FLUX_COEFFICIENTS
from .predictor import PredictorArtefact, ScheduleFreePredictor, load_predictor
from .schedule import StepSchedule, full_step_count, sigma_budget, uniform_budget


@dataclass
class CacheConfig:
    """No caching: every step runs the trunk (the hook still counts calls and FLOPs). The base of every method's
    config: its schedule fields (interval, warm-up, forced and explicitly placed full steps) make the one schedule
    type, `StepSchedule`, that the runtime runs (`schedule()`).

    Example:
        >>> import lesa
        >>> lesa.FORAConfig(interval=5, warmup=2).schedule().full_steps(20)
        [0, 1, 2, 7, 12, 17]
    """

    interval: int = 1
    warmup: int = 3
    forced_full_steps: tuple[int, ...] = field(default_factory=tuple)
    explicit_full_steps: tuple[int, ...] = field(default_factory=tuple)  # a searched schedule (see StepSchedule)
    count_flops: bool = True
    # forecast only what the trunk adds to its input (tap minus the first block's input, which a cached step still
    # computes from its own latent), not the whole tapped feature; needs an adapter with `residual_stream`
    residual: bool = False
    # full-step correction (`lesa.correction`): strength per full step (e.g. `correction.first_cycles(...)`); a
    # full step absent from it is not corrected; empty: off
    correction: dict[int, float] = field(default_factory=dict)
    # a budget instead of the interval rule, for any step count: steps per full step (rounded to a count of full
    # steps) or the count itself; placed evenly after the warm-up (a schedule-free LESA predictor: its own placement)
    speedup: float | None = None
    full_steps: int | None = None

    name = "none"
    adaptive = False  # True: the policy decides at the first trunk block whether a step is full

    def __post_init__(self) -> None:
        if self.speedup is not None and self.full_steps is not None:
            raise ValueError(f"{type(self).__name__}: give speedup or full_steps, not both")
        if self.speedup is not None and not self.speedup >= 1:
            raise ValueError(f"{type(self).__name__}: speedup must be at least 1, got {self.speedup}")
        if self.full_steps is not None and self.full_steps < 1:
            raise ValueError(f"{type(self).__name__}: full_steps must be at least 1, got {self.full_steps}")

    @property
    def budgeted(self) -> bool:
        """Whether the full steps follow a budget (`speedup` / `full_steps`) rather than the interval rule."""
        return self.speedup is not None or self.full_steps is not None

    def schedule(self) -> StepSchedule:
        """The fixed schedule of the interval rule (with a budget, `plan` places each generation's full steps)."""
        return StepSchedule(self.interval, self.warmup, tuple(self.forced_full_steps), tuple(self.explicit_full_steps))

    def plan(self, sigmas: list[float] | None, num_steps: int | None) -> StepSchedule:
        """The schedule of one generation of `num_steps` steps on `sigmas` (None: unknown); the runtime asks at the
        start of every generation, so each request gets its own."""
        if not self.budgeted:
            return self.schedule()
        if num_steps is None:
            raise ValueError(f"{type(self).__name__}: a budget (speedup / full_steps) needs the pipeline's schedule")
        return uniform_budget(num_steps, full_step_count(num_steps, self.speedup, self.full_steps), self.warmup)

    def resolve(self) -> CacheConfig:
        """The configuration `enable` runs: what its fields name loaded (a predictor) and the defaults that follow
        from it filled in. Configs are inert: constructing one reads nothing."""
        return self

    def make_policy(self, context: str) -> Policy:
        return Policy()

    def make_corrector(
        self, context: str, sigmas: list[float] | None, full_steps: list[int]
    ) -> FullStepCorrector | None:
        """The full-step correction of one context's generation, or None when off."""
        if not self.correction:
            return None
        strengths = {int(k): float(v) for k, v in self.correction.items()}
        return FullStepCorrector(lambda step: strengths.get(step, 0.0), sigmas, full_steps)

    def check_model(self, model_class: str) -> None:
        """Refuse a model this configuration was not made for."""


NoCacheConfig = CacheConfig


@dataclass
class FORAConfig(CacheConfig):
    """FORA: a cached step reuses the last computed tapped feature.

    Example:
        >>> import lesa
        >>> from lesa.testing import tiny_flux_pipeline
        >>> pipe = tiny_flux_pipeline()
        >>> _ = lesa.enable(pipe, lesa.FORAConfig(interval=5, warmup=2))
        >>> _ = pipe("a red circle", num_inference_steps=20, height=16, width=16, output_type="latent")
        >>> lesa.summary(pipe)["full_steps"], lesa.summary(pipe)["trunk_executions"]
        (6, 6.0)
        >>> lesa.disable(pipe)
    """

    interval: int = 7
    name = "fora"

    def make_policy(self, context: str) -> Policy:
        return ReusePolicy()


@dataclass
class TaylorSeerConfig(CacheConfig):
    """TaylorSeer of order `order` on the tapped feature; `damping` scales every term beyond the value (1 = paper).

    The warm-up counts differently from diffusers': `warmup=3` keeps steps 0-3 full (steps 0..warmup, as every lesa
    schedule), `TaylorSeerCacheConfig(disable_cache_before_step=3)` keeps 0-2 (steps below it), then computes step 4
    and every `cache_interval`-th step after it (`evaluate.methods.diffusers_taylorseer_rhythm` matches the two by
    full-step count).

    Example:
        >>> import lesa
        >>> lesa.TaylorSeerConfig(interval=7, order=1, damping=0.8).schedule().full_steps(50)
        [0, 1, 2, 3, 10, 17, 24, 31, 38, 45]
    """

    interval: int = 7
    order: int = 1
    damping: float = 1.0
    name = "taylorseer"

    def make_policy(self, context: str) -> Policy:
        return TaylorSeerPolicy(self.order, self.damping)


@dataclass
class LinearForecastConfig(CacheConfig):
    """Per-step least-squares linear forecaster over the last full-step features (fit with `calibrate.fit_linear`).
    `weights` maps each cached step to its weights, newest full-step feature first.

    Example:
        >>> from lesa.config import LinearForecastConfig
        >>> config = LinearForecastConfig(interval=7, weights={4: [1.5, -0.5]})  # 1.5 f(3) - 0.5 f(2) at step 4
        >>> config.make_policy("cond").name
        'linear'
    """

    interval: int = 7
    weights: dict[int, list[float]] = field(default_factory=dict)
    name = "linear"

    def make_policy(self, context: str) -> Policy:
        return LinearForecastPolicy({int(k): list(v) for k, v in self.weights.items()})


@dataclass
class TeaCacheConfig(CacheConfig):
    """TeaCache: adaptive skipping with a polynomial-rescaled change of the first block's modulated input.

    `coefficients` default to the published FLUX.1 polynomial; for any other model fit them on its own trajectories
    (`calibrate.fit_teacache`). The first and last steps are always full; `interval`/`warmup` are unused.

    Example:
        >>> from lesa.config import TeaCacheConfig
        >>> TeaCacheConfig(threshold=0.4).adaptive  # the policy decides at the first trunk block
        True
    """

    threshold: float = 0.6
    coefficients: tuple[float, ...] = FLUX_COEFFICIENTS
    calibrate: bool = False
    name = "teacache"
    adaptive = True

    def make_policy(self, context: str) -> Policy:
        return TeaCachePolicy(self.threshold, self.coefficients, self.calibrate)


@dataclass
class LESAConfig(CacheConfig):
    """LESA with a trained predictor: an instance, or what `load_predictor` loads (a directory, or a Hugging Face Hub
    repo id such as "user/lesa-flux"; for a revision or token, pass `load_predictor(repo_id, revision=...,
    token=...)` instead). Inert: the predictor is loaded by `enable` (or `resolve()`), not when the config is made.

    A schedule-free predictor (format 2) serves any step count and resolution: its full steps follow a budget,
    `speedup` (steps per full step) or `full_steps`, default the predictor's `default_speedup`, placed by the
    predictor's own rule; `interval` / `warmup` run the interval rule instead. A format-1 predictor serves the one
    schedule it was trained for (interval, warm-up and a searched schedule's full steps default to its own).

    Example (the predictor shipped for the embedded model, at a speed-up of 4 on 28 steps):
        >>> import lesa
        >>> from lesa.pipelines import shipped_predictor
        >>> config = lesa.LESAConfig(predictor=shipped_predictor(), speedup=4)
        >>> config.resolve().plan([1 - i / 28 for i in range(29)], 28).full_steps(28)
        [0, 1, 2, 3, 8, 15, 23]
    """

    predictor: PredictorArtefact | str | Path | None = None
    interval: int | None = None
    warmup: int | None = None
    differentiable: bool = False
    # with differentiable: the history keeps the gradient of the features it holds (exact back-propagation through
    # time: a forecast also reaches the loss through every later forecast that reads it); off: detached
    history_grad: bool = False
    # with differentiable, on the steps that run the trunk under autograd: gradient checkpointing of every trunk block
    # (each keeps its inputs and recomputes its activations in backward: the memory of one block's activations
    # instead of all of them, for one more forward of the trunk; the values and gradients are unchanged)
    checkpoint_trunk: bool = True
    # with differentiable, on those steps: each whole transformer call under gradient checkpointing instead of its
    # blocks (a full step keeps its inputs, about a latent, not every block's; backward recomputes one call at a time,
    # holding its activations): what a rollout keeps per full step shrinks to the feature its forecasts read
    checkpoint_calls: bool = False
    # with differentiable: the steps before this one run without autograd (truncated back-propagation: the loss's
    # gradient reaches only the forecasts and corrections from this step on, and no graph is kept for earlier steps)
    grad_from_step: int = 0
    # the predictor's learned full-step correction, if it has one (False: forecasts only, e.g. for an ablation)
    learned_correction: bool = True
    name = "lesa"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.predictor is None:
            raise ValueError("LESAConfig needs a predictor: LESAConfig(predictor=DIR, HUB_REPO_ID or LESAPredictor)")
        if self.residual:
            raise ValueError(
                "LESAConfig: a predictor forecasts what it was trained on, the tapped feature; residual=True is for "
                "the fixed forecasters (FORA, TaylorSeer, linear)"
            )

    @property
    def schedule_free(self) -> bool:
        return isinstance(self.predictor, ScheduleFreePredictor)

    def resolve(self) -> LESAConfig:
        """The predictor loaded (a directory or a Hub repo id) and the schedule's defaults filled in from it."""
        predictor = load_predictor(self.predictor)
        pc = predictor.config
        if isinstance(predictor, ScheduleFreePredictor):
            warmup = pc.warmup if self.warmup is None else self.warmup
            speedup = self.speedup
            fixed = self.interval is not None or self.explicit_full_steps
            if not fixed and speedup is None and self.full_steps is None:
                speedup = pc.default_speedup
            interval = self.interval if self.interval is not None else max(1, round(speedup or pc.default_speedup))
            return replace(self, predictor=predictor, interval=interval, warmup=warmup, speedup=speedup)
        if self.budgeted:
            raise ValueError(_format_1_budget(pc))
        interval = pc.interval if self.interval is None else self.interval
        warmup = pc.warmup if self.warmup is None else self.warmup
        forced = self.forced_full_steps or tuple(pc.forced_full_steps)
        explicit = self.explicit_full_steps
        if not explicit and (interval, warmup) == (pc.interval, pc.warmup):
            explicit = tuple(pc.explicit_full_steps)
        if (interval, warmup) != (pc.interval, pc.warmup):
            warnings.warn(
                f"predictor trained for interval {pc.interval}, warmup {pc.warmup}; running with interval "
                f"{interval}, warmup {warmup}",
                stacklevel=3,
            )
        return replace(
            self,
            predictor=predictor,
            interval=interval,
            warmup=warmup,
            forced_full_steps=tuple(forced),
            explicit_full_steps=tuple(explicit),
        )

    def plan(self, sigmas: list[float] | None, num_steps: int | None) -> StepSchedule:
        """With a schedule-free predictor and a budget: the predictor's own placement on this generation's sigmas."""
        if not self.budgeted:
            return super().plan(sigmas, num_steps)
        if not self.schedule_free:  # e.g. `lesa.budget` around a format-1 predictor's generation
            raise ValueError(_format_1_budget(self.predictor.config))
        if sigmas is None:
            raise ValueError("a schedule-free predictor with a budget needs the pipeline's sigma schedule")
        budget = full_step_count(len(sigmas) - 1, self.speedup, self.full_steps)
        return sigma_budget(sigmas, budget, self.warmup, self.predictor.config.placement_power)

    def make_policy(self, context: str) -> Policy:
        predictor = self.predictor
        policy = ScheduleFreePolicy if isinstance(predictor, ScheduleFreePredictor) else LESAPolicy
        return policy(predictor, predictor.resolve_context(context), self.differentiable, self.history_grad)

    def make_corrector(
        self, context: str, sigmas: list[float] | None, full_steps: list[int]
    ) -> FullStepCorrector | None:
        """The predictor's learned correction (a `correction` given here replaces it)."""
        if self.correction or not (self.learned_correction and self.predictor.config.correction):
            return super().make_corrector(context, sigmas, full_steps)
        predictor = self.predictor
        if isinstance(predictor, ScheduleFreePredictor):
            if sigmas is None:
                return None
            # each full step with the length in sigma of the cycle it closes (from the full step before it)
            gaps = {b: sigmas[a] - sigmas[b] for a, b in zip(full_steps, full_steps[1:], strict=False)}
            if self.differentiable:
                return FullStepCorrector(
                    lambda step: predictor.correction_strength(sigmas[step], gaps.get(step, 0.0)),
                    sigmas,
                    full_steps,
                    keep_graph=True,
                )
            with torch.no_grad():
                values = {b: float(predictor.correction_strength(sigmas[b], g)) for b, g in gaps.items()}
            return FullStepCorrector(lambda step: values.get(step, 0.0), sigmas, full_steps)
        strength = predictor.correction
        if self.differentiable:  # the learned strengths get gradients through the correction
            return FullStepCorrector(lambda step: strength[step], sigmas, full_steps, keep_graph=True)
        values = strength.detach().tolist()
        return FullStepCorrector(lambda step: values[step], sigmas, full_steps)

    def check_model(self, model_class: str) -> None:
        trained = self.predictor.config.model_class
        if trained != model_class:
            raise ValueError(f"predictor was trained for {trained}, but the transformer is a {model_class}")


def _format_1_budget(pc) -> str:
    return (
        f"a speed-up budget needs a schedule-free predictor (format 2); this one is format 1, trained for "
        f"{pc.num_steps} steps at interval {pc.interval}, warm-up {pc.warmup}: run it with its own schedule, "
        "or train a schedule-free one (lesa train --recipe schedule-free)"
    )
