"""Which denoising steps run the transformer trunk ("full") and which are forecast ("cached")."""

from __future__ import annotations

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
