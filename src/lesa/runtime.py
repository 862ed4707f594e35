"""The diffusers hooks that run a caching policy inside a transformer.

Three hooks share one state per cache context (cond / uncond):
- the root hook on the transformer tracks the step index and sigma, asks the schedule whether this step is full,
  counts calls and FLOPs, and tells observers (recorder, trainer) what happened;
- a trunk hook on every trunk block returns the block's inputs unchanged on cached steps, so no block runs;
- the tap hook hands the tapped feature to the policy on full steps and swaps in the forecast on cached steps,
  so the head still runs with the current step's conditioning.

One cache per transformer, as diffusers has it: lesa refuses a transformer running one of diffusers' caches, and on a
model with diffusers' CacheMixin it is the transformer's cache while on (`is_cache_enabled`, `disable_cache()`).
"""

from __future__ import annotations

import contextlib
import inspect
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from diffusers.models.cache_utils import CacheMixin
from diffusers.utils.torch_utils import unwrap_module
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .adapters import ModelAdapter, get_adapter
from .config import CacheConfig
from .correction import FullStepCorrector
from .policies import Policy
from .schedule import StepSchedule

ROOT_HOOK = "lesa_runtime"
TRUNK_HOOK = "lesa_trunk"
TAP_HOOK = "lesa_tap"
_DEFAULT_CONTEXT = CacheContext("default")
# diffusers' cache hooks (the names `CacheMixin.disable_cache` removes) -> their method: found on a transformer whose
# `_cache_config` is unset, they were registered by the functional API (e.g. `diffusers.hooks.apply_first_block_cache`)
_DIFFUSERS_CACHE_HOOKS = {
    "faster_cache_denoiser": "FasterCache",
    "faster_cache_block": "FasterCache",
    "fbc_leader_block_hook": "FirstBlockCache",
    "fbc_block_hook": "FirstBlockCache",
    "mag_cache_leader_block_hook": "MagCache",
    "mag_cache_block_hook": "MagCache",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast",
    "sea_cache_root": "SeaCache",
    "sea_cache_leader_block": "SeaCache",
    "sea_cache_block": "SeaCache",
    "sea_cache_post_norm": "SeaCache",
    "taylorseer_cache": "TaylorSeerCache",
    "text_kv_cache_transformer": "TextKVCache",
    "text_kv_cache_block": "TextKVCache",
}
_STACKING = "two caches on one transformer would both skip work, and the output would match neither method"


@dataclass
class StepEvent:
    """What one transformer call did, as observers see it."""

    context: str
    step: int
    sigma: float
    full: bool
    tap: torch.Tensor
    output: torch.Tensor
    latents: torch.Tensor


Observer = Callable[[StepEvent], None]


@dataclass
class ContextStats:
    calls: int = 0
    full: int = 0
    block_calls: int = 0
    full_steps: list[int] = field(default_factory=list)  # the steps that ran the trunk


class _StateManager(StateManager):
    """A StateManager that serves a "default" context when the transformer is called outside `cache_context`."""

    @property
    def context(self) -> CacheContext:
        return self._context or _DEFAULT_CONTEXT

    def restart(self) -> None:
        """Every context starts a new generation at its next call (unlike `reset`, the current context is kept)."""
        for state in self._state_cache.values():
            state.reset()


