"""lesa: learned, stage-aware feature predictors that skip most transformer steps of diffusers DiT pipelines."""

from __future__ import annotations

from typing import Any

from .adapters import ADAPTERS, ModelAdapter, get_adapter
from .config import CacheConfig, FORAConfig, LESAConfig, NoCacheConfig, TaylorSeerConfig
from .predictor import LESAPredictor, PredictorConfig
from .runtime import CacheRuntime, apply_lesa_cache, check_no_other_cache, get_runtime, remove_lesa_cache
from .schedule import StepSchedule

__version__ = "0.1.0"


def _transformer(pipe: Any):
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no `transformer` component: lesa accelerates DiT pipelines")
    return transformer


def enable(pipe: Any, config: CacheConfig) -> CacheRuntime:
    """Accelerate `pipe` with `config` (replacing any lesa cache already on it). The hook reads each generation's
    sigma schedule from `pipe.scheduler`. Refused while one of diffusers' caches (`transformer.enable_cache`) is on."""
    transformer = _transformer(pipe)
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(
            f"{type(pipe).__name__} has a second transformer (Wan 2.2 two-expert layout: transformer_2 takes the "
            "low-noise steps); lesa supports one transformer per pipeline (e.g. Wan 2.1, Wan 2.2 TI2V-5B)"
        )
    check_no_other_cache(transformer, config)  # before removing lesa's current cache: a refusal changes nothing
    remove_lesa_cache(transformer)
    scheduler = getattr(pipe, "scheduler", None)
    return apply_lesa_cache(transformer, config, sigma_source=lambda: getattr(scheduler, "sigmas", None))


def disable(pipe: Any) -> None:
    """Remove lesa from `pipe`; it then behaves exactly as before `enable`."""
    remove_lesa_cache(_transformer(pipe))


def summary(pipe: Any) -> dict[str, Any]:
    """Counts of the last generation: steps, full steps, trunk executions, counted FLOPs per call and speed-up."""
    return get_runtime(_transformer(pipe)).summary()


__all__ = [
    "ADAPTERS",
    "CacheConfig",
    "CacheRuntime",
    "FORAConfig",
    "LESAConfig",
    "LESAPredictor",
    "ModelAdapter",
    "NoCacheConfig",
    "PredictorConfig",
    "StepSchedule",
    "TaylorSeerConfig",
    "apply_lesa_cache",
    "disable",
    "enable",
    "get_adapter",
    "remove_lesa_cache",
    "summary",
]
