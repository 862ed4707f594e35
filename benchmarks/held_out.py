"""Held-out PSNR of trained predictors and of their seed ensemble, on the training recording's validation split.

The split, the closed loop and the score are `lesa train`'s own (final latent against the recording, 20 of the 100
embedded predictor-training trajectories), so a choice made here (e.g. whether to ship a seed ensemble) never looks
at the evaluation prompts.

    python benchmarks/held_out.py runs/pred-n7 runs/pred-n7-seed1 --data runs/rec-embedded
"""

from __future__ import annotations

from harness import held_out_scorer, make_parser, parse

from lesa.predictor import LESAPredictor


def main() -> None:
    parser = make_parser(__doc__, data="the `lesa record` directory the predictors were trained on", val_fraction=True)
    parser.add_argument("predictors", nargs="+", help="predictor directories of one schedule (seeds)")
    args = parse(parser, threads=1)
    predictors = [LESAPredictor.from_pretrained(d) for d in args.predictors]
    ensemble = LESAPredictor.ensemble(predictors)
    scorer = held_out_scorer(args.data, args.val_fraction)
    print(f"held-out split: {len(scorer.data.val_idx)} trajectories of {args.data}")
    scored = [*zip(args.predictors, predictors, strict=True), (f"ensemble of {len(predictors)}", ensemble)]
    for name, predictor in scored:
        print(f"{name:>40s}: PSNR {scorer.score_predictor(predictor)['psnr']:.2f} dB", flush=True)


if __name__ == "__main__":
    main()
