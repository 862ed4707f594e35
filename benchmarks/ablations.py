"""The paper's ablations on the embedded model: stage split x temporal gain network, GT-only vs GT + CL-AR, N sweep.

Each variant is trained with `lesa train`'s own code on one recording (the predictor-training prompts), then
measured with `lesa bench` (LESA and TaylorSeer O1 at the variant's schedule) on evaluation prompts; the table gives
PSNR against full compute (mean ± s.e. over prompts) and the paired difference to TaylorSeer O1. Trained variants and
bench results are kept under --out, so a rerun resumes where it stopped.

    python benchmarks/ablations.py --data runs/rec-embedded --prompts src/lesa/embedded/prompts/eval.txt \\
        --out runs/ablations --limit 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lesa.evaluate.bench import Bench, BenchConfig
from lesa.io import atomic_write_text
from lesa.models import load_pipeline
from lesa.record import Recording
from lesa.train import TrainConfig, Trainer

# name -> (TrainConfig overrides, description)
BASE = dict(interval=7, warmup=3, epochs_gt=2, epochs_clar=6, batch_size=10)
VARIANTS: dict[str, tuple[dict, str]] = {
    "split+kan": ({}, "stage split 0.9/0.5, KAN gain (LESA)"),
    "split+mlp": ({"gain": "mlp"}, "stage split, MLP gain"),
    "single+kan": ({"thresholds": (), "windows": (8,)}, "one expert, KAN gain"),
    "single+mlp": ({"thresholds": (), "windows": (8,), "gain": "mlp"}, "one expert, MLP gain"),
    "gt-only": ({"phases": ("gt",)}, "phase 1 only (no closed loop)"),
    **{f"n{n}": ({"interval": n}, f"N = {n}") for n in (5, 6, 8, 10)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="recording of the predictor-training prompts")
    parser.add_argument("--prompts", required=True, help="evaluation prompts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="pipeline (default: the recording's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--limit", type=int, default=50, help="evaluation prompts used")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out)
    rec = Recording(args.data)
    model = args.model or rec.settings["model"]
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    table = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        overrides, description = VARIANTS[name]
        predictor_dir = out / f"{name}-seed{args.seed}"
        if not (predictor_dir / "config.json").is_file():
            cfg = TrainConfig(**{**BASE, **overrides, "seed": args.seed})
            Trainer(rec, pipe, predictor_dir, cfg).run()
        bench_dir = out / f"{name}-seed{args.seed}-bench"
        if not (bench_dir / "results.json").is_file():
            bench = BenchConfig(
                prompts=args.prompts,
                out=str(bench_dir),
                model=model,
                predictors=[str(predictor_dir)],
                methods=["lesa", "taylorseer-o1"],
                limit=args.limit,
                repeats=1,
                timing_prompts=1,
            )
            Bench(bench)()
        rows = {r["family"]: r for r in json.loads((bench_dir / "results.json").read_text())["rows"]}
        lesa_row, ts = rows["lesa"], rows["taylorseer-o1"]
        table.append(
            {
                "variant": name,
                "description": description,
                "budget": lesa_row["budget"],
                "psnr": lesa_row["psnr"],
                "taylorseer_o1_psnr": ts["psnr"],
                "psnr_vs_taylorseer_o1": lesa_row["psnr_vs_taylorseer_o1"],
                "ssim": lesa_row["ssim"],
            }
        )
        atomic_write_text(out / "ablations.json", json.dumps(table, indent=1) + "\n")
    print(f"| variant | budget | LESA PSNR (dB) | TaylorSeer O1 PSNR | ΔPSNR vs TS O1 | SSIM |  ({args.limit} prompts)")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['description']} | {r['budget']} | {r['psnr'][0]:.2f} ± {r['psnr'][1]:.2f} | "
            f"{r['taylorseer_o1_psnr'][0]:.2f} | {r['psnr_vs_taylorseer_o1'][0]:+.2f} ± "
            f"{r['psnr_vs_taylorseer_o1'][1]:.2f} | {r['ssim'][0]:.4f} |"
        )


if __name__ == "__main__":
    main()
