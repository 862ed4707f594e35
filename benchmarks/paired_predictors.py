"""Two or more LESA predictors benched over the same prompts and seeds (one or several `lesa bench` runs, e.g. the
acceptance bench and a LESA-only bench of candidates), paired per prompt against one reference predictor in every
(steps, full steps) cell they share: the reference's mean PSNR, each candidate's, and their difference ± its standard
error over prompts, then the mean of the differences over the cells.

    python benchmarks/paired_predictors.py --reference sf-seed0 runs/bench-sf-20/results.json \\
        runs/bench-mem-20/results.json runs/bench-sf-28/results.json runs/bench-mem-28/results.json

Predictors are named by their directory's name; `--mean NAME=A,B` adds a row of the per-prompt mean of A and B
(e.g. the two training seeds of one recipe), which `--reference` and `--compare` can name; a cell pairs the prompts
both rows ran (same prompt index and seed: `lesa bench` seeds prompt i with seed + i).

    python benchmarks/paired_predictors.py --mean sf=sf-seed0,sf-seed1 --mean v1=pred-n7,pred-n7-seed1 \
        --reference v1 --compare sf runs/bench-sf-50/results.json \
        docs/bench-embedded-200/shipped-2026-12-06*/results.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from harness import table_head, table_row

from lesa.evaluate.bench import mean_se


def lesa_rows(paths: list[Path], metric: str) -> dict[tuple[int, int], dict[str, list[float]]]:
    """Per (steps, full steps): each predictor's per-prompt `metric` (the first file that holds it wins)."""
    cells: dict[tuple[int, int], dict[str, list[float]]] = defaultdict(dict)
    for path in paths:
        results = json.loads(path.read_text())
        steps = results["config"]["steps"]
        for run in results["runs"].values():
            if run["family"] != "lesa" or run["budget"] is None or metric not in run["per_prompt"]:
                continue
            cell = (steps, int(run["budget"].split("/")[0]))
            cells[cell].setdefault(Path(run["seed"]).name, run["per_prompt"][metric])
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json of `lesa bench` runs")
    parser.add_argument("--reference", required=True, help="the reference predictor's directory name")
    parser.add_argument("--mean", action="append", default=[], help="NAME=A,B: the per-prompt mean of A and B")
    parser.add_argument("--compare", action="append", default=None, help="a row to pair (default: every other)")
    parser.add_argument("--metric", default="psnr")
    parser.add_argument("--min-full", type=int, default=4, help="leave out cells of fewer full steps (default 4)")
    args = parser.parse_args()
    cells = lesa_rows(args.results, args.metric)
    for definition in args.mean:
        name, members = definition.split("=")
        for rows in cells.values():
            parts = [rows[m] for m in members.split(",") if m in rows]
            if len(parts) == len(members.split(",")):
                rows[name] = [mean(values) for values in zip(*parts, strict=False)]
    candidates = args.compare or sorted({name for rows in cells.values() for name in rows} - {args.reference})
    table_head("steps", "full steps", "prompts", f"{args.reference}", *(f"{c} (minus reference)" for c in candidates))
    diffs: dict[str, list[float]] = defaultdict(list)
    for (steps, full), rows in sorted(cells.items()):
        if args.reference not in rows or full < args.min_full:
            continue
        ref = rows[args.reference]
        cols, n = [], len(ref)
        for c in candidates:
            if c not in rows:
                cols.append("-")
                continue
            pairs = list(zip(rows[c], ref, strict=False))  # the prompts both ran: the shorter run's
            n = min(n, len(pairs))
            m, se = mean_se([a - b for a, b in pairs])
            diffs[c].append(m)
            cols.append(f"{mean(a for a, _ in pairs):.2f} ({m:+.2f} ± {se:.2f})")
        table_row(steps, full, n, f"{mean(ref[:n]):.2f}", *cols)
    for c in candidates:
        if diffs[c]:
            print(f"{c} minus {args.reference}, mean over {len(diffs[c])} cells: {mean(diffs[c]):+.2f} dB")


if __name__ == "__main__":
    main()
