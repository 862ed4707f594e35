"""Named settings of `lesa train --recipe`: presets as data (the user's own settings override them).

"paper" is the faithful reproduction of arXiv 2602.20497: `TrainConfig`'s own defaults. "calibrated" starts from the
better of reuse and damped TaylorSeer O1 on a memory of full-step features, trains against the errors of the final
latent and of the latents closing the first two cache cycles, back-propagated through the sampler, trains with and
without a learned full-step correction (`lesa.correction`) on the uniform and a planned placement of the full steps,
and keeps the one of those four whose trained predictor scores best on validation (BENCHMARKS.md; best with
`--val-data`). "schedule-free" trains one predictor of format 2 the calibrated way over recordings at several step
counts, several budgets and placements.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "calibrated": dict(
        memory="full",
        gain_init="best",
        schedule="plan",
        loss="final",
        select="psnr",
        phases=("clar",),
        epochs_clar=8,
        lr_clar=1e-4,
        history_grad=True,
        loss_cycles=2,
        correction="auto",
        windows=(3, 3, 3),
        history=3,
    ),
}
# one predictor for every step count, resolution and budget: the calibrated closed loop, trained over the recordings'
# step counts x budgets x placements (lesa.training.schedule_free)
# (its coefficient network is small: 1e-4, right for format 1's 256-wide KAN, moves it too slowly,
# docs/history/2026-12-07-schedule-free.md; 12 epochs at 3e-3 beat the first shipped predictor's 6 by +0.50 dB at
# 20 steps x2.5 and +0.09 over all cells, docs/history/2026-12-07-twelve-epochs.md)
RECIPES["schedule-free"] = {
    **RECIPES["calibrated"],
    "format": 2,
    "correction": True,
    "lr_clar": 3e-3,
    "epochs_clar": 12,
}
DEFAULT_RECIPE = "calibrated"


def recipe_settings(recipe: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A recipe's settings with `overrides` applied, and what follows from them: the history is as long as the
    largest window unless given, and the terms of loss "final" fall away with another loss unless given."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; recipes are {', '.join(RECIPES)}")
    settings = {**RECIPES[recipe], **overrides}
    if "windows" in overrides and "history" not in overrides:
        settings["history"] = max(settings["windows"])
    if settings.get("loss", "step") != "final":
        for name in ("loss_cycles", "correction"):
            if name not in overrides:
                settings.pop(name, None)
    return settings
