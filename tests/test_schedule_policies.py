import pytest
import torch

from lesa.policies import ReusePolicy, TaylorSeerPolicy
from lesa.schedule import StepSchedule


@pytest.mark.parametrize(("interval", "full"), [(5, 13), (6, 11), (7, 10), (8, 9), (10, 8)])
def test_full_step_counts_match_the_paper(interval, full):
    schedule = StepSchedule(interval, 3)
    assert len(schedule.full_steps(50)) == full
    assert schedule.trunk_speedup(50) == pytest.approx(50 / full)


def test_schedule_shape():
    s = StepSchedule(7, 3)
    assert s.full_steps(50) == [0, 1, 2, 3, 10, 17, 24, 31, 38, 45]
    assert StepSchedule(1, 3).full_steps(20) == list(range(20))
    assert StepSchedule(7, 3, forced=(5,)).full_steps(20) == [0, 1, 2, 3, 5, 12, 19]  # counter restarts at 5
    with pytest.raises(ValueError):
        StepSchedule(0, 3)


def test_fora_reuses_the_last_feature():
    p = ReusePolicy()
    p.begin(None)
    f = torch.randn(4)
    p.observe(f, 3, 0.5)
    assert torch.equal(p.forecast(5, 0.4), f)


def test_taylorseer_is_exact_on_polynomials_of_its_order():
    line = lambda s: torch.tensor([2.0 * s + 1.0, -s])  # noqa: E731
    quad = lambda s: torch.tensor([0.5 * s * s - s + 3.0])  # noqa: E731
    o1 = TaylorSeerPolicy(order=1)
    o1.begin(None)
    for s in (0, 3, 10):
        o1.observe(line(s), s, 0.0)
    assert torch.allclose(o1.forecast(14, 0.0), line(14))
    o2 = TaylorSeerPolicy(order=2)
    o2.begin(None)
    for s in (0, 7, 14):  # equal spacing: second differences are exact for a quadratic
        o2.observe(quad(s), s, 0.0)
    # d1 is the backward difference: the expansion reproduces the quadratic through the stored points
    k = 7
    expected = quad(14) + k * (quad(14) - quad(7)) / 7 + k**2 / 2 * (quad(14) - 2 * quad(7) + quad(0)) / 49
    assert torch.allclose(o2.forecast(21, 0.0), expected)
    damped = TaylorSeerPolicy(order=1, damping=0.5)
    damped.begin(None)
    damped.observe(line(0), 0, 0.0)
    damped.observe(line(4), 4, 0.0)
    assert torch.allclose(damped.forecast(6, 0.0), line(4) + 0.5 * 2 * (line(4) - line(0)) / 4)


def test_policies_refuse_to_forecast_without_history():
    for p in (ReusePolicy(), TaylorSeerPolicy()):
        p.begin(None)
        with pytest.raises(RuntimeError, match="no feature computed"):
            p.forecast(4, 0.5)


def test_schedule_search_finds_the_cheapest_placement():
    """The dynamic programme equals brute force over every placement of the free full steps."""
    import itertools

    from lesa.calibrate import search_schedule

    torch.manual_seed(0)
    steps, warmup, budget = 9, 1, 4
    errors = torch.rand(steps, steps, steps, dtype=torch.float64)

    def cost(full: list[int]) -> float:
        total = 0.0
        for s in range(steps):
            if s not in full:
                before = [f for f in full if f < s]
                total += float(errors[before[-2], before[-1], s])
        return total

    best = min(
        ([*range(warmup + 1), *rest] for rest in itertools.combinations(range(warmup + 1, steps), budget - warmup - 1)),
        key=cost,
    )
    found = search_schedule(errors, budget, warmup)
    assert found == best and len(found) == budget
    with pytest.raises(ValueError, match="cannot place"):
        search_schedule(errors, 1, warmup)


def test_explicit_schedule_runs_exactly_its_full_steps():
    s = StepSchedule(7, 3, explicit=(8, 20, 31))
    assert s.full_steps(40) == [0, 1, 2, 3, 8, 20, 31] and s.searched
    assert StepSchedule(7, 3, forced=(5,), explicit=(8,)).full_steps(12) == [0, 1, 2, 3, 5, 8]
    with pytest.raises(ValueError, match="after the warm-up"):
        StepSchedule(7, 3, explicit=(3, 9))


def test_refine_schedule_climbs_to_the_best_placement_and_scores_each_once():
    from lesa.calibrate import refine_schedule

    target = [0, 1, 2, 3, 12, 15, 40]
    calls = []

    def score(full):
        calls.append(tuple(full))
        return -sum((a - b) ** 2 for a, b in zip(full, target, strict=True))

    # the last step is 16 away; a round moves it by +1 then +2 (shifts are tried from where it stands), so 4 rounds
    # end 4 short of the target
    start = [0, 1, 2, 3, 10, 17, 24]
    best, value = refine_schedule(score, start, 50, 3, max_shift=2, rounds=4)
    assert best[:6] == target[:6] and best[6] == 36 and value == -(4**2)
    assert len(calls) == len(set(calls))  # no schedule scored twice
    assert all(a < b for a, b in zip(best, best[1:], strict=False))  # distinct and ordered throughout
    best, _ = refine_schedule(score, start, 50, 3, max_shift=2, rounds=20)
    assert best == target
    with pytest.raises(ValueError, match="beginning with 0..3"):
        refine_schedule(score, [0, 1, 2, 10], 50, 3)
