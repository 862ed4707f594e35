"""Held-out PSNR of the latent at every full step, not only the final one: where along the sampler a forecaster's
error builds up.

Runs `lesa train`'s closed loop on the held-out split of a recording that holds per-step latents (`lesa record`
stores them) and scores, per predictor and for damped TaylorSeer O1 on the same steps, the latent entering each full
step after the warm-up (the end of each cache cycle) and the final latent against the recording; the mean over the
held-out trajectories of each, in dB (peak: the reference latent's range, as `lesa train` scores the final one).

    python benchmarks/latent_errors.py src/lesa/embedded/predictors/n7 runs/lc2-n7-s0 --data runs/rec-lat
"""

from __future__ import annotations

import argparse

import torch

from lesa.config import CacheConfig, LESAConfig, TaylorSeerConfig
from lesa.predictor import LESAPredictor
from lesa.record import Recording
from lesa.train import Trainer, latent_psnr


def latent_errors(trainer: Trainer, config: CacheConfig, steps: list[int]) -> list[float]:
    """Mean held-out PSNR of the latent entering each of `steps`, then of the final latent, running `config`."""
    sums = [0.0] * (len(steps) + 1)
    for d, final, latents in trainer.rollouts(config, trainer.val_idx, steps):
        for j, step in enumerate(steps):
            sums[j] += latent_psnr(latents[step], d["latents"][step])
        sums[-1] += latent_psnr(final, d["final"])
    return [s / len(trainer.val_idx) for s in sums]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictors", nargs="+", help="predictor directories of one schedule")
    parser.add_argument("--data", required=True, help="a `lesa record` directory with per-step latents")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="as given to `lesa train`")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictors = [LESAPredictor.from_pretrained(d) for d in args.predictors]
    rec = Recording(args.data)
    if "latents" not in rec.shapes:
        raise SystemExit(f"{args.data} holds no per-step latents: record it again with this lesa")
    trainer = Trainer.for_scoring(rec, predictors[0].config, args.val_fraction)
    steps = trainer.cycle_ends()
    print(f"held-out split: {len(trainer.val_idx)} trajectories of {args.data}; mean PSNR (dB) of the latent entering")
    print(f"{'':>40s}  " + "  ".join(f"{f'step {s}':>8s}" for s in steps) + f"  {'final':>8s}")
    damped = TaylorSeerConfig(order=1, damping=trainer.damping, **trainer._schedule_kwargs())
    scored = [("TaylorSeer O1 damped", damped)]
    for name, predictor in zip(args.predictors, predictors, strict=True):
        scored.append((name, LESAConfig(predictor=predictor, count_flops=False)))
    for name, cfg in scored:
        values = latent_errors(trainer, cfg, steps)
        print(f"{name:>40s}  " + "  ".join(f"{v:8.2f}" for v in values), flush=True)


if __name__ == "__main__":
    main()
