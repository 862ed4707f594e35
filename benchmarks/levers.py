"""Beyond the paper: train predictor variants (levers) on the embedded model and compare them on held-out trajectories.

Every variant is trained with `lesa train`'s own code on one recording of the predictor-training prompts; the
held-out split of those prompts (never the evaluation prompts) scores it: final-latent PSNR against full compute,
closed loop, beside FORA, TaylorSeer O1 and TaylorSeer O1 with a damping fitted on the training split. Evaluate the
chosen variants on the evaluation prompts with `lesa bench` afterwards. Trained variants are kept under --out, so a
rerun resumes.

    python benchmarks/levers.py --data runs/rec-embedded --out runs/levers --intervals 7,10 --seeds 0,1
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from harness import comma_list, make_parser, parse, table_head, table_row

from lesa.pipelines import load_pipeline
from lesa.recording import Recording
from lesa.training import RECIPES, TrainConfig, Trainer

BASE = dict(warmup=3, batch_size=10)
FULL = dict(memory="full", gain_init="damped", windows=(3, 3, 3), history=3, select="psnr")
# name -> (TrainConfig overrides on top of BASE, description)
VARIANTS: dict[str, tuple[dict, str]] = {
    "paper": (dict(RECIPES["paper"], epochs_gt=2, epochs_clar=6), "paper recipe (memory of steps, start at reuse)"),
    "paper+psnr": (
        dict(RECIPES["paper"], epochs_gt=2, epochs_clar=6, select="psnr", lr_clar=1e-3),
        "paper recipe, checkpoint by PSNR, closed-loop lr 1e-3",
    ),
    "full": (dict(FULL, phases=("clar",), epochs_clar=4), "full-step memory, start at damped TS, step loss"),
    "full+cycle": (
        dict(FULL, phases=("clar",), epochs_clar=4, loss="cycle"),
        "full-step memory, start at damped TS, cycle loss",
    ),
    "full+cycle+output": (
        dict(FULL, phases=("clar",), epochs_clar=4, loss="cycle", target="output"),
        "full-step memory, start at damped TS, cycle loss on the transformer output",
    ),
    "full+cycle-e6": (
        dict(FULL, phases=("clar",), epochs_clar=6, loss="cycle"),
        "full-step memory, start at damped TS, cycle loss, 6 epochs",
    ),
    "full+cycle-lr1e-3": (
        dict(FULL, phases=("clar",), epochs_clar=4, loss="cycle", lr_clar=1e-3),
        "full-step memory, start at damped TS, cycle loss, lr 1e-3",
    ),
    "paper+cycle": (
        dict(RECIPES["paper"], epochs_gt=2, epochs_clar=6, loss="cycle", select="psnr"),
        "paper recipe with the cycle loss, checkpoint by PSNR",
    ),
    "full+final": (
        dict(FULL, phases=("clar",), epochs_clar=8, lr_clar=1e-3, loss="final"),
        "full-step memory, start at damped TS, final-latent loss, 8 epochs at lr 1e-3",
    ),
    "full+gt": (dict(FULL, phases=("gt", "clar"), epochs_gt=2, epochs_clar=4), "full-step memory, gt then clar"),
    "full+k2": (
        dict(FULL, windows=(2, 2, 2), history=2, phases=("clar",), epochs_clar=4, loss="cycle", target="output"),
        "full+cycle+output with K = 2 (a learned per-step damped TS)",
    ),
}


def main() -> None:
    parser = make_parser(__doc__, data="recording of the predictor-training prompts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--intervals", default="7,10")
    parser.add_argument("--seeds", default="0,1")
    args = parse(parser)

    out = Path(args.out)
    rec = Recording(args.data)
    pipe = load_pipeline(rec.settings["model"])
    rows = []
    for name in comma_list(args.variants):
        overrides, description = VARIANTS[name]
        for interval in comma_list(args.intervals, int):
            runs = []
            for seed in comma_list(args.seeds, int):
                directory = out / f"{name}-n{interval}-seed{seed}"
                if not (directory / "training_log.json").is_file():
                    cfg = TrainConfig(**{**BASE, **overrides, "interval": interval, "seed": seed})
                    Trainer(rec, pipe, directory, cfg).run()
                runs.append(json.loads((directory / "training_log.json").read_text()))
            val = [r["validation"] for r in runs]
            lesa = [v["LESA (this predictor)"]["psnr"] for v in val]
            damped = next(k for k in val[0] if k.startswith("TaylorSeer O1 damped"))
            row = {
                "variant": name,
                "description": description,
                "interval": interval,
                "seeds": [int(r["best_seed"]) for r in runs],
                "psnr": lesa,
                "psnr_mean": statistics.fmean(lesa),
                "best_at": [r["seeds"][str(r["best_seed"])]["best_at"] for r in runs],
                "taylorseer_o1": val[0]["TaylorSeer O1"]["psnr"],
                "damped": val[0][damped]["psnr"],
                "damping": damped,
                "fora": val[0]["FORA"]["psnr"],
            }
            rows.append(row)
            (out / "levers.json").write_text(json.dumps(rows, indent=1) + "\n")
    table_head("variant", "N", "held-out PSNR per seed (dB)", "mean", "vs damped TS", "vs TS O1", "kept checkpoint")
    for r in rows:
        mean = r["psnr_mean"]
        table_row(
            r["description"],
            r["interval"],
            ", ".join(f"{p:.2f}" for p in r["psnr"]),
            f"{mean:.2f}",
            f"{mean - r['damped']:+.2f}",
            f"{mean - r['taylorseer_o1']:+.2f}",
            ", ".join(r["best_at"]),
        )
    print("baselines on the same held-out trajectories:")
    for interval in sorted({r["interval"] for r in rows}):
        r = next(r for r in rows if r["interval"] == interval)
        print(f"  N={interval}: FORA {r['fora']:.2f}, TS O1 {r['taylorseer_o1']:.2f}, {r['damping']} {r['damped']:.2f}")


if __name__ == "__main__":
    main()
