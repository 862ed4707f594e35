"""Beyond the paper: the full-step correction (`lesa.correction`) on fixed forecasters and on trained predictors.

Closed-loop PSNR of the final latent against the recording (the trainer's own score), per trajectory, for one
forecaster without and with corrections of given strengths, paired per trajectory. Run it on a recording of prompts
that neither trains a predictor nor is evaluated: `--write-prompts` writes 300 captions of the embedded model's own
training scenes (never a predictor-training or evaluation scene), which `lesa record` then records:

    python benchmarks/correction.py --write-prompts runs/screen_prompts.txt
    lesa record --model embedded --prompts runs/screen_prompts.txt --out runs/rec-screen --steps 50 --seed 1000
    python benchmarks/correction.py --data runs/rec-screen --method damped --fit-data runs/rec-embedded \\
        --strengths 10:1/3,17:1/3 10:1/3 10:1/3,17:1/6
"""

from __future__ import annotations

import math
import random
import statistics
from fractions import Fraction
from pathlib import Path

from harness import comma_list, held_out_scorer, make_parser, parse

from lesa.calibrate import fit_damping
from lesa.config import FORAConfig, LESAConfig, TaylorSeerConfig
from lesa.embedded import scenes
from lesa.predictor import LESAPredictor
from lesa.recording import Recording
from lesa.schedule import StepSchedule
from lesa.training import split_indices


def screen_prompts(count: int = 300, seed: int = 7) -> list[str]:
    """`count` captions of the model's training scenes, in a seeded order."""
    prompts = scenes.prompts("train")
    random.Random(seed).shuffle(prompts)
    return prompts[:count]


def parse_strengths(text: str) -> dict[int, float]:
    """Parse `10:1/3,17:0.2` into {10: 0.333.., 17: 0.2}."""
    out = {}
    for item in text.split(","):
        step, value = item.split(":")
        out[int(step)] = float(Fraction(value))
    return out


def paired(a: list[float], b: list[float], jump: float = 6.0) -> str:
    d = [x - y for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(d) / math.sqrt(len(d))
    big = [x for x in d if abs(x) > jump]
    return (
        f"{sum(d) / len(d):+.2f} ± {se:.2f} (median {statistics.median(d):+.2f}; "
        f"{sum(big) / len(d):+.2f} of the mean from {len(big)} beyond ±{jump:g} dB)"
    )


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--write-prompts", help="write the screening prompts to this file and stop")
    parser.add_argument("--data", help="recording to score on (every trajectory of it)")
    parser.add_argument("--method", default="damped", help="fora, damped or a predictor directory")
    parser.add_argument("--fit-data", help="recording whose training split fits the damping (method damped)")
    parser.add_argument("--interval", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--full", default="", help="explicit full steps after the warm-up, e.g. 8,17,28,39")
    parser.add_argument("--strengths", nargs="*", default=[], help="corrections to score, each STEP:STRENGTH,...")
    parser.add_argument("--limit", type=int, default=None, help="score the first L trajectories only")
    args = parse(parser, threads=2)
    if args.write_prompts:
        path = Path(args.write_prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{p}\n" for p in screen_prompts()), encoding="utf-8")
        print(f"wrote {path}")
        return
    explicit = tuple(comma_list(args.full, int))
    schedule = StepSchedule(args.interval, args.warmup, explicit=explicit)
    predictor = None
    if args.method not in ("fora", "damped"):
        predictor = LESAPredictor.from_pretrained(args.method)
        schedule = predictor.config.schedule()
    scorer = held_out_scorer(args.data)
    indices = list(range(len(scorer.data.rec)))[: args.limit]
    kw = dict(
        interval=schedule.interval, warmup=schedule.warmup, explicit_full_steps=schedule.explicit, count_flops=False
    )

    damping = None
    if args.method == "damped":  # fitted once, on the fitting recording's training split
        fit = Recording(args.fit_data)
        train, _ = split_indices(len(fit), 0.2, [e["prompt"] for e in fit.entries])
        damping = fit_damping(fit, schedule, train)

    def config(correction: dict[int, float]):
        if args.method == "fora":
            return FORAConfig(**kw, correction=correction)
        if args.method == "damped":
            return TaylorSeerConfig(order=1, damping=damping, **kw, correction=correction)
        return LESAConfig(predictor=predictor, count_flops=False, learned_correction=False, correction=correction)

    print(f"{args.method} on {len(indices)} trajectories of {args.data}, full steps {schedule.full_steps(50)}")
    base = [p for _, p in scorer.trajectory_errors(config({}), indices)]
    print(f"{'no correction':>32s}: mean PSNR {sum(base) / len(base):.2f} dB", flush=True)
    if predictor is not None and predictor.config.correction:
        own = LESAConfig(predictor=predictor, count_flops=False)
        scores = [p for _, p in scorer.trajectory_errors(own, indices)]
        print(f"{'its learned correction':>32s}: mean PSNR {sum(scores) / len(scores):.2f} dB, {paired(scores, base)}")
    for text in args.strengths:
        scores = [p for _, p in scorer.trajectory_errors(config(parse_strengths(text)), indices)]
        print(f"{text:>32s}: mean PSNR {sum(scores) / len(scores):.2f} dB, {paired(scores, base)}", flush=True)


if __name__ == "__main__":
    main()
