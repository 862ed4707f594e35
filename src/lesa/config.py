"""Configuration dataclasses, one per caching method; each knows its schedule and builds its per-context policy."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from .correction import FullStepCorrector
from .policies import LESAPolicy, LinearForecastPolicy, Policy, ReusePolicy, TaylorSeerPolicy, TeaCachePolicy
from .policies.teacache import FLUX_COEFFICIENTS
from .predictor import LESAPredictor
from .schedule import StepSchedule


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

    name = "none"
    adaptive = False  # True: the policy decides at the first trunk block whether a step is full

    def schedule(self) -> StepSchedule:
        return StepSchedule(self.interval, self.warmup, tuple(self.forced_full_steps), tuple(self.explicit_full_steps))

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
    """LESA with a trained predictor: an instance, or what `LESAPredictor.from_pretrained` loads (a directory, or a
    Hugging Face Hub repo id such as "user/lesa-flux-n7"; for a revision or token, pass
    `LESAPredictor.from_pretrained(repo_id, revision=..., token=...)` instead). The schedule (interval, warmup and a
    searched schedule's full steps) defaults to the predictor's. Inert: the predictor is loaded by `enable` (or
    `resolve()`), not when the config is made.

    Example (the predictor shipped for the embedded model at 10 of 50 steps):
        >>> import lesa
        >>> from lesa.pipelines import shipped_predictor
        >>> config = lesa.LESAConfig(predictor=shipped_predictor(7))
        >>> config.interval is None  # nothing read yet
        True
        >>> resolved = config.resolve()
        >>> resolved.interval, len(resolved.schedule().full_steps(50))
        (7, 10)
    """

    predictor: LESAPredictor | str | Path | None = None
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
    # the predictor's learned full-step correction, if it has one (False: forecasts only, e.g. for an ablation)
    learned_correction: bool = True
    name = "lesa"

    def __post_init__(self) -> None:
        if self.predictor is None:
            raise ValueError("LESAConfig needs a predictor: LESAConfig(predictor=DIR, HUB_REPO_ID or LESAPredictor)")
        if self.residual:
            raise ValueError(
                "LESAConfig: a predictor forecasts what it was trained on, the tapped feature; residual=True is for "
                "the fixed forecasters (FORA, TaylorSeer, linear)"
            )

    def resolve(self) -> LESAConfig:
        """The predictor loaded (a directory or a Hub repo id) and the schedule defaulted to the predictor's (a
        searched schedule's full steps too); a warning when the given interval / warm-up differ from its own."""
        predictor = self.predictor
        if not isinstance(predictor, LESAPredictor):
            predictor = LESAPredictor.from_pretrained(predictor)
        pc = predictor.config
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

    def make_policy(self, context: str) -> Policy:
        return LESAPolicy(
            self.predictor, self.predictor.resolve_context(context), self.differentiable, self.history_grad
        )

    def make_corrector(
        self, context: str, sigmas: list[float] | None, full_steps: list[int]
    ) -> FullStepCorrector | None:
        """The predictor's learned correction (a `correction` given here replaces it)."""
        if self.correction or not (self.learned_correction and self.predictor.config.correction):
            return super().make_corrector(context, sigmas, full_steps)
        strength = self.predictor.correction
        if self.differentiable:  # the learned strengths get gradients through the correction
            return FullStepCorrector(lambda step: strength[step], sigmas, full_steps, keep_graph=True)
        values = strength.detach().tolist()
        return FullStepCorrector(lambda step: values[step], sigmas, full_steps)

    def check_model(self, model_class: str) -> None:
        trained = self.predictor.config.model_class
        if trained != model_class:
            raise ValueError(f"predictor was trained for {trained}, but the transformer is a {model_class}")
