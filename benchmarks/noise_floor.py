"""How large a PSNR difference can a tiny change of the forecaster make? The resolution of a benchmark comparison.

Damped TaylorSeer O1 with its fitted damping g, and the same method with g changed by a relative fraction (default
±1 % and ±2 %), on the embedded model's evaluation prompts (prompt i, seed i, as `lesa bench`). A 1 % change of one
scalar moves every forecast by well under 1 % of its step; any mean PSNR difference it makes is the chaotic
sensitivity of the sampler, not a better or worse forecaster, and sets the floor below which two methods' (or two
seeds') means cannot be told apart on these prompts.

    python benchmarks/noise_floor.py --interval 7 --damping 0.5308 --limit 200
"""

from __future__ import annotations

import time

import numpy as np
import torch
from harness import comma_list, make_parser, parse

import lesa
from lesa.config import TaylorSeerConfig
from lesa.embedded.loading import SHIPPED_DIR
from lesa.evaluate.bench import mean_se
from lesa.evaluate.metrics import psnr
from lesa.pipelines import load_pipeline
from lesa.record import read_prompts

EVAL_PROMPTS = SHIPPED_DIR.parent / "prompts" / "eval.txt"


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--interval", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--damping", type=float, required=True, help="the fitted damping g (lesa bench's results.json)")
    parser.add_argument("--changes", default="-0.02,-0.01,0.01,0.02", help="relative changes of g")
    parser.add_argument("--limit", type=int, default=200, help="first N evaluation prompts")
    parser.add_argument("--steps", type=int, default=50)
    args = parse(parser, threads=1)
    prompts = read_prompts(EVAL_PROMPTS)[: args.limit]
    changes = comma_list(args.changes, float)
    pipe = load_pipeline("embedded", "cpu")

    def generate(prompt: str, seed: int, damping: float | None) -> np.ndarray:
        if damping is not None:
            lesa.enable(pipe, TaylorSeerConfig(interval=args.interval, warmup=args.warmup, damping=damping))
        try:
            generator = torch.Generator().manual_seed(seed)
            image = pipe(prompt=prompt, generator=generator, num_inference_steps=args.steps, output_type="pil")
        finally:
            lesa.disable(pipe)
        return np.array(image.images[0].convert("RGB"))

    dampings = {0.0: args.damping, **{c: args.damping * (1 + c) for c in changes}}
    scores: dict[float, list[float]] = {c: [] for c in dampings}
    start = time.time()
    for i, prompt in enumerate(prompts):
        reference = generate(prompt, i, None)
        for c, g in dampings.items():
            scores[c].append(psnr(generate(prompt, i, g), reference))
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(prompts)} prompts, {time.time() - start:.0f} s", flush=True)

    base = np.array(scores[0.0])
    mean, se = mean_se(list(base))
    print(f"\n{len(prompts)} prompts, {args.steps} steps, interval {args.interval}, warm-up {args.warmup}")
    print(f"damped TaylorSeer O1, g = {args.damping:.4f}: PSNR {mean:.2f} ± {se:.2f} dB")
    print(f"{'change of g':>12s} {'g':>8s} {'PSNR':>8s} {'minus g':>16s} {'|per-prompt diff| median':>26s}")
    for c in changes:
        values = np.array(scores[c])
        diff = values - base
        finite = diff[np.isfinite(diff)]
        d_mean, d_se = mean_se(list(finite))
        print(
            f"{c:+12.1%} {dampings[c]:8.4f} {mean_se(list(values))[0]:8.2f} {d_mean:+9.2f} ± {d_se:.2f}"
            f" {np.median(np.abs(finite)):26.2f}"
        )


if __name__ == "__main__":
    main()