class ContextState(BaseState):
    """Per cache context: the policy and where this context is in its generation."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.corrector: FullStepCorrector | None = None
        self.step = 0  # index of the next call
        self.num_steps: int | None = None  # steps of the generation in progress, when the scheduler tells
        self.schedule: StepSchedule | None = None  # the generation's full steps (`CacheConfig.plan`)
        self.last_sigma: float | None = None
        self.last_full: int | None = None
        # the call in progress
        self.current_step = 0
        self.current_sigma = 1.0
        self.full = True
        self.tap: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None  # the model's dtype: policies keep their history in it
        self.tap_dtype: torch.dtype | None = None  # dtype the tap module received on the last full step
        self.trunk_input: torch.Tensor | None = None  # the first trunk block's hidden_states (residual mode)

    def reset(self) -> None:
        self.policy, self.corrector, self.schedule = None, None, None
        self.step, self.last_sigma, self.last_full = 0, None, None


class CacheRuntime:
    """Everything one enabled transformer shares between its hooks: adapter, schedule, policies, counters."""

    def __init__(
        self,
        model: nn.Module,
        config: CacheConfig,
        sigma_source: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        self.adapter: ModelAdapter = get_adapter(model)
        config.check_model(self.adapter.model_class)
        if config.adaptive and self.adapter.modulation is None:
            raise ValueError(
                f"{config.name} needs a modulation probe, which the {self.adapter.model_class} adapter lacks"
            )
        if config.budgeted and config.adaptive:
            raise ValueError(
                f"{config.name} decides its full steps as it goes: a budget (speedup / full_steps) needs a fixed "
                "schedule; set its threshold instead"
            )
        if config.correction and config.adaptive:
            raise ValueError(
                f"{config.name} decides its full steps as it goes: a full-step correction needs a fixed schedule"
            )
        if config.residual and not self.adapter.residual_stream:
            raise ValueError(
                f"{config.name} with residual=True needs a tap on the trunk's residual stream; the "
                f"{self.adapter.model_class} adapter taps the {self.adapter.tap}"
            )
        self.config = config
        self.schedule = config.schedule()
        self.budget: dict[str, Any] | None = None  # `lesa.budget`'s override of the config's speed-up / full steps
        self.sigma_source = sigma_source
        self.state_manager = _StateManager(ContextState)
        self.num_blocks = len(self.adapter.trunk_blocks(model))
        self.trunk_hooks: list[TrunkBlockHook] = []  # filled by `apply_lesa_cache`; their `ran` flags count blocks
        self.observers: list[Observer] = []
        self.differentiable = bool(getattr(config, "differentiable", False))
        self.grad_from_step = int(getattr(config, "grad_from_step", 0))
        self.checkpoint_calls = self.differentiable and bool(getattr(config, "checkpoint_calls", False))
        self.recomputing = False  # a checkpointed call is being recomputed in backward: the hooks keep no books
        self.stats: dict[str, ContextStats] = {}
        self.call_flops: dict[tuple[bool, tuple[int, ...]], int] = {}
        self.warned_contexts: set[str] = set()  # contexts whose `Policy.context_warning` was given (once per runtime)
        self._forward_params = list(inspect.signature(type(model).forward).parameters)[1:]

    # -- the step a call belongs to ---------------------------------------------------------------------------------
    def argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = self._forward_params.index(name)
        return args[index] if index < len(args) else None

    def _start_generation(self, name: str, state: ContextState) -> None:
        # everything is built first and assigned only once it all succeeded: a policy that refuses the schedule
        # (e.g. a predictor trained for another step count) leaves the state and the last generation's counts as
        # they were
        sigmas = self.sigma_source() if self.sigma_source is not None else None
        if sigmas is not None:
            sigmas = torch.as_tensor(sigmas).detach().float().cpu().flatten()
        policy = self.config.make_policy(name)
        policy.begin(sigmas)
        num_steps = len(sigmas) - 1 if sigmas is not None else None
        sigma_list = None if sigmas is None else sigmas.tolist()
        # each generation places its own full steps (a budget depends on its step count and sigmas)
        config = self.config if self.budget is None else replace(self.config, **self.budget)
        schedule = config.plan(sigma_list, num_steps)
        corrector = None
        if not self.config.adaptive:
            # without the sigma schedule the run's length is unknown: enough full steps for any run up to 1000 steps
            full = schedule.full_steps(num_steps or 1000)
            corrector = self.config.make_corrector(name, sigma_list, full)
        if name in self.stats:  # a context seen before starts again: a new generation, drop the old counts
            self.stats.clear()
        self.stats[name] = ContextStats()
        state.policy, state.corrector, state.num_steps, state.schedule = policy, corrector, num_steps, schedule
        state.step, state.last_sigma, state.last_full = 0, None, None
        if name not in self.warned_contexts and (note := policy.context_warning(name)):
            self.warned_contexts.add(name)
            warnings.warn(note, stacklevel=2)

    def set_budget(self, speedup: float | None, full_steps: int | None) -> None:
        """Generations from now on run at this budget (`lesa.budget`); checked here, not at the next call."""
        if self.config.adaptive:
            raise ValueError(f"{self.config.name} decides its full steps as it goes: it takes no budget")
        budget = {"speedup": speedup, "full_steps": full_steps}
        replace(self.config, **budget)  # the config's own checks (one of the two, in range)
        if speedup is None and full_steps is None:
            raise ValueError("lesa.budget needs speedup or full_steps")
        self.budget = budget

    def abort(self) -> None:
        """After a transformer call raised: the generation it belonged to is over, so every context's next call
        starts a fresh one (a half-updated history, step counter or corrector never leaks into it)."""
        self.state_manager.restart()
        self._clear_block_flags()

    def begin_call(self, args: tuple, kwargs: dict, dtype: torch.dtype | None = None) -> tuple[str, ContextState]:
        context = self.state_manager.context
        state: ContextState = self.state_manager.get_state()
        if context.sigma is not None:
            sigma = float(context.sigma)
        else:
            timestep = self.argument(self.adapter.timestep_argument, args, kwargs)
            sigma = float(torch.as_tensor(timestep).flatten()[0]) / self.adapter.timestep_scale
        new_generation = (
            state.policy is None
            or context.step_index == 0
            # pipelines that pass no step index: sigma rising again, or a call past the last step, means a new
            # generation began (models without diffusers' CacheMixin, e.g. SD3, never reset the hooks' state)
            or (
                context.step_index is None
                and state.last_sigma is not None
                and (sigma > state.last_sigma + 1e-6 or (state.num_steps is not None and state.step >= state.num_steps))
            )
        )
        if new_generation:
            self._start_generation(context.name, state)
        step = context.step_index if context.step_index is not None else state.step
        state.current_step, state.current_sigma = step, sigma
        # adaptive methods decide at the first trunk block; until then the step counts as full
        state.full = self.config.adaptive or state.schedule.is_full(step, state.last_full)
        state.tap = None
        state.trunk_input = None
        state.dtype = dtype
        self._clear_block_flags()
        return context.name, state

    def _clear_block_flags(self) -> None:
        for hook in self.trunk_hooks:
            hook.ran = False

    def end_call(self, name: str, state: ContextState) -> None:
        stats = self.stats[name]
        stats.calls += 1
        stats.full += int(state.full)
        if state.full:
            stats.full_steps.append(state.current_step)
        # the trunk blocks that ran in this call, counted here (outside compiled code) from the flags their hooks set
        stats.block_calls += sum(hook.ran for hook in self.trunk_hooks)
        self._clear_block_flags()
        if state.full:
            state.last_full = state.current_step
        state.step = state.current_step + 1
        state.last_sigma = state.current_sigma

    # -- reporting -------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counts of the last generation: per context and in total, with the counted FLOPs speed-up."""
        contexts = {
            name: {
                "steps": s.calls,
                "full_steps": s.full,
                "cached_steps": s.calls - s.full,
                "trunk_executions": s.block_calls / self.num_blocks if self.num_blocks else 0,
                "full_step_indices": list(s.full_steps),
            }
            for name, s in self.stats.items()
        }
        first = next(
            iter(contexts.values()), {"steps": 0, "full_steps": 0, "trunk_executions": 0, "full_step_indices": []}
        )
        full_flops = next((v for (full, _), v in self.call_flops.items() if full), None)
        cached_flops = next((v for (full, _), v in self.call_flops.items() if not full), None)
        calls = sum(s.calls for s in self.stats.values())
        full_calls = sum(s.full for s in self.stats.values())
        out: dict[str, Any] = {
            "cache": self.config.name,
            "interval": self.schedule.interval,
            "warmup": self.schedule.warmup,
            "steps": first["steps"],
            "full_steps": first["full_steps"],
            "full_step_indices": first["full_step_indices"],
            "speedup_budget": self.config.speedup,
            "trunk_executions": first["trunk_executions"],
            "trunk_speedup": first["steps"] / first["full_steps"] if first["full_steps"] else None,
            "contexts": contexts,
            "flops_full_call": full_flops,
            "flops_cached_call": cached_flops,
            "head_share": None,
            "flops_speedup": None,
        }
        if full_flops:
            actual = full_calls * full_flops + (calls - full_calls) * (cached_flops or 0)
            out["flops_speedup"] = calls * full_flops / actual if actual else None
            if cached_flops is not None:
                out["head_share"] = cached_flops / full_flops
        return out


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


