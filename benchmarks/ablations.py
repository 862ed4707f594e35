"""The paper's ablations on the embedded model: stage split x temporal gain network, GT-only vs GT + CL-AR, N sweep.

Each variant is trained with `lesa train`'s own code on one recording (the predictor-training prompts), then
measured with `lesa bench` (LESA and TaylorSeer O1 at the variant's schedule) on evaluation prompts; the table gives
PSNR against full compute (mean over seeds, ± s.e. over prompts), the seeds' spread and the paired difference to
TaylorSeer O1. Trained variants and bench results are kept under --out, so a rerun resumes where it stopped.

    python benchmarks/ablations.py --data runs/rec-embedded --prompts src/lesa/embedded/prompts/eval.txt \\
        --out runs/ablations --limit 50
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from harness import comma_list, make_parser, parse, table_head, table_row

from lesa.evaluate.bench import Bench, BenchConfig
from lesa.io import atomic_write_text
from lesa.pipelines import load_pipeline
from lesa.recording import Recording
from lesa.training import TrainConfig, Trainer

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


def _psnr(bench_dir: Path, family: str) -> list[float]:
    """Per-prompt PSNR of the one run of `family` ("LESA" or "TaylorSeer O1") in a bench directory."""
    runs = json.loads((bench_dir / "results.json").read_text())["runs"]
    (name,) = [k for k in runs if k.startswith(family + " N=")]
    return runs[name]["per_prompt"]["psnr"]


def _mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = make_parser(__doc__, data="recording of the predictor-training prompts")
    parser.add_argument("--prompts", required=True, help="evaluation prompts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="pipeline (default: the recording's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--limit", type=int, default=50, help="evaluation prompts used")
    parser.add_argument("--seeds", default="0,1", help="training seeds per variant (the first also runs TaylorSeer O1)")
    args = parse(parser)

    out = Path(args.out)
    rec = Recording(args.data)
    model = args.model or rec.settings["model"]
    pipe = load_pipeline(model)
    seeds = comma_list(args.seeds, int)
    table = []
    for name in comma_list(args.variants):
        overrides, description = VARIANTS[name]
        per_seed = []
        for seed in seeds:
            predictor_dir = out / f"{name}-seed{seed}"
            if not (predictor_dir / "config.json").is_file():
                cfg = TrainConfig.from_recipe("paper", **{**BASE, **overrides, "seed": seed})
                Trainer(rec, pipe, predictor_dir, cfg).run()
            bench_dir = out / f"{name}-seed{seed}-bench"
            if not (bench_dir / "results.json").is_file():
                bench = BenchConfig(
                    prompts=args.prompts,
                    out=str(bench_dir),
                    model=model,
                    predictors=[str(predictor_dir)],
                    # TaylorSeer O1 does not depend on the seed: run it once, with the first seed
                    methods=["lesa", "taylorseer-o1"] if seed == seeds[0] else ["lesa"],
                    limit=args.limit,
                    repeats=1,
                    timing_prompts=1,
                )
                Bench(bench)()
            per_seed.append(_psnr(bench_dir, "LESA"))
        ts = _psnr(out / f"{name}-seed{seeds[0]}-bench", "TaylorSeer O1")
        lesa = [statistics.fmean(p) for p in zip(*per_seed, strict=True)]  # per prompt, mean over seeds
        seed_means = [statistics.fmean(p) for p in per_seed]
        budget = json.loads((out / f"{name}-seed{seeds[0]}-bench" / "results.json").read_text())["rows"][1]["budget"]
        table.append(
            {
                "variant": name,
                "description": description,
                "budget": budget,
                "seeds": seeds,
                "psnr": _mean_se(lesa),
                "psnr_per_seed": seed_means,
                "seed_spread": statistics.stdev(seed_means) if len(seeds) > 1 else 0.0,
                "taylorseer_o1_psnr": _mean_se(ts),
                "psnr_vs_taylorseer_o1": _mean_se([a - b for a, b in zip(lesa, ts, strict=True)]),
            }
        )
        atomic_write_text(out / "ablations.json", json.dumps(table, indent=1) + "\n")
    table_head(
        "variant", "budget", f"LESA PSNR (dB), seeds {args.seeds}", "seed spread", "TaylorSeer O1", "ΔPSNR vs TS O1"
    )
    for r in table:
        diff = r["psnr_vs_taylorseer_o1"]
        table_row(
            r["description"],
            r["budget"],
            f"{r['psnr'][0]:.2f} ± {r['psnr'][1]:.2f} ({', '.join(f'{m:.2f}' for m in r['psnr_per_seed'])})",
            f"{r['seed_spread']:.2f}",
            f"{r['taylorseer_o1_psnr'][0]:.2f}",
            f"{diff[0]:+.2f} ± {diff[1]:.2f}",
        )


if __name__ == "__main__":
    main()
