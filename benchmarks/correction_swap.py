"""A schedule-free predictor on one (steps, speed-up) cell with its learned full-step correction, with the calibrated
fixed correction in its place (a third at the first two cache cycles after the warm-up, `correction.first_cycles`),
and with none; FORA on the same full steps with and without the fixed correction. Image PSNR against full compute
per evaluation prompt (prompt i with seed i, as `lesa bench`), paired against FORA with the correction, with the
median and the 10 % trimmed mean of the differences beside their mean (a few prompts move by 10-25 dB either way).

    python benchmarks/correction_swap.py --steps 20 --speedup 2.5 --limit 100
"""

from __future__ import annotations

import functools
import statistics

import numpy as np
import torch
from harness import make_parser, parse, table_head, table_row
from tqdm.auto import tqdm

import lesa
from lesa.correction import DEFAULT_CYCLES, DEFAULT_STRENGTH, first_cycles
from lesa.evaluate.bench import mean_se
from lesa.evaluate.methods import baseline_config
from lesa.evaluate.metrics import psnr
from lesa.pipelines import load_pipeline, shipped_predictor
from lesa.predictor import load_predictor
from lesa.record import read_prompts
from lesa.schedule import full_step_count


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--predictor", default=None, help="a schedule-free predictor (default: the shipped one)")
    parser.add_argument("--prompts", default="src/lesa/embedded/prompts/eval.txt")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--speedup", type=float, default=2.5)
    args = parse(parser, threads=1)
    predictor = load_predictor(args.predictor or shipped_predictor())
    pc = predictor.config
    pipe = load_pipeline(pc.base_model, "cpu", pc.dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(args.steps)
    placement = pc.placement([float(s) for s in pipe.scheduler.sigmas], full_step_count(args.steps, args.speedup))
    full = placement.full_steps(args.steps)
    fixed = first_cycles(full, placement.warmup, DEFAULT_STRENGTH, DEFAULT_CYCLES)
    ours = functools.partial(lesa.LESAConfig, predictor=predictor, speedup=args.speedup, count_flops=False)
    methods = {
        "LESA (learned correction)": ours(),
        "LESA, fixed correction instead": ours(correction=fixed),
        "LESA, no correction": ours(learned_correction=False),
        "FORA": baseline_config("fora", placement),
        "FORA + correction": baseline_config("fora", placement, correction=fixed),
    }
    prompts = read_prompts(args.prompts)[: args.limit]

    def generate(prompt: str, seed: int) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(prompt=prompt, generator=generator, num_inference_steps=args.steps, output_type="pil")
        return np.array(out.images[0].convert("RGB"))

    scores: dict[str, list[float]] = {name: [] for name in methods}
    for i, prompt in enumerate(tqdm(prompts, desc="prompts")):
        reference = generate(prompt, i)
        for name, config in methods.items():
            lesa.enable(pipe, config)
            try:
                scores[name].append(psnr(reference, generate(prompt, i)))
            finally:
                lesa.disable(pipe)
    print(f"{args.steps} steps x{args.speedup:g}, full steps {full}, {len(prompts)} prompts; fixed correction {fixed}")
    table_head("method", "PSNR (dB)", "minus FORA + correction", "median", "10 % trimmed mean")
    base = scores["FORA + correction"]
    for name, values in scores.items():
        diff = sorted(a - b for a, b in zip(values, base, strict=True))
        cut = len(diff) // 10
        trimmed = statistics.mean(diff[cut : len(diff) - cut])
        m, se = mean_se(diff)
        table_row(
            name,
            f"{statistics.mean(values):.2f}",
            f"{m:+.2f} ± {se:.2f}",
            f"{statistics.median(diff):+.2f}",
            f"{trimmed:+.2f}",
        )


if __name__ == "__main__":
    main()
