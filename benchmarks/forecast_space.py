"""Beyond the paper: do the fixed forecasters gain from forecasting the trunk residual, or from per-channel weights?

Two cheap variants of the calibrated forecasters, screened on the embedded model with the predictor-training prompts
only (the first --fit prompts fit, the last --check prompts score; never the evaluation prompts):

- residual: forecast only what the trunk adds to its input (`CacheConfig.residual`): a cached step then still
  follows its own latent through the first block's input instead of carrying the last full step's;
- per-channel: the least-squares linear forecaster with one weight vector per feature channel instead of one shared
  (same cost per element).

Damping and weights are fitted on trajectories collected in this run (feature and residual alike); the score is the
PSNR of the final image against full compute, paired per prompt.

    python benchmarks/forecast_space.py --fit 20 --check 30
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from harness import make_parser, parse

import lesa
from lesa.calibrate import cycles, fit_damping, fit_linear
from lesa.config import CacheConfig, FORAConfig, LinearForecastConfig, TaylorSeerConfig
from lesa.embedded.loading import SHIPPED_DIR, load_embedded
from lesa.evaluate.metrics import psnr
from lesa.policies import LinearForecastPolicy, Policy
from lesa.record import read_prompts
from lesa.schedule import StepSchedule

PROMPTS = SHIPPED_DIR.parent / "prompts" / "predictor_train.txt"
STEPS, HISTORY = 50, 3
BUDGETS = {
    "10/50": StepSchedule(7, 3),
    "8/50": StepSchedule(10, 3),
    "8/50 planned": StepSchedule(10, 3, explicit=(8, 17, 29, 41)),  # the shipped n10 placement
}


class _Keep(Policy):
    """Every full step's tapped feature (or residual), one list per generation."""

    def __init__(self, store: list) -> None:
        self.store = store

    def begin(self, sigmas: torch.Tensor | None) -> None:
        self.store.append([])

    def observe(self, feature: torch.Tensor, step: int, sigma: float) -> None:
        self.store[-1].append(feature.detach().double().flatten(0, -2))  # tokens x channels


@dataclass
class _KeepConfig(CacheConfig):
    interval: int = 1
    stores: dict = field(default_factory=dict)
    name = "keep"

    def make_policy(self, context: str) -> Policy:
        return _Keep(self.stores.setdefault(context, []))


class _ChannelLinear(LinearForecastPolicy):
    """The linear forecaster with per-channel weights: weights[step] is (history, channels)."""

    def forecast(self, step: int, sigma: float) -> torch.Tensor:
        weights = self.weights[step].to(self.features[0].dtype)
        out = self.features[0] * weights[0]
        for w, feature in zip(weights[1:], self.features[1:], strict=False):
            out = out + feature * w
        return out


@dataclass
class _ChannelLinearConfig(LinearForecastConfig):
    name = "linear-per-channel"

    def make_policy(self, context: str) -> Policy:
        return _ChannelLinear(self.weights)


def channel_gram(trajectories: list[torch.Tensor]) -> np.ndarray:
    """channels x steps x steps: every step's per-channel inner product with every other step, summed."""
    return sum(torch.einsum("stc,utc->csu", f, f) for f in trajectories).numpy()


def fit_per_channel(gram: np.ndarray, schedule: StepSchedule) -> dict[int, torch.Tensor]:
    """Per cached step, least-squares weights over the last HISTORY full-step features, one vector per channel:
    (history, channels)."""
    weights = {}
    for s, before in cycles(schedule, STEPS):
        use = before[:HISTORY]
        g = gram[:, use][:, :, use]
        g = g + 1e-9 * np.trace(g, axis1=1, axis2=2)[:, None, None] * np.eye(len(use))  # ridge, as fit_linear
        solved = np.linalg.solve(g, gram[:, use, s][..., None])[..., 0]  # channels x history
        weights[s] = torch.tensor(solved.T.copy(), dtype=torch.float32)
    return weights


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--fit", type=int, default=20, help="first N predictor-training prompts fit (seeds 0..)")
    parser.add_argument("--check", type=int, default=30, help="last N predictor-training prompts score (seeds 1000..)")
    args = parse(parser, threads=2)
    prompts = read_prompts(PROMPTS)
    if args.fit + args.check > len(prompts):
        raise SystemExit(f"--fit + --check must not exceed the {len(prompts)} predictor-training prompts")
    pipe = load_embedded()
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str, seed: int, config: CacheConfig | None = None) -> np.ndarray:
        if config is not None:
            lesa.enable(pipe, config)
        try:
            generator = torch.Generator().manual_seed(seed)
            image = pipe(prompt=prompt, generator=generator, num_inference_steps=STEPS, output_type="pil").images[0]
        finally:
            lesa.disable(pipe)
        return np.array(image.convert("RGB"))

    configs: dict[tuple[str, str, str], CacheConfig] = {}
    for residual in (False, True):
        space = "residual" if residual else "feature"
        keep = _KeepConfig(residual=residual)
        for i, prompt in enumerate(prompts[: args.fit]):
            generate(prompt, i, keep)
        trajectories = [torch.stack(t) for per_context in keep.stores.values() for t in per_context]
        gram = None if residual else channel_gram(trajectories)
        for budget, schedule in BUDGETS.items():
            damping, linear = fit_damping(trajectories, schedule), fit_linear(trajectories, schedule, HISTORY)
            print(f"{budget} {space}: fitted damping {damping:.3f}", flush=True)
            kw = dict(interval=schedule.interval, warmup=schedule.warmup, explicit_full_steps=schedule.explicit)
            configs[(budget, "FORA", space)] = FORAConfig(residual=residual, **kw)
            configs[(budget, "TaylorSeer O1", space)] = TaylorSeerConfig(residual=residual, **kw)
            damped = TaylorSeerConfig(residual=residual, damping=damping, **kw)
            configs[(budget, "damped TaylorSeer O1", space)] = damped
            configs[(budget, "linear", space)] = LinearForecastConfig(residual=residual, weights=linear, **kw)
            if gram is not None:
                per_channel = fit_per_channel(gram, schedule)
                configs[(budget, "linear per channel", space)] = _ChannelLinearConfig(weights=per_channel, **kw)

    scores: dict[tuple[str, str, str], list[float]] = {key: [] for key in configs}
    for j, prompt in enumerate(prompts[len(prompts) - args.check :]):
        reference = generate(prompt, 1000 + j)
        for key, config in configs.items():
            scores[key].append(psnr(generate(prompt, 1000 + j, config), reference))
        print(f"scored {j + 1}/{args.check} prompts", flush=True)

    def mean_se(values: list[float]) -> str:
        v = np.array(values)
        return f"{v.mean():6.2f} ± {v.std(ddof=1) / math.sqrt(len(v)):.2f}"

    print(f"\nPSNR (dB) against full compute, {args.check} prompts, ± standard error; Δ paired per prompt")
    print(f"{'budget':14s} {'method':32s} {'feature':>14s} {'variant':>14s} {'Δ':>14s}")
    for (budget, method, space), values in scores.items():
        if space == "residual" or method == "linear per channel":
            base = scores[(budget, "linear" if method == "linear per channel" else method, "feature")]
            delta = list(np.array(values) - np.array(base))
            label = method if space == "feature" else f"{method}, residual"
            print(f"{budget:14s} {label:32s} {mean_se(base):>14s} {mean_se(values):>14s} {mean_se(delta):>14s}")


if __name__ == "__main__":
    main()