def _with_first_tensor(output: Any, tensor: torch.Tensor) -> Any:
    """`output` (a tensor, a diffusers output with `.sample`, or a tuple) with its first tensor replaced."""
    if isinstance(output, torch.Tensor):
        return tensor
    if hasattr(output, "sample"):
        output.sample = tensor
        return output
    return (tensor, *output[1:])


class RootHook(ModelHook):
    """On the transformer: step and sigma tracking, FLOPs counting, observers.

    Under torch.compile the hook's own frame is skipped and its Python bookkeeping (`_begin`, `_count`, `_end`) runs
    outside dynamo: a compiled transformer (`transformer.compile()`, `torch.compile(transformer)`) has its forward
    compiled as a frame of its own, not guarded on the step index or the sigma, and the blocks compiled by
    `compile_repeated_blocks()` stay compiled.
    """

    _is_stateful = True

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.state_manager = runtime.state_manager

    # recursive=False: dynamo skips this frame only, so the transformer's forward it calls is still compiled
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: nn.Module, *args, **kwargs):
        rt = self.runtime
        try:
            name, state, count_shape = self._begin(module, args, kwargs)
            # closed-loop training: the forecast carries gradients through the head and into the observers' losses;
            # before `grad_from_step` (truncated back-propagation) the whole call runs without autograd
            if rt.differentiable and state.current_step < rt.grad_from_step:
                grad_mode = torch.no_grad()
            elif rt.differentiable and not state.full:
                grad_mode = torch.enable_grad()
            else:
                grad_mode = contextlib.nullcontext()
            with grad_mode:
                if count_shape is not None:
                    output = self._count(state, count_shape, args, kwargs)
                elif rt.checkpoint_calls and state.full and torch.is_grad_enabled():
                    output = torch.utils.checkpoint.checkpoint(
                        self.fn_ref.original_forward,
                        *args,
                        use_reentrant=False,
                        context_fn=self._recompute_contexts,
                        **kwargs,
                    )
                else:
                    output = self.fn_ref.original_forward(*args, **kwargs)
                return self._end(name, state, output, args, kwargs)
        except BaseException:  # an interrupt included: the next call must not continue a broken generation
            rt.abort()
            raise

    def _recompute_contexts(self) -> tuple[Any, Any]:
        """A checkpointed call's forward as usual; its recomputation in backward with the runtime's `recomputing`
        set, so that the block and tap hooks replay the full step's computation without touching any state (the
        generation may have moved on, or ended)."""

        @contextlib.contextmanager
        def recomputing() -> Iterator[None]:
            self.runtime.recomputing = True
            try:
                yield
            finally:
                self.runtime.recomputing = False

        return contextlib.nullcontext(), recomputing()

    @torch.compiler.disable
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[str, ContextState, tuple[int, ...] | None]:
        """Start the call: its context, its state and, when its FLOPs are still to be counted, the latents' shape."""
        rt = self.runtime
        name, state = rt.begin_call(args, kwargs, getattr(module, "dtype", None))
        shape = tuple(rt.argument(rt.adapter.latent_argument, args, kwargs).shape)
        # an adaptive method only knows after the call whether it was full: count until both kinds are known
        needed = [(True, shape), (False, shape)] if rt.config.adaptive else [(state.full, shape)]
        counting = rt.config.count_flops and any(key not in rt.call_flops for key in needed)
        return name, state, shape if counting else None

    @torch.compiler.disable
    def _count(self, state: ContextState, shape: tuple[int, ...], args: tuple, kwargs: dict) -> Any:
        """The call, run eagerly with its FLOPs counted (the first call of each kind and shape only)."""
        # force_eager: compiled regions inside (`compile_repeated_blocks`) run their eager code. Dynamo skips for good
        # every frame it first meets under a dispatch mode such as the counter's, so a counted first call would leave
        # them uncompiled; and the counts are those of the eager ops, whether or not the model is compiled
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            output = self.fn_ref.original_forward(*args, **kwargs)
        flops = counter.get_total_flops()
        if not state.full and state.tap is not None:
            flops += state.policy.forecast_flops(state.tap.numel())
        self.runtime.call_flops.setdefault((state.full, shape), flops)
        return output

    @torch.compiler.disable
    def _end(self, name: str, state: ContextState, output: Any, args: tuple, kwargs: dict) -> Any:
        """Finish the call: full-step correction, counters, observers; the (corrected) output."""
        rt = self.runtime
        corrector = state.corrector
        if corrector is not None and state.full:
            output = _with_first_tensor(output, corrector.full(state.current_step, _first_tensor(output)))
        elif corrector is not None:
            corrector.cached(state.current_step, _first_tensor(output))
        rt.end_call(name, state)
        if rt.observers:
            latents = rt.argument(rt.adapter.latent_argument, args, kwargs)
            event = StepEvent(
                name, state.current_step, state.current_sigma, state.full, state.tap, _first_tensor(output), latents
            )
            for observer in rt.observers:
                observer(event)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


