"""Seconds-to-fit baselines from recorded trajectories: the damping of TaylorSeer O1, a per-step least-squares
linear forecaster, and TeaCache's polynomial and threshold.

Fits are teacher-forced: every feature comes from the unaccelerated run, as `lesa record` stored it. Fit on the
predictor's training prompts, never on the prompts a benchmark evaluates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from .recording import Recording
from .schedule import StepSchedule

# What the fits read: a recording (its feature trajectories, optionally some of them) or trajectories already in
# memory, each (steps, ...) - e.g. residuals an observer collected.
FitData = Recording | Sequence[torch.Tensor]


def cycles(schedule: StepSchedule, num_steps: int) -> list[tuple[int, list[int]]]:
    """For every cached step, the full steps before it (newest first)."""
    full = schedule.full_steps(num_steps)
    out = []
    for step in schedule.cached_steps(num_steps):
        out.append((step, [f for f in reversed(full) if f < step]))
    return out


def _num_steps(data: FitData) -> int:
    if isinstance(data, Recording):
        return len(data.sigmas) - 1
    if not data:
        raise ValueError("no trajectories to fit on")
    return data[0].shape[0]


def _where(data: FitData) -> str:
    return str(data.dir) if isinstance(data, Recording) else "the given trajectories"


def _trajectories(data: FitData, indices: Iterable[int] | None) -> Iterable[torch.Tensor]:
    """Each feature trajectory (steps, ...) in its stored dtype: callers widen one step at a time, since a whole
    float64 trajectory of a large model would not fit in memory (FLUX 1024x1024: 5 GB)."""
    for i in range(len(data)) if indices is None else indices:
        if not isinstance(data, Recording):
            yield data[i]
            continue
        tensors = data.load(i)
        for context in data.contexts:
            yield tensors[f"{context}.feature"]


def damping_cycles(schedule: StepSchedule, num_steps: int) -> list[tuple[int, list[int]]]:
    """The cycles a damping is fitted on: cached steps with two full steps before them (none on a few-step schedule,
    where every TaylorSeer O1 forecast is the last feature)."""
    return [(s, fulls) for s, fulls in cycles(schedule, num_steps) if len(fulls) >= 2]


def fit_damping(data: FitData, schedule: StepSchedule, indices: Iterable[int] | None = None) -> float:
    """The g minimising sum ||F(f) + g * k * dF - F(s)||^2 over cached steps s (f the last full step, k = s - f,
    dF the first difference of the last two full steps): TaylorSeer O1 with a fitted step.

    Example (a feature moving at a constant rate needs no damping; one slowing down needs some):
        >>> import torch
        >>> from lesa.schedule import StepSchedule
        >>> line = torch.stack([torch.ones(6) + step * torch.arange(6.0) for step in range(20)])  # constant rate
        >>> schedule = StepSchedule(interval=5, warmup=2)
        >>> round(fit_damping([line], schedule), 6), fit_damping([line.sqrt()], schedule) < 1  # sqrt: slowing down
        (1.0, True)
    """
    pairs = damping_cycles(schedule, _num_steps(data))
    if not pairs:
        raise ValueError(f"{_where(data)}: no cached step has two full steps before it; cannot fit a damping")
    numerator = denominator = 0.0
    for features in _trajectories(data, indices):
        for step, (f0, f1, *_) in pairs:
            last, before, target = (features[j].double() for j in (f0, f1, step))
            x = (step - f0) * (last - before) / (f0 - f1)
            numerator += float((x * (target - last)).sum())
            denominator += float((x * x).sum())
    if denominator == 0:
        raise ValueError(
            f"{_where(data)}: no feature of the given trajectories changes between full steps; cannot fit a damping"
        )
    return numerator / denominator


def fit_linear(
    data: FitData, schedule: StepSchedule, history: int = 3, indices: Iterable[int] | None = None
) -> dict[int, list[float]]:
    """Per cached step, least-squares weights over the last `history` full-step features (newest first).

    Example (a feature moving at a constant rate: step 3 = 2 * step 2 - step 1):
        >>> import torch
        >>> from lesa.schedule import StepSchedule
        >>> line = torch.stack([torch.ones(6) + step * torch.arange(6.0) for step in range(20)])  # constant rate
        >>> weights = fit_linear([line], StepSchedule(interval=5, warmup=2), history=2)
        >>> sorted(weights), [round(w, 3) for w in weights[3]]
        ([3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 18, 19], [2.0, -1.0])
    """
    used = [(s, fulls[:history]) for s, fulls in cycles(schedule, _num_steps(data))]
    gram = {s: np.zeros((len(f), len(f))) for s, f in used}
    rhs = {s: np.zeros(len(f)) for s, f in used}
    for features in _trajectories(data, indices):
        flat = features.flatten(1).double()
        products = (flat @ flat.T).numpy()  # every step's inner product with every other step
        for step, fulls in used:
            gram[step] += products[np.ix_(fulls, fulls)]
            rhs[step] += products[fulls, step]
    weights = {}
    for step, fulls in used:
        g = gram[step] + 1e-9 * np.trace(gram[step]) * np.eye(len(fulls))  # ridge against collinear features
        weights[step] = [float(w) for w in np.linalg.solve(g, rhs[step])]
    return weights


def fit_polynomial(pairs: list[tuple[float, float]], degree: int = 4) -> tuple[float, ...]:
    """TeaCache's rescaling polynomial (highest power first) from (input change, output change) pairs."""
    if len(pairs) <= degree:
        raise ValueError(f"need more than {degree} (input change, output change) pairs to fit, got {len(pairs)}")
    x, y = np.array(pairs).T
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def search_threshold(
    full_steps_at: Callable[[float], float], target: float, low: float, high: float, iterations: int = 14
) -> tuple[float, float]:
    """Bisection for the threshold whose mean full-step count is nearest `target` (counts fall as it rises).

    The bisection runs on a log scale (thresholds that matter span orders of magnitude) from `max(low, 1e-4)`.
    Returns (threshold, its full-step count)."""
    low = max(low, 1e-4)
    best = (low, full_steps_at(low))
    for _ in range(iterations):
        mid = math.sqrt(low * high)
        count = full_steps_at(mid)
        if abs(count - target) < abs(best[1] - target) or (count == best[1] and mid > best[0]):
            best = (mid, count)
        if count > target:
            low = mid
        else:
            high = mid
    return best


