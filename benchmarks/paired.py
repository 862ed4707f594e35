"""Paired per-prompt differences between LESA and every other method of the same full-step count, from the
`results.json` of one or more `lesa bench` runs over the same prompts and seeds.

    python benchmarks/paired.py docs/bench-embedded-200/results.json [runs/other-bench/results.json ...]

For each LESA row (the mean over its training seeds, per prompt) and each other method with as many full steps:
the mean difference ± its standard error over prompts, the difference of each seed, on how many prompts LESA
is ahead, the median difference, and how much of the mean comes from prompts whose difference exceeds --jump dB
either way (an image that lands on another mode of the sampler moves by about 10-15 dB). LESA predictors whose
directory names differ only by a seed suffix (`-s1`, `-seed1`) are the seeds of one row; other predictors under the
same row name (e.g. two variants benched together) get a row each, named by their directory. LESA rows of later
files are named by that directory too, so the seeds of one variant benched in several runs form one row, and they
are also paired with every other LESA row of as many full steps: the first file's (e.g. the shipped predictors),
then those of the later files (e.g. two candidates benched in separate runs). A baseline row name already read is
not read again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

from harness import table_head, table_row

from lesa.evaluate.bench import mean_se
from lesa.evaluate.methods import SEED_SUFFIX


def variant(predictor: str | None) -> str:
    """The predictor directory's name without a seed suffix: runs/th3-n7-s1 -> th3-n7."""
    return SEED_SUFFIX.sub("", Path(str(predictor)).name)


def load_runs(paths: list[Path], metric: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """LESA rows (label -> {"count", "seeds": {seed: per-prompt}}) and the other methods (row -> {count, values})."""
    lesa: dict[str, dict] = {}
    others: dict[str, dict] = {}
    n_prompts = None
    for i, path in enumerate(paths):
        try:
            results = json.loads(path.read_text())
            runs = results["runs"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SystemExit(f"{path}: not a `lesa bench` results.json ({e})") from e
        if n_prompts is not None and results["n_prompts"] != n_prompts:
            raise SystemExit(f"{path}: {results['n_prompts']} prompts, the first file has {n_prompts}: not paired")
        n_prompts = results["n_prompts"]
        variants: dict[str, set[str]] = {}
        for run in runs.values():
            if run["family"] == "lesa":
                variants.setdefault(run["row"], set()).add(variant(run["seed"]))
        for run in runs.values():
            values = run["per_prompt"].get(metric)
            if run["budget"] is None or values is None:
                continue  # the reference
            count = int(run["budget"].split("/")[0])
            if run["family"] == "lesa":
                if i > 0:
                    label = f"{run['row']} ({variant(run['seed'])})"
                elif len(variants[run["row"]]) > 1:
                    label = f"{run['row']} [{variant(run['seed'])}]"
                else:
                    label = run["row"]
                row = lesa.setdefault(label, {"count": count, "seeds": {}, "first": i == 0})
                row["seeds"][run["seed"]] = values
            elif run["row"] not in others:
                others[run["row"]] = {"count": count, "values": values}
    return lesa, others


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json of `lesa bench` runs, same prompts")
    parser.add_argument("--metric", default="psnr", help="per-prompt metric to pair (psnr, ssim, ...)")
    parser.add_argument("--jump", type=float, default=6.0, help="a difference beyond this counts as a jump")
    args = parser.parse_args(argv)
    lesa, others = load_runs(args.results, args.metric)
    columns = ["LESA row (seed mean; seeds)", "other method", f"its {args.metric}", "LESA minus it (± s.e.; seeds)"]
    table_head(*columns, "prompts LESA leads", f"median; share of the mean from jumps (beyond ±{args.jump:g} dB)")
    for row in lesa.values():
        row["mean"] = [sum(v) / len(v) for v in zip(*row["seeds"].values(), strict=True)]
    rows = {label: {"count": row["count"], "values": row["mean"]} for label, row in lesa.items()}
    for label, row in lesa.items():
        seeds = list(row["seeds"].values())
        mean_per_prompt = row["mean"]
        own = ", ".join(f"{mean_se(s)[0]:.2f}" for s in seeds)
        head = f"{label}: {mean_se(mean_per_prompt)[0]:.2f} ({own})"
        lesa_rows = {} if row["first"] else {name: other for name, other in rows.items() if name != label}
        for name, other in {**others, **lesa_rows}.items():
            if other["count"] != row["count"]:
                continue
            diff = [a - b for a, b in zip(mean_per_prompt, other["values"], strict=True)]
            m, se = mean_se(diff)
            per_seed = ", ".join(
                f"{mean_se([a - b for a, b in zip(s, other['values'], strict=True)])[0]:+.2f}" for s in seeds
            )
            wins = sum(d > 0 for d in diff)
            jumps = [d for d in diff if abs(d) > args.jump]
            cells = [head, name, f"{mean_se(other['values'])[0]:.2f}", f"{m:+.2f} ± {se:.2f} ({per_seed})"]
            cells += [f"{wins} of {len(diff)}", f"{median(diff):+.2f}; {sum(jumps) / len(diff):+.2f} from {len(jumps)}"]
            table_row(*cells)
            head = ""


if __name__ == "__main__":
    main()
