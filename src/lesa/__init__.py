"""lesa: learned, stage-aware feature predictors that skip most transformer steps of diffusers DiT pipelines.

The public names are imported on first use (PEP 562 module `__getattr__`): `import lesa` loads neither torch nor
diffusers, so the CLI and a script's `import lesa` start fast, and `lesa.LESAConfig`, `from lesa import enable` and
the rest work as plain attributes.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy attributes resolve to, for type checkers and IDEs
    from .adapters import ADAPTERS, ModelAdapter, get_adapter
    from .config import CacheConfig, FORAConfig, LESAConfig, NoCacheConfig, TaylorSeerConfig
    from .predictor import LESAPredictor, PredictorConfig, ScheduleFreePredictor, load_predictor
    from .runtime import (  # noqa: F401 (public, outside __all__)
        CacheRuntime,
        apply_lesa_cache,
        check_no_other_cache,
        get_runtime,
        remove_lesa_cache,
    )
    from .schedule import StepSchedule

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    **dict.fromkeys(("ADAPTERS", "ModelAdapter", "get_adapter"), "adapters"),
    **dict.fromkeys(("CacheConfig", "FORAConfig", "LESAConfig", "NoCacheConfig", "TaylorSeerConfig"), "config"),
    **dict.fromkeys(("LESAPredictor", "PredictorConfig", "ScheduleFreePredictor", "load_predictor"), "predictor"),
    **dict.fromkeys(
        ("CacheRuntime", "apply_lesa_cache", "check_no_other_cache", "get_runtime", "remove_lesa_cache"), "runtime"
    ),
    "StepSchedule": "schedule",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute lookups
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _transformer(pipe: Any):
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no `transformer` component: lesa accelerates DiT pipelines")
    return transformer


def enable(pipe: Any, config: CacheConfig) -> CacheRuntime:
    """Accelerate `pipe` with `config` (replacing any lesa cache already on it). The hook reads each generation's
    sigma schedule from `pipe.scheduler`. Refused while one of diffusers' caches (`transformer.enable_cache`) is on.

    Example (a tiny FLUX pipeline of random weights; a real one is loaded with `FluxPipeline.from_pretrained`):
        >>> import lesa
        >>> from lesa.testing import tiny_flux_pipeline
        >>> pipe = tiny_flux_pipeline()
        >>> _ = lesa.enable(pipe, lesa.TaylorSeerConfig(interval=4, warmup=1, order=1))
        >>> _ = pipe("a red circle", num_inference_steps=10, height=16, width=16, output_type="latent")
        >>> info = lesa.summary(pipe)
        >>> info["steps"], info["full_steps"], info["trunk_speedup"]
        (10, 4, 2.5)
        >>> lesa.disable(pipe)
    """
    transformer = _transformer(pipe)
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(
            f"{type(pipe).__name__} has a second transformer (Wan 2.2 two-expert layout: transformer_2 takes the "
            "low-noise steps); lesa supports one transformer per pipeline (e.g. Wan 2.1, Wan 2.2 TI2V-5B)"
        )
    from .runtime import apply_lesa_cache, check_no_other_cache, remove_lesa_cache

    check_no_other_cache(transformer, config)  # before removing lesa's current cache: a refusal changes nothing
    remove_lesa_cache(transformer)
    scheduler = getattr(pipe, "scheduler", None)
    return apply_lesa_cache(transformer, config, sigma_source=lambda: getattr(scheduler, "sigmas", None))


def disable(pipe: Any) -> None:
    """Remove lesa from `pipe`; it then behaves exactly as before `enable`."""
    from .runtime import remove_lesa_cache

    remove_lesa_cache(_transformer(pipe))


@contextlib.contextmanager
def budget(pipe: Any, speedup: float | None = None, full_steps: int | None = None) -> Iterator[None]:
    """Within: every generation of `pipe` runs at this budget (a speed-up or a count of full steps) instead of the
    enabled config's, e.g. per request of a server; the placement is the config's (a schedule-free predictor's own).

    Example:
        >>> import lesa
        >>> from lesa.testing import tiny_flux_pipeline
        >>> pipe = tiny_flux_pipeline()
        >>> _ = lesa.enable(pipe, lesa.FORAConfig(speedup=4))
        >>> with lesa.budget(pipe, full_steps=5):
        ...     _ = pipe("a red circle", num_inference_steps=20, height=16, width=16, output_type="latent")
        >>> lesa.summary(pipe)["full_steps"]
        5
    """
    from .runtime import get_runtime

    runtime = get_runtime(_transformer(pipe))
    before = runtime.budget
    runtime.set_budget(speedup, full_steps)
    try:
        yield
    finally:
        runtime.budget = before


def summary(pipe: Any) -> dict[str, Any]:
    """Counts of the last generation: steps, full steps, trunk executions, counted FLOPs per call and speed-up."""
    from .runtime import get_runtime

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
    "ScheduleFreePredictor",
    "apply_lesa_cache",
    "budget",
    "disable",
    "enable",
    "get_adapter",
    "load_predictor",
    "remove_lesa_cache",
    "summary",
]
