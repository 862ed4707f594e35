"""Which quality metrics a bench run can compute, and one function that scores an image with all of them.

Metrics that need weights run only when the user points at local files; any metric that cannot run is skipped with
a notice and left out of the results, never filled in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from . import metrics

Scorer = Callable[[str, np.ndarray, np.ndarray | None], dict[str, float | None]]


def make_scorer(cfg: Any, prompts: list[str], notice: Callable[[str], None]) -> Scorer:
    """A scorer for `cfg`'s metrics: against the reference image (PSNR, SSIM, MS-SSIM, LPIPS) and against the
    prompt (CLIP score, ImageReward, the embedded model's checker)."""

    def optional(name: str, source: Any, load: Callable[[Any], Any], hint: str) -> Any:
        if not source:
            notice(f"{name} skipped: {hint}")
            return None
        try:
            return load(source)
        except metrics.MetricUnavailable as e:
            notice(f"{name} skipped: {e}")
            return None

    lpips = optional(
        "LPIPS",
        cfg.lpips_weights,
        lambda paths: metrics.LPIPS.from_files(paths).eval(),
        "pass --lpips-weights with local AlexNet and LPIPS (alex.pth) weights",
    )
    clip = optional(
        "CLIP score", cfg.clip, metrics.CLIPScore.from_pretrained, "pass --clip with a local CLIP model directory"
    )
    reward = optional(
        "ImageReward",
        cfg.image_reward,
        metrics.ImageRewardScore.from_path,
        "pass --image-reward with a local ImageReward checkpoint",
    )
    checker = _checker(prompts, notice)
    ms_ssim_noted = False

    def score(prompt: str, image: np.ndarray, reference: np.ndarray | None) -> dict[str, float | None]:
        nonlocal ms_ssim_noted
        out: dict[str, float | None] = {}
        if reference is not None:
            out["psnr"] = metrics.psnr(image, reference)
            out["ssim"] = metrics.ssim(image, reference)
            out["ms_ssim"] = metrics.ms_ssim(image, reference)
            if out["ms_ssim"] is None and not ms_ssim_noted:
                ms_ssim_noted = True
                notice(f"MS-SSIM skipped: {image.shape[0]}x{image.shape[1]} images are too small for 5 scales")
            if lpips is not None:
                out["lpips"] = lpips.distance(image, reference)
        if clip is not None:
            out["clip_score"] = clip.score(Image.fromarray(image), prompt)
        if reward is not None:
            out["image_reward"] = reward.score(prompt, Image.fromarray(image))
        if checker is not None:
            out["prompt_following"] = float(checker(image, prompt)["all"])
        return out

    return score


def _checker(prompts: list[str], notice: Callable[[str], None]):
    """The embedded model's caption checker, or None (with a notice naming a prompt it cannot check) unless every
    prompt is a caption of its scene grammar."""
    from ..embedded.checker import check_caption
    from ..embedded.scenes import caption_scene

    # checked up front, not by catching a ValueError from the checker, which could stand for any error
    unparsed = [p for p in prompts if caption_scene(p) is None]
    if unparsed:
        notice(
            f"prompt-following skipped: {len(unparsed)} of the {len(prompts)} prompts are not captions of the "
            f"embedded model's scene grammar, e.g. {unparsed[0]!r}"
        )
        return None
    return check_caption
