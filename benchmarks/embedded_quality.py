"""Prompt-following share of the embedded model and image PSNR of cached methods against full compute.

For every prompt (seed = prompt index) the full 50-step image is generated, then each method's image from the same
noise; the checker scores every image against its caption, and PSNR / standard error are measured against the full
image. Example (the figures in the embedded model's card):

    python benchmarks/embedded_quality.py --prompts src/lesa/embedded/prompts/eval.txt \
        --predictor src/lesa/embedded/predictors/n7 --predictor src/lesa/embedded/predictors/n10 --out runs/quality.json
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from harness import make_parser, table_head, table_row
from tqdm.auto import tqdm

import lesa
from lesa.embedded.checker import check_caption
from lesa.embedded.loading import load_embedded
from lesa.io import atomic_write_text
from lesa.record import read_prompts


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def mean_se(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    m = sum(finite) / len(finite)
    var = sum((v - m) ** 2 for v in finite) / max(1, len(finite) - 1)
    return m, math.sqrt(var / len(finite))


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--model", default=None, help="embedded model directory (default: the shipped one)")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--predictor", action="append", default=[], help="LESA predictor directory (repeatable)")
    parser.add_argument("--baselines", action="store_true", help="also FORA and TaylorSeer O1 at each schedule")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=None, help="write every number to this JSON file")
    parser.add_argument("--grid", default=None, help="write a PNG grid of the first 8 prompts (a column per method)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    pipe = load_embedded(args.model) if args.model else load_embedded()
    pipe.set_progress_bar_config(disable=True)
    prompts = read_prompts(args.prompts)[: args.limit]
    methods: dict[str, lesa.CacheConfig] = {"full": lesa.NoCacheConfig(count_flops=False)}
    for directory in args.predictor:
        config = lesa.LESAConfig(predictor=directory, count_flops=False).resolve()
        tag = f"N={config.interval}"
        methods[f"LESA {tag} ({Path(directory).name})"] = config
        if args.baselines:
            sched = dict(interval=config.interval, warmup=config.warmup, count_flops=False)
            methods[f"FORA {tag}"] = lesa.FORAConfig(**sched)
            methods[f"TaylorSeer O1 {tag}"] = lesa.TaylorSeerConfig(order=1, **sched)
    images: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    full_steps: dict[str, int] = {}
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    batches = [list(range(i, min(i + args.batch, len(prompts)))) for i in range(0, len(prompts), args.batch)]
    with tqdm(total=len(batches) * len(methods), desc="generate", unit="batch") as bar:
        for batch in batches:
            noise = torch.stack([torch.randn(256, 12, generator=torch.Generator().manual_seed(i)) for i in batch])
            for name, config in methods.items():
                lesa.enable(pipe, config)
                start = time.perf_counter()
                out = pipe([prompts[i] for i in batch], num_inference_steps=args.steps, latents=noise, output_type="np")
                seconds[name] += time.perf_counter() - start
                images[name].extend(out.images)
                full_steps[name] = lesa.summary(pipe)["full_steps"]
                lesa.disable(pipe)
                bar.update(1)

    results = {"prompts": args.prompts, "n": len(prompts), "steps": args.steps, "methods": {}}
    for name in methods:
        checks = [check_caption(img, p) for img, p in zip(images[name], prompts, strict=True)]
        psnrs = [psnr(img, ref) for img, ref in zip(images[name], images["full"], strict=True)]
        m, se = mean_se(psnrs) if name != "full" else (float("inf"), 0.0)
        results["methods"][name] = {
            "full_steps": full_steps[name],
            "trunk_speedup": args.steps / full_steps[name],
            "prompt_following": {k: sum(c[k] for c in checks) / len(checks) for k in checks[0]},
            "psnr_mean": m,
            "psnr_se": se,
            "psnr_per_prompt": psnrs,
            "seconds": seconds[name],
        }
    print(f"{len(prompts)} prompts from {args.prompts}, {args.steps} steps, seed = prompt index")
    table_head("method", "full steps", "trunk speed-up", "prompt-following (all)", "PSNR vs full (dB, mean +/- s.e.)")
    for name, r in results["methods"].items():
        psnr_text = "-" if name == "full" else f"{r['psnr_mean']:.2f} +/- {r['psnr_se']:.2f}"
        table_row(name, r["full_steps"], f"{r['trunk_speedup']:.2f}x", f"{r['prompt_following']['all']:.3f}", psnr_text)
    print("per-attribute shares (full):", json.dumps(results["methods"]["full"]["prompt_following"]))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    if args.grid:
        save_grid(args.grid, images, prompts)


def save_grid(path: str, images: dict[str, list[np.ndarray]], prompts: list[str], rows: int = 8) -> None:
    """Rows: prompts; columns: methods (full compute first); each 32x32 image scaled x4, caption printed beside."""
    from PIL import Image, ImageDraw

    rows = min(rows, len(prompts))
    scale, pad, text_width = 4, 4, 420
    side = images["full"][0].shape[0] * scale
    names = list(images)
    width = text_width + len(names) * (side + pad)
    height = 18 + rows * (side + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((text_width + j * (side + pad), 2), name[:22], fill="black")
    for i in range(rows):
        y = 18 + i * (side + pad)
        draw.text((4, y + side // 2 - 6), prompts[i][:70], fill="black")
        for j, name in enumerate(names):
            tile = Image.fromarray(np.asarray(images[name][i])).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (text_width + j * (side + pad), y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    main()
