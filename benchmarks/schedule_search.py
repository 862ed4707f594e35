"""Lever: which steps run the trunk. For the full-step budget of each uniform schedule, place the full steps as
`lesa train --schedule search` does (`lesa.training.placement.search_full_steps`): by dynamic programming on the
teacher-forced damped TaylorSeer O1 error of the cached steps, then by a closed-loop coordinate search of damped
TaylorSeer O1's final-latent PSNR on training trajectories. Prints damped TaylorSeer O1 (g refitted per schedule),
closed loop, on the held-out split of the predictor-training prompts for the uniform, the planned and the searched
schedule.

    python benchmarks/schedule_search.py --data runs/rec-embedded --out runs/schedules.json
"""

from __future__ import annotations

import json
import time

from harness import comma_list, make_parser, parse

from lesa.io import atomic_write_text
from lesa.pipelines import load_pipeline
from lesa.recording import Recording
from lesa.training import Scorer, TrainConfig, TrainingData
from lesa.training.placement import search_full_steps
from lesa.training.start import Fits


def main() -> None:
    parser = make_parser(__doc__, data="recording of the predictor-training prompts")
    parser.add_argument("--intervals", default="7,10", help="uniform schedules whose full-step budgets are searched")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="write the schedules and scores to this JSON file")
    args = parse(parser)

    rec = Recording(args.data)
    pipe = load_pipeline(rec.settings["model"])
    results = {}
    for interval in comma_list(args.intervals, int):
        config = TrainConfig(interval=interval, warmup=args.warmup, schedule="search")
        scorer = Scorer(pipe, TrainingData.split(rec, config.val_fraction), config.batch_size)
        start = time.perf_counter()
        results[interval] = found = search_full_steps(config, Fits(scorer.data), scorer, print)
        print(f"N = {interval} ({len(found['uniform'])} full steps, {time.perf_counter() - start:.0f} s):")
        for name, psnr in found["held_out_psnr"].items():
            print(f"  {name:20s} {found[name]}: damped TaylorSeer O1 held-out latent PSNR {psnr:.2f} dB")
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
