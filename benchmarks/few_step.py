"""Few-step schedules (the regime of FLUX.1-schnell at 4 steps, Qwen-Image-Lightning at 8): what caching still buys.

With the paper's warm-up E = 3 a 4-step run has no cached step at all, and an 8-step run only a few whose history
window (K = 4 / 8) never fills. For each step count this script records trajectories of the unaccelerated model,
then for each short schedule (E, N) trains a LESA predictor (windows shrunk to what the schedule can supply) and
measures, on held-out prompts from the same noise, the final-latent error against the unaccelerated run at the same
step count, for FORA, TaylorSeer O1 and LESA, next to the trunk speed-up (steps / full steps).

    python benchmarks/few_step.py                       # the embedded model (trained, real trajectories)
    python benchmarks/few_step.py --model tiny-random-flux --prompts 12

The embedded model is not step-distilled: its 4-step output is a poor picture, but the comparison here is always
accelerated vs unaccelerated at the same step count, which is what caching changes.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from harness import comma_list, make_parser, table_head, table_row

import lesa
from lesa.pipelines import default_model, load_pipeline, model_label
from lesa.record import record
from lesa.recording import Recording
from lesa.training import TrainConfig, Trainer, split_indices

SCHEDULES = {4: [(3, 7), (1, 2), (0, 2), (0, 3)], 8: [(3, 7), (1, 2), (1, 3), (0, 3)]}


def prompts_for(count: int) -> list[str]:
    path = Path(lesa.__file__).parent / "embedded" / "prompts" / "predictor_train.txt"
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[:count]


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--model", default=None, help="pipeline (default: the embedded model when shipped)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts recorded (a quarter held out)")
    parser.add_argument("--steps", default="4,8", help="step counts to measure")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(2)
    model = args.model or default_model()
    pipe = load_pipeline(model, "cpu")
    size = {} if model_label(model) == "embedded" else {"height": 16, "width": 16}
    prompts = prompts_for(args.prompts)
    rows = []
    quiet = dict(progress=False, log=lambda *_: None)
    for steps in comma_list(args.steps, int):
        with tempfile.TemporaryDirectory() as tmp:
            record(pipe, prompts, tmp, model=model_label(model), steps=steps, dtype="float32", **size, **quiet)
            rec = Recording(tmp)
            for warmup, interval in SCHEDULES.get(steps, [(0, 2), (1, 2)]):
                config = TrainConfig(
                    interval=interval,
                    warmup=warmup,
                    epochs_gt=3,
                    epochs_clar=2,
                    kan_hidden=(32, 32),
                    batch_size=6,
                    val_fraction=0.25,
                )
                schedule = lesa.StepSchedule(interval, warmup)
                full = schedule.full_steps(steps)
                row = {"steps": steps, "warmup": warmup, "interval": interval, "full_steps": full}
                row["trunk_speedup"] = steps / len(full)
                try:
                    trainer = Trainer(rec, pipe, Path(tmp) / f"pred-{warmup}-{interval}", config, **quiet)
                except ValueError as e:
                    row["refused"] = str(e)
                    rows.append(row)
                    print(f"S={steps} E={warmup} N={interval}: refused: {e}")
                    continue
                start = time.perf_counter()
                predictor = trainer.run()  # also scores FORA and TaylorSeer O1 on the held-out split, same schedule
                validation = json.loads((trainer.out / "training_log.json").read_text())["validation"]
                names = {"FORA": "FORA", "TaylorSeer O1": "TaylorSeer O1", "LESA": "LESA (this predictor)"}
                errors = {k: validation[v] for k, v in names.items()}
                row.update(
                    windows=list(predictor.config.windows),
                    psnr={k: v["psnr"] for k, v in errors.items()},
                    mse={k: v["mse"] for k, v in errors.items()},
                    train_seconds=time.perf_counter() - start,
                )
                rows.append(row)
                print(
                    f"S={steps} E={warmup} N={interval}: full {full} ({row['trunk_speedup']:.2f}x), K={row['windows']}"
                    + "".join(f"; {k} {v['psnr']:.2f} dB" for k, v in errors.items())
                )
    held_out = len(split_indices(len(prompts), 0.25)[1])
    print(f"\nmodel {model_label(model)}, {len(prompts)} prompts ({held_out} held out), final-latent PSNR in dB")
    table_head("steps", "E", "N", "full steps", "trunk speed-up", "FORA", "TaylorSeer O1", "LESA")
    for r in rows:
        if "refused" in r:
            print(f"| {r['steps']} | {r['warmup']} | {r['interval']} | all | 1.00x | refused: no cached step | | |")
            continue
        p = r["psnr"]
        cells = [f"{p[k]:.2f}" for k in ("FORA", "TaylorSeer O1", "LESA")]
        table_row(r["steps"], r["warmup"], r["interval"], len(r["full_steps"]), f"{r['trunk_speedup']:.2f}x", *cells)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
