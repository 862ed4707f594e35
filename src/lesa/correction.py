"""Full-step correction: what a cache cycle's forecasts got wrong, fed back into the latent at the full step that
closes it.

Between full steps a and b the sampler integrates forecast outputs. At b the model's true output is known, so the
forecast error there can be measured: E = out(b) - (2 out(b-1) - out(b-2)), the true output minus the linear
extrapolation of the last two cached outputs. Forecast errors grow over a cycle roughly in proportion to the steps
since a (on the embedded model's recordings that shape explains 60-99 % of each cached step's error), so the cycle
left the latent off by about `reach(b)` step-sizes of E. Adding `strength * reach(b) * E` to the output of step b
moves the next latent back by that fraction of the first-order estimate. The trunk runs no more often; what it costs
is keeping the outputs of the last two cached steps and a few element-wise operations on the model's output at each
corrected full step.

Late in the schedule the full step's output also holds the model's own pull back toward the data, and correcting
there hurts; the calibrated form corrects the first cache cycles only (`first_cycles`), and a LESA predictor learns
one strength per full step with its forecasts (`lesa train`, recipe `calibrated`; BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# The calibrated form (docs/history/2026-12-benchmarks-notebook.md, "The full-step correction"): a third of the
# first-order estimate on the first two cache cycles after the warm-up, none later; what a learned correction starts
# from, and the fixed forecasters' corrected rows in `lesa bench`.
DEFAULT_STRENGTH = 1 / 3
DEFAULT_CYCLES = 2


def reach(sigmas: Sequence[float] | None, full_steps: Sequence[int], step: int) -> float:
    """How many step-sizes of the error E at full step `step` the cycle it closes left in the latent, if forecast
    errors grow in proportion to the steps since the cycle's full step a: the sum over its cached steps s of
    (s - a) / (step - a) * dsigma(s) / dsigma(step), dsigma(s) = sigma(s+1) - sigma(s) (equal step sizes when
    `sigmas` is None). 0 when fewer than two cached steps precede `step`: nothing to extrapolate from."""
    before = [f for f in full_steps if f < step]
    if not before or step - before[-1] < 3:
        return 0.0
    a = before[-1]
    if sigmas is None:
        return (step - a - 1) / 2
    if step + 1 >= len(sigmas) or float(sigmas[step + 1]) == float(sigmas[step]):
        return 0.0
    own = float(sigmas[step + 1]) - float(sigmas[step])
    return sum((s - a) / (step - a) * (float(sigmas[s + 1]) - float(sigmas[s])) / own for s in range(a + 1, step))


def first_cycles(full_steps: Sequence[int], warmup: int, strength: float, cycles: int) -> dict[int, float]:
    """The calibrated form: correction strength `strength` at the full steps closing the first `cycles` cache
    cycles after the warm-up, none later.

    Example (for a method's `correction` field, e.g. `lesa.FORAConfig(correction=...)`):
        >>> from lesa.schedule import StepSchedule
        >>> first_cycles(StepSchedule(interval=7, warmup=3).full_steps(50), warmup=3, strength=0.5, cycles=2)
        {10: 0.5, 17: 0.5}
    """
    return {step: strength for step in [f for f in full_steps if f > warmup][:cycles]}


class FullStepCorrector:
    """One cache context's correction: keeps the outputs of the last two cached steps; `full(step, output)` returns
    the output of a full step with `strength(step) * reach(step) * E` added, E the forecast error measured there.

    `keep_graph` (closed-loop training): the kept outputs stay in the autograd graph, so the correction passes
    gradients to the forecasts that made them and to a learned strength."""

    def __init__(
        self,
        strength: Callable[[int], float | torch.Tensor],
        sigmas: Sequence[float] | None,
        full_steps: Sequence[int],
        keep_graph: bool = False,
    ) -> None:
        self.strength = strength
        self.reach = {step: reach(sigmas, full_steps, step) for step in full_steps}
        self.keep_graph = keep_graph
        self.recent: list[tuple[int, torch.Tensor]] = []

    def cached(self, step: int, output: torch.Tensor) -> None:
        # a copy: a pipeline may update the tensor it was handed in place (training keeps the graph instead, where
        # autograd would refuse such an update anyway)
        self.recent.append((step, output if self.keep_graph else output.detach().clone()))
        del self.recent[:-2]

    def full(self, step: int, output: torch.Tensor) -> torch.Tensor:
        recent, self.recent = self.recent, []
        r = self.reach.get(step, 0.0)
        if not r or len(recent) < 2 or (recent[0][0], recent[1][0]) != (step - 2, step - 1):
            return output
        strength = self.strength(step)
        if not isinstance(strength, torch.Tensor) and strength == 0:
            return output
        older, last = recent[0][1], recent[1][1]
        error = output - (2 * last - older).to(output.dtype)
        return output + ((strength * r) * error).to(output.dtype)
