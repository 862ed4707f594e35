"""Held-out PSNR of trained predictors and of their seed ensemble, on the training recording's validation split.

The split, the closed loop and the score are `lesa train`'s own (final latent against the recording, 20 of the 100
embedded predictor-training trajectories), so a choice made here (e.g. whether to ship a seed ensemble) never looks
at the evaluation prompts.

    python benchmarks/held_out.py runs/pred-n7 runs/pred-n7-seed1 --data runs/rec-embedded
"""

from __future__ import annotations

import argparse

import torch

from lesa.predictor import LESAPredictor
from lesa.record import Recording
from lesa.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictors", nargs="+", help="predictor directories of one schedule (seeds)")
    parser.add_argument("--data", required=True, help="the `lesa record` directory the predictors were trained on")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="as given to `lesa train`")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictors = [LESAPredictor.from_pretrained(d) for d in args.predictors]
    ensemble = LESAPredictor.ensemble(predictors)
    rec = Recording(args.data)
    trainer = Trainer.for_scoring(rec, predictors[0].config, args.val_fraction)
    print(f"held-out split: {len(trainer.val_idx)} trajectories of {args.data}")
    scored = [*zip(args.predictors, predictors, strict=True), (f"ensemble of {len(predictors)}", ensemble)]
    for name, predictor in scored:
        print(f"{name:>40s}: PSNR {trainer.score(predictor)['psnr']:.2f} dB", flush=True)


if __name__ == "__main__":
    main()
