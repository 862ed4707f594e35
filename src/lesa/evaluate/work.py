"""Counting the work of any caching method the same way: trunk blocks executed and FLOPs per transformer call.

Our own hooks and diffusers' cache hooks skip work in different places (whole blocks, or attention modules inside
blocks), so the meter counts at the innermost point both share: each trunk block's attention module (the block
itself when it has none), with a hook registered before any cache hook, so a skipped module is never counted.
FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matrix products and attention; element-wise work is not
counted, for every method alike). On a measured generation every call is counted; a call kind (how many trunk units
ran) then costs its cheapest measured call, and what the generation spent beyond that (work done once per
generation, e.g. LESA folding its coefficients) is kept as a per-generation overhead, so later generations are
priced from the table without counting again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_METER_HOOK = "lesa_work_meter"
OVERHEAD = -1  # key of the per-generation FLOPs overhead in a method's table


class _UnitCounter(ModelHook):
    def __init__(self, meter: WorkMeter) -> None:
        super().__init__()
        self.meter = meter

    def new_forward(self, module: nn.Module, *args, **kwargs):
        self.meter.executed += 1
        return self.fn_ref.original_forward(*args, **kwargs)


@dataclass
class GenerationWork:
    """The work of one generation."""

    calls: int
    units: int  # trunk units executed, summed over calls
    flops: int
    estimated: bool  # some call kind had no measured FLOPs and was interpolated
    kinds: list[int] = field(default_factory=list)


class WorkMeter:
    """Attach once to a transformer, before any cache hook; `start()` before a generation, `stop()` after."""

    def __init__(self, transformer: nn.Module, blocks: list[nn.Module]) -> None:
        self.transformer = transformer
        self.num_units = len(blocks)
        self.executed = 0
        self.kinds: list[int] = []
        self.call_flops: list[int] = []
        self.flops_by_kind: dict[int, int] = {}
        self._counter: FlopCounterMode | None = None
        self._measure = False
        for block in blocks:
            unit = getattr(block, "attn", None) or block
            HookRegistry.check_if_exists_or_initialize(unit).register_hook(_UnitCounter(self), _METER_HOOK)
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        self._handles = [
            transformer.register_forward_pre_hook(self._before),
            transformer.register_forward_hook(self._after),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(_METER_HOOK) is not None:
                registry.remove_hook(_METER_HOOK, recurse=False)
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    def _before(self, module, args) -> None:
        self.executed = 0
        if self._measure:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def _after(self, module, args, output) -> None:
        kind = self.executed
        self.kinds.append(kind)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.call_flops.append(self._counter.get_total_flops())
            self._counter = None

    def start(self, flops_by_kind: dict[int, int], measure: bool) -> None:
        """Begin a generation; FLOPs of new call kinds go into `flops_by_kind` (one table per method)."""
        self.kinds, self.call_flops, self.flops_by_kind, self._measure = [], [], flops_by_kind, measure

    def stop(self) -> GenerationWork:
        table = self.flops_by_kind
        if self._measure:
            for kind, flops in zip(self.kinds, self.call_flops, strict=True):
                table[kind] = min(flops, table.get(kind, flops))
            per_call = sum(table[kind] for kind in self.kinds)
            table[OVERHEAD] = max(0, sum(self.call_flops) - per_call)
        estimated, flops = False, table.get(OVERHEAD, 0)
        measured = any(k >= 0 for k in table)  # False: a run that only counts units, nothing priced yet
        for kind in self.kinds:
            if not measured:
                estimated = True
            elif kind in table:
                flops += table[kind]
            else:
                flops += self._interpolate(kind)
                estimated = True
        self._measure = False
        return GenerationWork(len(self.kinds), sum(self.kinds), flops, estimated, list(self.kinds))

    def _interpolate(self, kind: int) -> int:
        known = sorted(k for k in self.flops_by_kind if k >= 0)
        if not known:
            raise RuntimeError("no transformer call was measured for FLOPs yet")
        low = max((k for k in known if k <= kind), default=known[0])
        high = min((k for k in known if k >= kind), default=known[-1])
        if low == high:
            return self.flops_by_kind[low]
        share = (kind - low) / (high - low)
        return round(self.flops_by_kind[low] + share * (self.flops_by_kind[high] - self.flops_by_kind[low]))


def trunk_executions(work: GenerationWork, reference: GenerationWork, num_units: int, steps: int) -> float:
    """Full trunk executions per generation in steps' units: executed units over units per full step."""
    calls_per_step = reference.calls / steps
    return work.units / num_units / calls_per_step
