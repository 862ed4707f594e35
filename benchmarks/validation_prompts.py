"""Write a validation prompt set for `lesa bench` from `lesa train`'s held-out split of the predictor prompts.

`lesa train` holds out a fixed 20 % of the recorded prompts; their scenes were never trained on by a predictor, nor
are they evaluation scenes. This writes each held-out scene `--per-prompt` times, each with a freshly drawn caption
(seeded), so that `lesa bench` (seed i for line i) scores predictors in image space on many trajectories of those
scenes, the way it scores them on the evaluation prompts, without looking at the evaluation prompts:

    python benchmarks/validation_prompts.py --out runs/val_prompts.txt
    lesa bench --model embedded --prompts runs/val_prompts.txt --out runs/bench-val --predictor runs/pred-n10 ...
"""

from __future__ import annotations

import numpy as np
from harness import make_parser, parse

from lesa.embedded import scenes
from lesa.io import atomic_write_text
from lesa.record import read_prompts
from lesa.training import split_indices


def validation_prompts(prompts: list[str], per_prompt: int, val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """`per_prompt` captions of each scene of `prompts`' held-out split, scene-major, in a seeded draw; none is
    verbatim one of `prompts` (from the same seed, that would be a trajectory trained on)."""
    _, held_out = split_indices(len(prompts), val_fraction, prompts)
    rng = np.random.default_rng([seed, 3])
    taken = set(prompts)
    out = []
    for i in held_out:
        scene, drawn = scenes.parse_caption(prompts[i]), 0
        while drawn < per_prompt:
            text = scenes.caption(scene, rng)
            if text not in taken:
                out.append(text)
                drawn += 1
    return out


def main() -> None:
    parser = make_parser(__doc__, val_fraction=True)
    parser.add_argument("--prompts", default=str(scenes.PROMPTS_DIR / scenes.PROMPT_FILES["predictor"]))
    parser.add_argument("--per-prompt", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parse(parser)
    lines = validation_prompts(read_prompts(args.prompts), args.per_prompt, args.val_fraction)
    atomic_write_text(args.out, "".join(f"{line}\n" for line in lines))
    print(f"wrote {len(lines)} prompts ({len(lines) // args.per_prompt} held-out scenes) to {args.out}")


if __name__ == "__main__":
    main()
