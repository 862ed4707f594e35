"""Issue 32's acceptance table for a schedule-free predictor: every (steps, speed-up) cell of `lesa bench
--speedups` runs with at least `--min-full` (4) full steps, LESA (mean over its training seeds, per prompt) paired
per prompt against the strongest calibrated baseline fitted for that cell (FORA and damped TaylorSeer O1, with and
without the correction, and the per-step least-squares forecaster, on the uniform and on the predictor's own
placement), with the goal of each cell (+0.5 dB) and of the mean over cells (+1.0 dB); and the 50-step budgets
against the format-1 pairs' PSNR.

    python benchmarks/schedule_free.py runs/bench-sf-20/results.json runs/bench-sf-28/results.json \\
        runs/bench-sf-50/results.json --v1 5=40.80 --v1 6.25=34.12

`--lesa RESULTS` (at most one per full bench) takes the LESA rows from a LESA-only bench (`lesa bench --methods
lesa`) of other predictors instead, paired with the baseline rows of the full bench of the same prompts and seeds:
valid when the predictors place their full steps by the same rule (the sigma rule's power in their training logs),
so that the baselines' "planned" rows ran on the same steps.

Several results.json of one step count on other prompts (another `--prompts` file or `--seed`; e.g. the second
hundred of a prompt file with `--seed 100`, so that every prompt keeps the seed it has in one run of all of them) are
pooled per prompt into one cell; each may have its own `--lesa` file (paired by prompts and seed).

`--discretisation REC [REC ...]` instead prints how far apart the final latents of recordings of the same prompts and
seeds at different step counts are (latent PSNR, mean and median): why a schedule-free predictor trains on a
recording per step count rather than on sub-schedules of one fine recording.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from statistics import mean, median

from harness import make_parser, parse, table_head, table_row

from lesa.evaluate.bench import mean_se
from lesa.schedule import full_step_count

CALIBRATED = ("fora", "fora-corrected", "taylorseer-damped", "taylorseer-damped-corrected", "linear")
CELL_GOAL, MEAN_GOAL, V1_TOLERANCE = 0.5, 1.0, 0.5


POOLED_SAME = ("steps", "height", "width", "guidance_scale")  # what files pooled into one cell share
SAME_RUN = ("prompts", "limit", "seed", *POOLED_SAME)  # what a LESA-only bench shares with its full bench


def cells(results: dict, lesa: dict | None = None) -> list[dict]:
    """Per budget of one results.json: the LESA seeds' per-prompt PSNR and the calibrated baselines'; the LESA rows
    of the LESA-only bench `lesa` instead where that is given."""
    steps = results["config"]["steps"]
    if lesa is not None:
        runs = [r for r in results["runs"].values() if r["family"] != "lesa"]
        runs += [r for r in lesa["runs"].values() if r["family"] == "lesa"]
        results = {**results, "runs": dict(enumerate(runs))}
    speedups = {full_step_count(steps, s): s for s in results["config"].get("speedups") or []}
    by_count: dict[int, dict] = {}
    for run in results["runs"].values():
        values = run["per_prompt"].get("psnr")
        if run["budget"] is None or values is None:
            continue
        count = int(run["budget"].split("/")[0])
        cell = by_count.setdefault(count, {"steps": steps, "full": count, "lesa": {}, "baselines": {}})
        if run["family"] == "lesa":
            cell["lesa"][run["seed"]] = values
        elif run["family"] in CALIBRATED:
            cell["baselines"][run["row"]] = values
    out = []
    for count, cell in sorted(by_count.items(), key=lambda kv: -kv[0]):
        if not cell["lesa"] or not cell["baselines"]:
            continue
        cell["speedup"] = speedups.get(count, steps / count)
        out.append(cell)
    return out


def pair_lesa(benches: dict[Path, dict], lesa_files: dict[Path, dict]) -> dict[Path, dict]:
    """Each full bench's LESA-only bench: the one of the same prompts, seeds, limit, steps and size (refused when
    there is none, naming the setting that differs from a bench of its step count)."""
    paired: dict[Path, dict] = {}
    claimed: dict[Path, Path] = {}
    for lesa_path, other in lesa_files.items():
        steps = other["config"]["steps"]
        same_steps = [p for p, b in benches.items() if b["config"]["steps"] == steps]
        if not same_steps:
            raise SystemExit(f"{lesa_path}: a bench of {steps} steps, but no results.json given holds {steps} steps")
        match = [p for p in same_steps if all(benches[p]["config"].get(k) == other["config"].get(k) for k in SAME_RUN)]
        if not match:
            path = same_steps[0]
            key = next(k for k in SAME_RUN if benches[path]["config"].get(k) != other["config"].get(k))
            raise SystemExit(
                f"{lesa_path}: config {key!r} is {other['config'].get(key)!r}, but {path} ran "
                f"{benches[path]['config'].get(key)!r}; LESA rows pair only with a bench of the same prompts and seeds"
            )
        if match[0] in claimed:
            raise SystemExit(f"{lesa_path} and {claimed[match[0]]}: two LESA-only benches for {match[0]}")
        claimed[match[0]] = lesa_path
        paired[match[0]] = other
    return paired


def pooled_cells(benches: dict[Path, dict], lesa: dict[Path, dict]) -> list[dict]:
    """The cells of every bench, those of one step count on other prompts pooled per prompt (in the order given)."""
    pooled: dict[tuple[int, int], dict] = {}
    first_of: dict[int, Path] = {}
    runs: dict[tuple, Path] = {}
    for path, results in benches.items():
        config = results["config"]
        steps = config["steps"]
        ref = first_of.setdefault(steps, path)
        differ = [k for k in POOLED_SAME if benches[ref]["config"].get(k) != config.get(k)]
        if differ:
            raise SystemExit(f"{path} and {ref} differ in {differ}: not pooled")
        run = (steps, config.get("prompts"), config.get("seed"))
        if run in runs:
            raise SystemExit(f"{path} and {runs[run]} ran the same prompts and seeds: pooling would count them twice")
        runs[run] = path
        for cell in cells(results, lesa.get(path)):
            key = (steps, cell["full"])
            if key not in pooled:
                pooled[key] = cell
                continue
            into = pooled[key]
            for part in ("lesa", "baselines"):
                if set(into[part]) != set(cell[part]):
                    raise SystemExit(
                        f"{path}: {steps} steps with {cell['full']} full steps holds {part} rows "
                        f"{sorted(cell[part])}, another file of its step count {sorted(into[part])}: not pooled"
                    )
                for name, values in cell[part].items():
                    into[part][name] = into[part][name] + values
    return list(pooled.values())


def acceptance(
    benches: dict[Path, dict],
    v1: dict[float, float],
    min_full: int = 4,
    lesa: dict[Path, dict] | None = None,
) -> None:
    table_head(
        "steps",
        "speed-up (full steps)",
        "LESA (seeds)",
        "strongest calibrated baseline",
        "its PSNR",
        "LESA minus it (± s.e.; seeds)",
        "prompts LESA leads",
        "goal +0.5",
    )
    margins, notes = [], []
    for cell in pooled_cells(benches, lesa or {}):
        if cell["full"] < min_full:
            continue
        seeds = list(cell["lesa"].values())
        n = len(seeds[0])
        forecast = [mean(s[i] for s in seeds) for i in range(n)]
        name, base = max(cell["baselines"].items(), key=lambda kv: mean_se(kv[1])[0])
        diff = [a - b for a, b in zip(forecast, base, strict=True)]
        m, se = mean_se(diff)
        per_seed = ", ".join(f"{mean_se([a - b for a, b in zip(s, base, strict=True)])[0]:+.2f}" for s in seeds)
        margins.append(m)
        lead = sum(d > 0 for d in diff)
        table_row(
            cell["steps"],
            f"x{cell['speedup']:g} ({cell['full']})",
            f"{mean_se(forecast)[0]:.2f} ({', '.join(f'{mean_se(s)[0]:.2f}' for s in seeds)})",
            name,
            f"{mean_se(base)[0]:.2f}",
            f"{m:+.2f} ± {se:.2f} ({per_seed})",
            f"{lead} of {n}",
            "met" if m >= CELL_GOAL else "not met",
        )
        if cell["steps"] == 50 and cell["speedup"] in v1:
            own = mean_se(forecast)[0]
            ref = v1[cell["speedup"]]
            verdict = "within" if own >= ref - V1_TOLERANCE else "not within"
            notes.append(
                f"50 steps x{cell['speedup']:g}: {own:.2f} dB against the format-1 pair's {ref:.2f} "
                f"({own - ref:+.2f}; {verdict} {V1_TOLERANCE} dB)"
            )
    for note in notes:
        print(f"\n{note}")
    if margins:
        avg = sum(margins) / len(margins)
        met = sum(m >= CELL_GOAL for m in margins)
        print(
            f"\nmean margin over {len(margins)} cells: {avg:+.2f} dB (goal +{MEAN_GOAL}: "
            f"{'met' if avg >= MEAN_GOAL else 'not met'}); cells at +{CELL_GOAL} or more: {met} of {len(margins)}"
        )


def discretisation(paths: list[Path]) -> None:
    from lesa.recording import Recording
    from lesa.training import latent_psnr

    recs = [Recording(p) for p in paths]
    table_head("steps", "against steps", "trajectories", "final-latent PSNR mean", "median")
    for a, b in combinations(recs, 2):
        n = min(len(a), len(b))
        if [e["prompt"] for e in a.entries[:n]] != [e["prompt"] for e in b.entries[:n]]:
            raise SystemExit(f"{a.dir} and {b.dir} hold other prompts: not comparable")
        values = [latent_psnr(a.load(i)["final"], b.load(i)["final"]) for i in range(n)]
        finite = [v for v in values if math.isfinite(v)]
        table_row(a.settings["steps"], b.settings["steps"], n, f"{mean(finite):.2f}", f"{median(finite):.2f}")


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="results.json files (or recordings with --discretisation)")
    parser.add_argument("--v1", action="append", default=[], help="SPEEDUP=PSNR of a format-1 pair at 50 steps")
    parser.add_argument("--discretisation", action="store_true", help="compare recordings' final latents")
    parser.add_argument("--min-full", type=int, default=4, help="leave out cells with fewer full steps")
    parser.add_argument("--lesa", action="append", type=Path, default=[], help="a LESA-only bench's results.json")
    args = parse(parser, threads=1)
    if args.discretisation:
        discretisation(args.paths)
        return
    v1 = {float(k): float(v) for k, v in (item.split("=") for item in args.v1)}
    for given in (args.paths, args.lesa):
        if len(set(given)) < len(given):
            raise SystemExit(f"a results.json given twice: {next(p for p in given if given.count(p) > 1)}")
    benches = {p: json.loads(p.read_text()) for p in args.paths}
    lesa = pair_lesa(benches, {p: json.loads(p.read_text()) for p in args.lesa})
    acceptance(benches, v1, args.min_full, lesa)


if __name__ == "__main__":
    main()