def forecast_errors(recording: Recording, damping: float, indices: Iterable[int] | None = None) -> torch.Tensor:
    """E[p, a, s]: mean squared error (per element, over trajectories and contexts) of damped TaylorSeer O1 forecasting
    step s from full steps p < a < s, F(a) + g * (s - a) / (a - p) * (F(a) - F(p)); zero where p < a < s fails."""
    num_steps = len(recording.sigmas) - 1
    errors = torch.zeros(num_steps, num_steps, num_steps, dtype=torch.float64)
    count = 0
    for features in _trajectories(recording, indices):
        x = features.float().flatten(1)  # (steps, elements)
        for a in range(1, num_steps - 1):
            after = x[a + 1 :]  # targets s = a+1 .. end
            distance = torch.arange(1, num_steps - a, dtype=torch.float32)[:, None]
            for p in range(a):
                slope = (x[a] - x[p]) * (damping / (a - p))
                errors[p, a, a + 1 :] += ((x[a] + distance * slope - after) ** 2).mean(1).double()
        count += 1
    if count == 0:
        raise ValueError(f"{recording.dir}: no trajectories to search a schedule on")
    return errors / count


def search_schedule(errors: torch.Tensor, full_steps: int, warmup: int) -> list[int]:
    """The full steps (warmup steps 0..E included, `full_steps` in all) that minimise the summed forecast error of
    the cached steps, by dynamic programming over (previous full step, last full step): a cached step s is forecast
    from the last two full steps before it, with cost `errors[p, a, s]` (see `forecast_errors`)."""
    num_steps = errors.shape[-1]
    free = full_steps - (warmup + 1)
    if warmup < 1 or free < 0 or full_steps > num_steps:
        raise ValueError(f"cannot place {full_steps} full steps in {num_steps} with steps 0..{warmup} always full")
    # cost[p, a, b]: cached steps a+1 .. b-1 between full steps a and b (b = num_steps: to the end)
    cumulative = torch.cat([torch.zeros(num_steps, num_steps, 1, dtype=errors.dtype), errors.cumsum(-1)], -1)
    start = (warmup - 1, warmup)
    best = {start: (0.0, [])}  # (p, a) -> (cost so far, chosen steps) with the same number chosen
    finished = []
    for used in range(free + 1):
        nxt: dict[tuple[int, int], tuple[float, list[int]]] = {}
        for (p, a), (cost, chosen) in best.items():
            tail = float(cumulative[p, a, num_steps] - cumulative[p, a, a + 1])
            if used == free:
                finished.append((cost + tail, chosen))
                continue
            for b in range(a + 1, num_steps):
                c = cost + float(cumulative[p, a, b] - cumulative[p, a, a + 1])
                if (a, b) not in nxt or c < nxt[(a, b)][0]:
                    nxt[(a, b)] = (c, [*chosen, b])
        best = nxt
    _, chosen = min(finished, key=lambda item: item[0])
    return [*range(warmup + 1), *chosen]


def refine_schedule(
    score: Callable[[list[int]], float],
    start: list[int],
    num_steps: int,
    warmup: int,
    max_shift: int = 2,
    rounds: int = 4,
    log: Callable[[str], None] | None = None,
    alternatives: Iterable[list[int]] = (),
) -> tuple[list[int], float]:
    """Coordinate search over the full steps after the warm-up, from the best-scoring of `start` and
    `alternatives` (other placements of the same count): move one at a time by up to `max_shift` steps
    (keeping them distinct, after step `warmup` and before `num_steps`) and keep a move whenever `score` (higher is
    better; e.g. the closed-loop PSNR of a forecaster on recorded trajectories) improves. A round tries every step
    and every shift; the search stops after a round with no improvement or after `rounds` rounds.

    Returns (full steps, their score); each schedule is scored once."""
    fixed = list(range(warmup + 1))
    starts = [list(start), *map(list, alternatives)]
    for s in starts:
        if s[: warmup + 1] != fixed or sorted(set(s)) != s or s[-1] >= num_steps or len(s) != len(start):
            raise ValueError(f"start must be sorted distinct steps < {num_steps} beginning with 0..{warmup}, got {s}")
    seen: dict[tuple[int, ...], float] = {}

    def scored(steps: list[int]) -> float:
        key = tuple(steps)
        if key not in seen:
            seen[key] = score(steps)
        return seen[key]

    best = max(starts, key=scored)
    best_score = scored(best)
    for round_ in range(rounds):
        improved = False
        for i in range(warmup + 1, len(best)):
            for shift in (s for m in range(1, max_shift + 1) for s in (-m, m)):
                moved = best[i] + shift
                low = best[i - 1]
                high = best[i + 1] if i + 1 < len(best) else num_steps
                if not low < moved < high:
                    continue
                candidate = [*best[:i], moved, *best[i + 1 :]]
                value = scored(candidate)
                if value > best_score:
                    best, best_score, improved = candidate, value, True
                    if log:
                        log(f"round {round_ + 1}: {best} -> {best_score:.4f}")
        if not improved:
            break
    return best, best_score
