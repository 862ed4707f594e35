"""The methods `lesa bench` compares, each a row built for one full-step budget, and how each is tuned to it.

Budgets are named by LESA's schedule: interval N with warm-up E gives a fixed number of full steps (10 of 50 at
N = 7). Fixed-schedule methods reuse it; adaptive ones (TeaCache, First Block Cache, MagCache) get a threshold
searched on the fitting prompts until their mean trunk executions match; calibrated baselines are fitted on the
fitting trajectories. Nothing here looks at the evaluation prompts.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lesa

from ..calibrate import fit_damping, fit_linear, fit_polynomial, search_threshold
from ..config import CacheConfig, LinearForecastConfig, TeaCacheConfig
from ..correction import DEFAULT_CYCLES, DEFAULT_STRENGTH, first_cycles
from ..predictor import ScheduleFreePredictor, load_predictor
from ..recording import Recording
from ..schedule import StepSchedule, full_step_count, uniform_budget

FAMILIES: tuple[str, ...] = (
    "lesa",
    "fora",
    "taylorseer-o1",
    "taylorseer-o2",
    "taylorseer-damped",
    "linear",
    "fora-corrected",
    "taylorseer-damped-corrected",
    "teacache",
    "diffusers-taylorseer",
    "diffusers-fbcache",
    "diffusers-magcache",
)
NEEDS_FIT_DATA = ("taylorseer-damped", "linear", "taylorseer-damped-corrected")
OWN_BASELINES = ("fora", "taylorseer-o1", "taylorseer-o2", "taylorseer-damped", "linear")
SEARCHED = ("teacache", "diffusers-fbcache", "diffusers-magcache")
# methods that only match a budget's count of full steps, not where they lie: run once per budget
SAME_ON_ANY_PLACEMENT = (*SEARCHED, "diffusers-taylorseer")


@dataclass
class Budget:
    """A full-step budget: a schedule over `steps` steps, named by LESA's interval N and warm-up E; a searched
    schedule's placement (a predictor's) is shared by every fixed-schedule method on that budget."""

    schedule: StepSchedule
    steps: int
    speedup: float | None = None  # a budget given as a speed-up (`lesa bench --speedups`): named by it
    placement: str = "uniform"  # with a speed-up: "uniform" or "planned" (a schedule-free predictor's own)

    @property
    def interval(self) -> int:
        return self.schedule.interval

    @property
    def warmup(self) -> int:
        return self.schedule.warmup

    @property
    def explicit(self) -> tuple[int, ...]:
        return self.schedule.explicit

    @property
    def name(self) -> str:
        if self.speedup is not None:
            return f"x{self.speedup:g}" + (" planned" if self.placement == "planned" else "")
        return f"N={self.interval}" + (" searched" if self.explicit else "")

    @property
    def full_steps(self) -> int:
        return len(self.schedule.full_steps(self.steps))

    @property
    def label(self) -> str:
        if self.speedup is not None:
            return f"{self.full_steps}/{self.steps}" + (" planned" if self.placement == "planned" else "")
        return f"{self.full_steps}/{self.steps}" + (" searched" if self.explicit else "")


@dataclass
class Method:
    """One row of the table (learned rows: one entry per training seed, same `row`)."""

    row: str
    family: str
    budget: Budget
    enable: Callable[[Any], None]
    disable: Callable[[Any], None]
    seed: str | None = None
    fitted: dict[str, Any] = field(default_factory=dict)


def _ours(config: lesa.CacheConfig) -> tuple[Callable, Callable]:
    return (lambda pipe: lesa.enable(pipe, config)), lesa.disable


def _diffusers(config_factory: Callable[[], Any]) -> tuple[Callable, Callable]:
    return (lambda pipe: pipe.transformer.enable_cache(config_factory())), (
        lambda pipe: pipe.transformer.disable_cache()
    )


def fixed_methods(
    family: str,
    budget: Budget,
    fit: Recording | None,
    fit_indices: list[int] | None,
    correction: dict[int, float] | None = None,
) -> list[Method]:
    """Rows whose schedule is LESA's own (all but the learned and the searched ones); "X-corrected": X with the
    full-step correction a learned one starts from (`correction.first_cycles` at the default strength)."""
    if family.endswith("-corrected"):
        full = budget.schedule.full_steps(budget.steps)
        strengths = first_cycles(full, budget.warmup, DEFAULT_STRENGTH, DEFAULT_CYCLES)
        methods = fixed_methods(family.removesuffix("-corrected"), budget, fit, fit_indices, correction=strengths)
        for method in methods:
            method.family = family
            method.fitted["correction"] = {str(k): v for k, v in strengths.items()}
        return methods
    n = budget.name if not correction else f"+ correction {budget.name}"
    if family == "fora":
        return [Method(f"FORA {n}", family, budget, *_ours(baseline_config(family, budget.schedule, correction)))]
    if family in ("taylorseer-o1", "taylorseer-o2"):
        config = baseline_config(family, budget.schedule, correction)
        return [Method(f"TaylorSeer O{family[-1]} {n}", family, budget, *_ours(config))]
    if family == "taylorseer-damped":
        g = fit_damping(fit, budget.schedule, fit_indices)
        config = baseline_config(family, budget.schedule, correction, damping=g)
        return [Method(f"TaylorSeer O1 damped {n}", family, budget, *_ours(config), fitted={"damping": g})]
    if family == "linear":
        weights = fit_linear(fit, budget.schedule, indices=fit_indices)
        config = baseline_config(family, budget.schedule, correction, weights=weights)
        fitted = {"history": 3, "weights": {str(k): v for k, v in weights.items()}}
        return [Method(f"least-squares linear {n}", family, budget, *_ours(config), fitted=fitted)]
    if family == "diffusers-taylorseer":
        import torch
        from diffusers import TaylorSeerCacheConfig

        before, every = diffusers_taylorseer_rhythm(budget)

        def factory() -> Any:
            # lite mode: every trunk block skipped, TaylorSeer O1 on the final projection; full-precision factors
            return TaylorSeerCacheConfig(
                cache_interval=every,
                disable_cache_before_step=before,
                max_order=1,
                use_lite_mode=True,
                taylor_factors_dtype=torch.float32,
            )

        fitted = {"cache_interval": every, "disable_cache_before_step": before}
        return [Method(f"diffusers TaylorSeerCache lite O1 {n}", family, budget, *_diffusers(factory), fitted=fitted)]
    raise ValueError(f"{family!r} is not a fixed-schedule method")


def baseline_config(
    family: str,
    schedule: StepSchedule,
    correction: dict[int, float] | None = None,
    damping: float = 1.0,
    weights: dict[int, list[float]] | None = None,
) -> CacheConfig:
    """The configuration of a fixed-schedule baseline of lesa's own on `schedule`, FLOPs not counted: the one
    registry the bench, training (start and validation rows) and the benchmark scripts build baselines from.

    Families: "fora", "taylorseer-o1", "taylorseer-o2", "taylorseer-damped" (with its fitted `damping`) and "linear"
    (with its fitted `weights`); `correction`: full-step correction strengths (`correction.first_cycles`).

    Example:
        >>> from lesa.schedule import StepSchedule
        >>> baseline_config("taylorseer-damped", StepSchedule(7, 3), damping=0.8).damping
        0.8
    """
    sched = dict(
        interval=schedule.interval,
        warmup=schedule.warmup,
        explicit_full_steps=schedule.explicit,
        count_flops=False,
        correction=dict(correction or {}),
    )
    if family == "fora":
        return lesa.FORAConfig(**sched)
    if family in ("taylorseer-o1", "taylorseer-o2"):
        return lesa.TaylorSeerConfig(order=int(family[-1]), **sched)
    if family == "taylorseer-damped":
        return lesa.TaylorSeerConfig(order=1, damping=damping, **sched)
    if family == "linear":
        return LinearForecastConfig(weights=weights or {}, **sched)
    raise ValueError(f"{family!r} is not a fixed-schedule baseline of lesa's; those are {', '.join(OWN_BASELINES)}")


def diffusers_taylorseer_rhythm(budget: Budget) -> tuple[int, int]:
    """(disable_cache_before_step, cache_interval) whose full-step count equals the budget's, nearest to (E+1, N).

    diffusers computes steps < D and every step with (step - D - 1) % I == 0; our schedule computes 0..E and then
    every N-th step, so the two rhythms differ slightly and only the count can match."""
    best = None
    for before in range(budget.warmup + 1, budget.warmup + budget.interval + 1):
        for every in range(max(1, budget.interval - 3), budget.interval + 4):
            count = sum(1 for s in range(budget.steps) if s < before or (s - before - 1) % every == 0)
            cost = (abs(count - budget.full_steps), abs(every - budget.interval) + abs(before - budget.warmup - 1))
            if best is None or cost < best[0]:
                best = (cost, before, every)
    return best[1], best[2]


def bench_schedules(keys: list[tuple[int, int, tuple[int, ...]]]) -> list[tuple[int, int, tuple[int, ...]]]:
    """The (interval, warmup, explicit full steps) budgets to run: each given one, and after a searched one the
    uniform schedule of the same interval, so the baselines appear on both placements of the same budget."""
    out: list[tuple[int, int, tuple[int, ...]]] = []
    for interval, warmup, explicit in keys:
        for key in ((interval, warmup, explicit), (interval, warmup, ())):
            if key not in out:
                out.append(key)
    return out


SEED_SUFFIX = re.compile(r"[-_](?:s|seed)\d+$")  # a predictor directory's seed suffix: runs/pred-n7-seed1, th3-n7-s1


def lesa_methods(predictors: list[str], steps: int) -> dict[tuple[int, int, tuple[int, ...]], list[Method]]:
    """LESA rows grouped by budget. Predictors of one schedule whose directory names differ only in a seed suffix
    ("-seed1", "-s1") are seeds of one row; when one schedule has predictors of several such names, each name is a
    row of its own."""
    loaded = []
    for directory in predictors:
        predictor = load_predictor(directory)
        if isinstance(predictor, ScheduleFreePredictor):
            raise ValueError(f"predictor {directory} is schedule-free: bench it at budgets by speed-up (--speedups)")
        pc = predictor.config
        if pc.num_steps != steps:
            raise ValueError(f"predictor {directory} was trained for {pc.num_steps} steps, the bench runs {steps}")
        budget = Budget(pc.schedule(), steps)
        variant = SEED_SUFFIX.sub("", Path(directory).resolve().name)
        loaded.append((directory, predictor, budget, variant))
    names: dict[tuple[int, int, tuple[int, ...]], set[str]] = {}
    for _, _, budget, variant in loaded:
        names.setdefault((budget.interval, budget.warmup, budget.explicit), set()).add(variant)
    out: dict[tuple[int, int, tuple[int, ...]], list[Method]] = {}
    for directory, predictor, budget, variant in loaded:
        key = (budget.interval, budget.warmup, budget.explicit)
        row = f"LESA {budget.name}" + (f" ({variant})" if len(names[key]) > 1 else "")
        config = lesa.LESAConfig(predictor=predictor, count_flops=False)
        out.setdefault(key, []).append(Method(row, "lesa", budget, *_ours(config), seed=str(directory)))
    return out


def speedup_budgets(
    predictors: list[str], steps: int, speedups: list[float], warmup: int, sigmas: list[float]
) -> list[tuple[Budget, list[Method]]]:
    """Budgets by speed-up (`lesa bench --speedups`): per speed-up, the schedule-free predictors' own placement
    (their LESA rows; several directories differing in a seed suffix are seeds of one row) and the uniform placement
    of the same number of full steps, for the fixed-schedule methods to run on both."""
    loaded = []
    for directory in predictors:
        predictor = load_predictor(directory)
        if not isinstance(predictor, ScheduleFreePredictor):
            raise ValueError(
                f"predictor {directory} is format 1 (one schedule: {predictor.config.num_steps} steps, interval "
                f"{predictor.config.interval}); budgets by speed-up need schedule-free predictors: bench it with "
                "--intervals instead"
            )
        loaded.append((directory, predictor, SEED_SUFFIX.sub("", Path(directory).resolve().name)))
    variants = {v for *_, v in loaded}
    out: list[tuple[Budget, list[Method]]] = []
    for speedup in speedups:
        budget_count = full_step_count(steps, speedup)
        if budget_count >= steps:
            continue
        planned: dict[tuple[int, ...], tuple[Budget, list[Method]]] = {}
        for directory, predictor, variant in loaded:
            schedule = predictor.config.placement(sigmas, budget_count)
            key = tuple(schedule.full_steps(steps))
            budget, methods = planned.setdefault(key, (Budget(schedule, steps, speedup, "planned"), []))
            row = f"LESA {budget.name}" + (f" ({variant})" if len(variants) > 1 else "")
            config = lesa.LESAConfig(
                predictor=predictor,
                interval=schedule.interval,
                warmup=schedule.warmup,
                explicit_full_steps=schedule.explicit,
                count_flops=False,
            )
            methods.append(Method(row, "lesa", budget, *_ours(config), seed=str(directory)))
        uniform = Budget(uniform_budget(steps, budget_count, warmup), steps, speedup, "uniform")
        out += [*planned.values()]
        if tuple(uniform.schedule.full_steps(steps)) not in planned:
            out.append((uniform, []))
    return out


def mag_ratios(generate: Callable[[], None], pipe: Any, steps: int) -> list[float]:
    """MagCache's own calibration run (diffusers prints the ratios; we read them), averaged over cache contexts."""
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            generate()
    finally:
        pipe.transformer.disable_cache()
    lists = [
        [float(x) for x in match.split(",")]
        for match in re.findall(r"\[([-0-9.eE, ]+)\]", buffer.getvalue())
        if match.count(",") == steps - 1
    ]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios; diffusers' MagCache output format changed?")
    return [sum(values) / len(values) for values in zip(*lists, strict=True)]


