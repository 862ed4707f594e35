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
    lpips = clip = reward = None
    if cfg.lpips_weights:
        try:
            lpips = metrics.LPIPS.from_files(cfg.lpips_weights).eval()
        except metrics.MetricUnavailable as e:
            notice(f"LPIPS skipped: {e}")
    else:
        notice("LPIPS skipped: pass --lpips-weights with local AlexNet and LPIPS (alex.pth) weights")
    if cfg.clip:
        try:
            clip = metrics.CLIPScore.from_pretrained(cfg.clip)
        except metrics.MetricUnavailable as e:
            notice(f"CLIP score skipped: {e}")
    else:
        notice("CLIP score skipped: pass --clip with a local CLIP model directory")
    if cfg.image_reward:
        try:
            reward = metrics.ImageRewardScore.from_path(cfg.image_reward)
        except metrics.MetricUnavailable as e:
            notice(f"ImageReward skipped: {e}")
    else:
        notice("ImageReward skipped: pass --image-reward with a local ImageReward checkpoint")
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
    from ..embedded.checker import check_caption
    from ..embedded.scenes import parse_caption

    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        notice("prompt-following skipped: the prompts are not captions of the embedded model's scene grammar")
        return None
    return check_caption
