"""Which denoising steps run the transformer trunk ("full") and which are forecast ("cached")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepSchedule:
    """Steps 0..warmup are full, so are `forced` steps; otherwise a step is full once `interval` steps have passed
    since the last full step (the counter restarts at every full step). interval=1 makes every step full.

    Over 50 steps with warmup 3: interval 5/6/7/8/10 give 13/11/10/9/8 full steps.

    `explicit` (a searched schedule, see `calibrate.refine_schedule`) replaces the interval rule: the full steps
    after the warm-up are exactly these, and `interval` only names the uniform budget they were placed for.

    The one schedule type: every config (`CacheConfig.schedule()`, `PredictorConfig.schedule()`, a training
    variant's, a bench budget's) runs one.

    Example:
        >>> StepSchedule(interval=7, warmup=3).full_steps(50)
        [0, 1, 2, 3, 10, 17, 24, 31, 38, 45]
        >>> StepSchedule(7, 3, explicit=(7, 13, 21, 28, 36, 44)).cached_steps(12)
        [4, 5, 6, 8, 9, 10, 11]
    """

    interval: int = 7
    warmup: int = 3
    forced: tuple[int, ...] = field(default_factory=tuple)
    explicit: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if any(s <= self.warmup for s in self.explicit):
            raise ValueError(f"explicit full steps must come after the warm-up 0..{self.warmup}, got {self.explicit}")

    def is_full(self, step: int, last_full: int | None) -> bool:
        """Whether `step` runs the trunk, given the index of the last full step (None before any)."""
        if last_full is None or step <= self.warmup or step in self.forced:
            return True
        return step in self.explicit if self.explicit else step - last_full >= self.interval

    def full_steps(self, num_steps: int) -> list[int]:
        """The full steps of a run of `num_steps` steps."""
        full, last = [], None
        for step in range(num_steps):
            if self.is_full(step, last):
                full.append(step)
                last = step
        return full

    @property
    def searched(self) -> bool:
        return bool(self.explicit)

    def cached_steps(self, num_steps: int) -> list[int]:
        full = set(self.full_steps(num_steps))
        return [s for s in range(num_steps) if s not in full]

    def trunk_speedup(self, num_steps: int) -> float:
        """Steps per full step: the speed-up if a cached step cost nothing."""
        return num_steps / len(self.full_steps(num_steps))


def budget_warmup(warmup: int, budget: int) -> int:
    """The warm-up of a budget of `budget` full steps: steps 0..w with w = min(warmup, budget // 2), so that at least
    half of a small budget refreshes the forecasts after the warm-up."""
    return max(0, min(warmup, budget // 2))


def full_step_count(num_steps: int, speedup: float | None = None, full_steps: int | None = None) -> int:
    """Trunk executions of a run of `num_steps` steps at a budget given as a speed-up (steps per full step, rounded
    to the nearest count) or as the count itself; at least 1, at most `num_steps`."""
    if (speedup is None) == (full_steps is None):
        raise ValueError("give exactly one of speedup and full_steps")
    if full_steps is None:
        if not speedup >= 1:
            raise ValueError(f"speedup must be at least 1, got {speedup}")
        full_steps = round(num_steps / speedup)
    elif full_steps < 1:
        raise ValueError(f"full_steps must be at least 1, got {full_steps}")
    return max(1, min(num_steps, full_steps))


def uniform_budget(num_steps: int, budget: int, warmup: int) -> StepSchedule:
    """`budget` full steps spread evenly over `num_steps` steps after the warm-up (`budget_warmup`). Where an interval
    rule gives exactly `budget` full steps, it is that rule (50 steps: 10 full steps = interval 7, 8 = interval 10)."""
    w = budget_warmup(warmup, budget)
    for interval in range(1, num_steps + 1):
        n = len(StepSchedule(interval, w).full_steps(num_steps))
        if n == budget:
            return StepSchedule(interval, w)
        if n < budget:
            break
    after = budget - w - 1
    span = num_steps - w
    explicit = _strictly_after(w, [w + span * k / (after + 0.5) for k in range(1, after + 1)], num_steps)
    return StepSchedule(max(1, round(num_steps / budget)), w, explicit=explicit)


def sigma_budget(sigmas: Sequence[float], budget: int, warmup: int, power: float = 1.0) -> StepSchedule:
    """`budget` full steps over the schedule `sigmas` (num_steps + 1 values), placed in sigma: after the warm-up
    (`budget_warmup`) the k-th of m further full steps is the step whose sigma is nearest to
    sigma_w * (1 - (k / (m + 1/2)) ** power), sigma_w the warm-up's last. power 1 spreads them evenly in sigma, above
    1 puts them closer together early (where an image's layout is decided); the same power places them alike on any
    step count and any shift of the schedule.

    Example:
        >>> sigmas = [1 - i / 50 for i in range(51)]
        >>> sigma_budget(sigmas, 10, 3, power=1.3).full_steps(50)
        [0, 1, 2, 3, 7, 13, 20, 28, 36, 45]
    """
    num_steps = len(sigmas) - 1
    w = budget_warmup(warmup, budget)
    after = budget - w - 1
    if after <= 0 or w + 1 >= num_steps:
        return StepSchedule(num_steps + 1, min(w, num_steps - 1))
    top = float(sigmas[w])
    targets = [top * (1 - (k / (after + 0.5)) ** power) for k in range(1, after + 1)]
    steps = [min(range(w + 1, num_steps), key=lambda s, t=t: abs(float(sigmas[s]) - t)) for t in targets]
    return StepSchedule(max(1, round(num_steps / budget)), w, explicit=_strictly_after(w, steps, num_steps))


def _strictly_after(warmup: int, positions: Sequence[float], num_steps: int) -> tuple[int, ...]:
    """Rounded positions made strictly increasing within warmup+1 .. num_steps-1 (as many as fit)."""
    out: list[int] = []
    for i, p in enumerate(positions):
        lo = (out[-1] if out else warmup) + 1
        hi = num_steps - (len(positions) - i)  # room for the ones after it
        out.append(max(lo, min(hi, round(p))))
    return tuple(s for s in out if warmup < s < num_steps)


def truncation_step(full_steps: list[int], num_steps: int, cycles: int | None) -> int:
    """The step from which a rollout back-propagates with truncation to the last `cycles` cache cycles (runs of
    cached steps, each opened by a full step): the full step opening the first of them; 0 (the whole sampler) with
    None or when the schedule has no more cycles than that."""
    if cycles is None:
        return 0
    full = set(full_steps)
    starts = [s for s in sorted(full) if s + 1 < num_steps and s + 1 not in full]
    return starts[-cycles] if cycles < len(starts) else 0