def teacache_polynomial(generate: Callable[[], None], pipe: Any) -> tuple[float, ...]:
    """Fit TeaCache's polynomial for this model from full-compute runs (every step computed, pairs collected)."""
    config = TeaCacheConfig(threshold=0.0, calibrate=True, count_flops=False)
    runtime = lesa.enable(pipe, config)
    pairs: list[tuple[float, float]] = []
    policies = []

    def collect(event) -> None:
        policy = runtime.state_manager.get_state().policy
        if policy not in policies:
            policies.append(policy)

    runtime.observers.append(collect)
    try:
        generate()
    finally:
        lesa.disable(pipe)
    for policy in policies:
        pairs.extend(policy.pairs)
    return fit_polynomial(pairs)


def searched_method(
    family: str,
    budget: Budget,
    pipe: Any,
    trunk_executions_at: Callable[[Method], float],
    fit_generate: Callable[[], None],
    iterations: int = 12,
) -> Method:
    """A method with its threshold searched so its mean trunk executions on the fitting prompts match `budget`."""
    fitted: dict[str, Any] = {}
    if family == "teacache":
        coefficients = teacache_polynomial(fit_generate, pipe)
        fitted["coefficients"] = list(coefficients)

        def make(threshold: float) -> Method:
            config = TeaCacheConfig(threshold=threshold, coefficients=coefficients, count_flops=False)
            return Method(f"TeaCache ({budget.label} matched)", family, budget, *_ours(config))

        high = 20.0
    elif family == "diffusers-fbcache":
        from diffusers import FirstBlockCacheConfig

        def make(threshold: float) -> Method:
            return Method(
                f"diffusers FirstBlockCache ({budget.label} matched)",
                family,
                budget,
                *_diffusers(lambda: FirstBlockCacheConfig(threshold=threshold)),
            )

        high = 10.0
    elif family == "diffusers-magcache":
        from diffusers import MagCacheConfig

        ratios = mag_ratios(fit_generate, pipe, budget.steps)
        fitted["mag_ratios"] = ratios

        def make(threshold: float) -> Method:
            def factory() -> Any:
                return MagCacheConfig(
                    threshold=threshold,
                    max_skip_steps=budget.interval - 1,
                    retention_ratio=(budget.warmup + 1) / budget.steps,
                    num_inference_steps=budget.steps,
                    mag_ratios=ratios,
                )

            return Method(f"diffusers MagCache ({budget.label} matched)", family, budget, *_diffusers(factory))

        high = 5.0
    else:
        raise ValueError(f"{family!r} is not a searched method")
    threshold, executions = search_threshold(
        lambda t: trunk_executions_at(make(t)), target=budget.full_steps, low=0.0, high=high, iterations=iterations
    )
    method = make(threshold)
    method.fitted = {**fitted, "threshold": threshold, "fit_trunk_executions": executions}
    if abs(executions - budget.full_steps) > 0.5:
        method.fitted["unmatched"] = (
            f"no threshold in [0, {high}] reaches {budget.full_steps} trunk executions on the fitting prompts "
            f"(nearest {executions:.2f})"
        )
    method.row = method.row.replace("matched", f"N={budget.interval}-matched")
    return method
