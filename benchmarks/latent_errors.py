"""Held-out PSNR of the latent at every full step, not only the final one: where along the sampler a forecaster's
error builds up.

Runs `lesa train`'s closed loop on the held-out split of a recording that holds per-step latents (`lesa record`
stores them) and scores, per predictor and for damped TaylorSeer O1 on the same steps, the latent entering each full
step after the warm-up (the end of each cache cycle) and the final latent against the recording; the mean over the
held-out trajectories of each, in dB (peak: the reference latent's range, as `lesa train` scores the final one).

    python benchmarks/latent_errors.py src/lesa/embedded/predictors/n7 runs/lc2-n7-s0 --data runs/rec-lat
"""

from __future__ import annotations

from harness import make_parser, parse

from lesa.config import CacheConfig, LESAConfig
from lesa.evaluate.methods import baseline_config
from lesa.predictor import LESAPredictor
from lesa.recording import Recording
from lesa.training import Scorer, latent_psnr
from lesa.training.start import Fits


def latent_errors(scorer: Scorer, config: CacheConfig, steps: list[int]) -> list[float]:
    """Mean held-out PSNR of the latent entering each of `steps`, then of the final latent, running `config`."""
    sums = [0.0] * (len(steps) + 1)
    for d, final, latents in scorer.rollouts(config, scorer.data.val_idx, steps):
        for j, step in enumerate(steps):
            sums[j] += latent_psnr(latents[step], d["latents"][step])
        sums[-1] += latent_psnr(final, d["final"])
    return [s / len(scorer.data.val_idx) for s in sums]


def main() -> None:
    parser = make_parser(__doc__, data="a `lesa record` directory with per-step latents", val_fraction=True)
    parser.add_argument("predictors", nargs="+", help="predictor directories of one schedule")
    args = parse(parser, threads=1)
    predictors = [LESAPredictor.from_pretrained(d) for d in args.predictors]
    rec = Recording(args.data)
    if "latents" not in rec.shapes:
        raise SystemExit(f"{args.data} holds no per-step latents: record it again with this lesa")
    scorer = Scorer.for_recording(rec, args.val_fraction)
    pc = predictors[0].config
    schedule = pc.schedule()
    steps = [s for s in schedule.full_steps(pc.num_steps) if s > pc.warmup]  # the full steps closing each cycle
    print(
        f"held-out split: {len(scorer.data.val_idx)} trajectories of {args.data}; mean PSNR (dB) of the latent entering"
    )
    print(f"{'':>40s}  " + "  ".join(f"{f'step {s}':>8s}" for s in steps) + f"  {'final':>8s}")
    damped = baseline_config("taylorseer-damped", schedule, damping=Fits(scorer.data).damping(schedule))
    scored = [("TaylorSeer O1 damped", damped)]
    for name, predictor in zip(args.predictors, predictors, strict=True):
        scored.append((name, LESAConfig(predictor=predictor, count_flops=False)))
    for name, cfg in scored:
        values = latent_errors(scorer, cfg, steps)
        print(f"{name:>40s}  " + "  ".join(f"{v:8.2f}" for v in values), flush=True)


if __name__ == "__main__":
    main()
