"""Lever: which steps run the trunk. For a budget of full steps, place them by dynamic programming on the recorded
trajectories (teacher-forced damped TaylorSeer O1 error of the cached steps), then measure damped TaylorSeer O1 on
that schedule against the uniform one, closed loop, on the held-out split of the predictor-training prompts.

    python benchmarks/schedule_search.py --data runs/rec-embedded
"""

from __future__ import annotations

import argparse
import time

from lesa.calibrate import fit_damping, forecast_errors, search_schedule
from lesa.config import TaylorSeerConfig
from lesa.models import load_pipeline
from lesa.record import Recording
from lesa.schedule import StepSchedule
from lesa.train import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="recording of the predictor-training prompts")
    parser.add_argument("--intervals", default="7,10", help="uniform schedules whose full-step budgets are searched")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--search-trajectories", type=int, default=40, help="training trajectories the search reads")
    args = parser.parse_args()

    rec = Recording(args.data)
    pipe = load_pipeline(rec.settings["model"])
    steps = len(rec.sigmas) - 1
    for interval in map(int, args.intervals.split(",")):
        trainer = Trainer(rec, pipe, "unused", TrainConfig(interval=interval, warmup=args.warmup), progress=False)
        uniform = StepSchedule(interval, args.warmup)
        budget = len(uniform.full_steps(steps))
        start = time.perf_counter()
        errors = forecast_errors(rec, trainer.damping, trainer.train_idx[: args.search_trajectories])
        chosen = search_schedule(errors, budget, args.warmup)
        searched = StepSchedule(steps, args.warmup, tuple(chosen[args.warmup + 1 :]))
        print(
            f"{budget}/{steps}: uniform {uniform.full_steps(steps)}; searched {chosen} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        for name, schedule in (("uniform", uniform), ("searched", searched)):
            g = fit_damping(rec, schedule, trainer.train_idx)
            sched = dict(interval=schedule.interval, warmup=schedule.warmup, forced_full_steps=schedule.forced)
            score = trainer.closed_loop_error(TaylorSeerConfig(order=1, damping=g, count_flops=False, **sched))
            print(
                f"  damped TaylorSeer O1 (g {g:.3f}) on the {name} schedule: held-out latent PSNR "
                f"{score['psnr']:.2f} dB"
            )


if __name__ == "__main__":
    main()
