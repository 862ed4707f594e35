"""A trained schedule-free predictor's held-out latent PSNR on every (step count, speed-up) cell, with its full steps
placed by the sigma rule of each given power (and uniformly): what `lesa train` scores when it chooses a placement,
for powers it did not try.

    python benchmarks/placement_powers.py src/lesa/embedded/predictors/schedule-free --powers 0.8,1,1.3,1.6 \\
        --data runs/rec-20 --data runs/rec-28 --data runs/rec-50 --val-data runs/val-20 --val-data runs/val-28 \\
        --val-data runs/val-50
"""

from __future__ import annotations

import json
import tempfile

from harness import comma_list, make_parser, parse, table_head, table_row

from lesa.pipelines import load_pipeline
from lesa.predictor import load_predictor
from lesa.recording import Recording
from lesa.training import ScheduleFreeTrainer, TrainConfig


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("predictor")
    parser.add_argument("--powers", default="0.8,1,1.3,1.6")
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--val-data", action="append", required=True)
    parser.add_argument("--val-limit", type=int, default=20)
    parser.add_argument("--warmup", type=int, help="steps 0..warmup always full (default: the recipe's)")
    parser.add_argument("--json", help="also write the scores here")
    args = parse(parser, threads=1)
    predictor = load_predictor(args.predictor)
    pc = predictor.config
    extra = {} if args.warmup is None else {"warmup": args.warmup}
    config = TrainConfig.from_recipe("schedule-free", val_fraction=0.0, val_limit=args.val_limit, **extra)
    pipe = load_pipeline(pc.base_model, "cpu", pc.dtype)
    powers: list[float | None] = comma_list(args.powers, float) + [None]
    with tempfile.TemporaryDirectory() as unused_out:  # the trainer is only asked to score; it saves nothing
        trainer = ScheduleFreeTrainer(
            [Recording(d) for d in args.data],
            pipe,
            unused_out,
            config,
            validations=[Recording(d) for d in args.val_data],
            log=lambda _: None,
        )
        scores = {p: trainer.score_cells(predictor, p) for p in powers}
    names = ["uniform" if p is None else f"power {p:g}" for p in powers]
    table_head("cell", *names)
    for cell in trainer.cells:
        table_row(cell.name, *(f"{scores[p][cell.name]['psnr']:.2f}" for p in powers))
    means = [sum(v["psnr"] for v in scores[p].values()) / len(scores[p]) for p in powers]
    table_row("mean", *(f"{m:.2f}" for m in means))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({n: scores[p] for n, p in zip(names, powers, strict=True)}, f, indent=1)


if __name__ == "__main__":
    main()