class TrunkBlockHook(ModelHook):
    """On every trunk block: run it on full steps, return its inputs unchanged on cached steps.

    A block that runs sets its hook's `ran` flag, which the root hook's compiler-disabled `_end` counts and clears: the
    hook writes one constant and reads no counter, so under whole-model torch.compile nothing in it changes from step
    to step (a counter incremented here would be a Python int that dynamo guards on, recompiling the model each step).

    In differentiable mode with `checkpoint_trunk` (closed-loop training), a full step run under autograd runs each
    block under gradient checkpointing: autograd keeps the block's inputs and recomputes its activations in backward;
    with `checkpoint_calls` the root hook checkpoints the whole call instead (a checkpoint nested in another keeps its
    inputs alive: the blocks then run plainly, in the forward and in its recomputation alike).
    """

    def __init__(self, runtime: CacheRuntime, block: nn.Module, first: bool = False) -> None:
        super().__init__()
        self.runtime = runtime
        self.first = first
        self._params = list(inspect.signature(type(block).forward).parameters)[1:]
        self.checkpoint = runtime.differentiable and bool(getattr(runtime.config, "checkpoint_trunk", False))
        self.ran = False  # this block ran in the call in progress (counted and cleared by the root hook)

    def _arg(self, name: str, args: tuple, kwargs: dict) -> Any:
        return kwargs[name] if name in kwargs else args[self._params.index(name)]

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if self.checkpoint and torch.is_grad_enabled() and not self.runtime.checkpoint_calls:
            # only the block's own forward is recomputed in backward: the bookkeeping (and the policy's history,
            # which the root and tap hooks update outside every block) must run once per call
            return torch.utils.checkpoint.checkpoint(self.fn_ref.original_forward, *args, use_reentrant=False, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def new_forward(self, module: nn.Module, *args, **kwargs):
        rt = self.runtime
        if rt.recomputing:  # a checkpointed full step's call, replayed in backward
            return self._run(args, kwargs)
        state: ContextState = rt.state_manager.get_state()
        if self.first and rt.config.residual:
            state.trunk_input = self._arg("hidden_states", args, kwargs)
        if self.first and rt.config.adaptive:
            adapter = rt.adapter
            hidden = self._arg("hidden_states", args, kwargs)
            norm = getattr(module, adapter.modulation)
            modulated = norm(hidden, emb=self._arg(adapter.modulation_argument, args, kwargs))[0]
            state.full = state.policy.decide(modulated, hidden, state.current_step)
        if state.full:
            self.ran = True
            return self._run(args, kwargs)
        returns = rt.adapter.block_returns
        if len(returns) == 1:
            return self._arg(returns[0], args, kwargs)
        return tuple(self._arg(n, args, kwargs) for n in returns)


class TapHook(ModelHook):
    """On the tap module: the policy observes the real feature (full step) or supplies the forecast (cached step)."""

    def __init__(self, runtime: CacheRuntime, module: nn.Module) -> None:
        super().__init__()
        self.runtime = runtime
        self._params = list(inspect.signature(type(module).forward).parameters)[1:]

    # outside torch.compile's graphs: the policy's history length, step index and per-step coefficients change every
    # step, and a traced exchange would be guarded on them and recompiled each step (one graph break instead)
    @torch.compiler.disable
    def _exchange(self, feature: torch.Tensor) -> torch.Tensor:
        if self.runtime.recomputing:  # a full step replayed in backward: its feature, already observed
            return feature
        state: ContextState = self.runtime.state_manager.get_state()
        base = self._trunk_input(state, feature) if self.runtime.config.residual else None
        if state.full:
            state.tap_dtype = feature.dtype
            stored = feature if base is None else feature - base
            # history in the model's dtype (e.g. Wan hands norm_out an fp32 copy of a bf16 feature)
            if state.dtype is not None and stored.is_floating_point():
                stored = stored.to(state.dtype)
            state.policy.observe(stored, state.current_step, state.current_sigma)
        else:
            feature = state.policy.forecast(state.current_step, state.current_sigma)
            if base is not None:
                feature = base + feature
            if state.tap_dtype is not None:
                feature = feature.to(state.tap_dtype)
        state.tap = feature
        return feature

    @staticmethod
    def _trunk_input(state: ContextState, feature: torch.Tensor) -> torch.Tensor:
        base = state.trunk_input
        if base is None or base.shape != feature.shape:
            got = "nothing" if base is None else f"shape {tuple(base.shape)}"
            raise RuntimeError(
                f"residual mode: the first trunk block's hidden_states should match the tapped feature's shape "
                f"{tuple(feature.shape)}, got {got}"
            )
        return base.to(feature.dtype)

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        if self.runtime.adapter.tap_point != "input":
            return args, kwargs
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = self._exchange(kwargs["hidden_states"])
        else:
            args = (self._exchange(args[0]), *args[1:])
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.runtime.adapter.tap_point != "output":
            return output
        return self._exchange(output)


def check_no_other_cache(transformer: nn.Module, config: CacheConfig) -> None:
    """Refuse `config` on a transformer that already runs one of diffusers' caches: the config `enable_cache` stored
    (`CacheMixin._cache_config`), or diffusers' cache hooks registered without it (the functional API)."""
    transformer = unwrap_module(transformer)
    other = getattr(transformer, "_cache_config", None)
    if other is not None and not isinstance(other, CacheConfig):
        found, remedy = f"diffusers' {type(other).__name__} enabled", "disable it (transformer.disable_cache())"
    else:
        hooks = sorted(
            {
                name
                for module in transformer.modules()
                for name in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
                if name in _DIFFUSERS_CACHE_HOOKS
            }
        )
        if not hooks:
            return
        methods = ", ".join(sorted({_DIFFUSERS_CACHE_HOOKS[h] for h in hooks}))
        found = f"diffusers' {methods} hooks ({', '.join(hooks)}) registered"
        remedy = "remove them (HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(name, recurse=True))"
    raise ValueError(
        f"the transformer already has {found}; {remedy} before enabling lesa's {type(config).__name__}: {_STACKING}"
    )


def _refuse_enable_cache(self: nn.Module, config: Any) -> None:
    """`transformer.enable_cache` while lesa is on: one cache per transformer, as diffusers has it."""
    raise ValueError(
        f"cannot enable diffusers' {type(config).__name__}: lesa's {type(self._lesa_runtime.config).__name__} is "
        f"enabled on this transformer; disable it (lesa.disable(pipe) or transformer.disable_cache()) first: "
        f"{_STACKING}"
    )


def _disable_cache(self: nn.Module) -> None:
    """`transformer.disable_cache` while lesa is on: removes lesa."""
    remove_lesa_cache(self)


# bound per instance while lesa is on: CacheMixin's own methods know only diffusers' configs (its `enable_cache`
# would name lesa's config alone, its `disable_cache` raises "not supported")
_CACHE_METHODS = {"enable_cache": _refuse_enable_cache, "disable_cache": _disable_cache}


def apply_lesa_cache(
    transformer: nn.Module,
    config: CacheConfig,
    sigma_source: Callable[[], torch.Tensor | None] | None = None,
) -> CacheRuntime:
    """Attach a caching policy to a diffusers transformer. `sigma_source` returns the current generation's full
    sigma schedule (e.g. `lambda: pipe.scheduler.sigmas`); without it a LESA predictor uses its stored schedule.

    Refused on a transformer running one of diffusers' caches. On a model with diffusers' CacheMixin, lesa is its
    cache while on: `is_cache_enabled` is True, `enable_cache` is refused and `disable_cache()` removes lesa.

    Compiled transformers are accepted: `torch.compile(transformer)`'s wrapper gets the hooks on the module it wraps,
    whose forward it calls; `transformer.compile()` and `compile_repeated_blocks()` compile in place."""
    transformer = unwrap_module(transformer)
    if hasattr(transformer, "_lesa_runtime"):
        raise RuntimeError("lesa is already enabled on this transformer; call remove_lesa_cache(transformer) first")
    check_no_other_cache(transformer, config)
    runtime = CacheRuntime(transformer, config.resolve(), sigma_source)
    adapter = runtime.adapter
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    root.register_hook(RootHook(runtime), ROOT_HOOK)
    for i, (_, block) in enumerate(adapter.trunk_blocks(transformer)):
        hook = TrunkBlockHook(runtime, block, first=i == 0)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, TRUNK_HOOK)
        runtime.trunk_hooks.append(hook)
    tap_module = transformer.get_submodule(adapter.tap_module)
    HookRegistry.check_if_exists_or_initialize(tap_module).register_hook(TapHook(runtime, tap_module), TAP_HOOK)
    root.invalidate_child_registries_cache()
    transformer._lesa_runtime = runtime
    if isinstance(transformer, CacheMixin):
        transformer._cache_config = runtime.config  # the resolved config: `remove_lesa_cache` removes exactly it
        for name, method in _CACHE_METHODS.items():
            # bound methods, not closures: a deep copy of the transformer rebinds them to the copy
            setattr(transformer, name, types.MethodType(method, transformer))
    return runtime


def remove_lesa_cache(transformer: nn.Module) -> None:
    """Detach lesa's hooks; the transformer behaves exactly as before `apply_lesa_cache`."""
    transformer = unwrap_module(transformer)
    runtime = getattr(transformer, "_lesa_runtime", None)
    if runtime is None:
        return
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in (ROOT_HOOK, TRUNK_HOOK, TAP_HOOK):
        root.remove_hook(name, recurse=True)
    root.invalidate_child_registries_cache()
    attributes = vars(transformer)
    for name, method in _CACHE_METHODS.items():
        if getattr(attributes.get(name), "__func__", None) is method:
            del attributes[name]
    if attributes.get("_cache_config") is runtime.config:
        del attributes["_cache_config"]  # CacheMixin's class default (None) again
    del transformer._lesa_runtime


def get_runtime(transformer: nn.Module) -> CacheRuntime:
    runtime = getattr(unwrap_module(transformer), "_lesa_runtime", None)
    if runtime is None:
        raise RuntimeError("lesa is not enabled on this transformer")
    return runtime
