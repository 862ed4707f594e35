"""Where the interval's budget of full steps goes: the variants a run trains (placement x correction), the planned
and searched placements, and their persistence in `out/schedule.json`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .. import distributed
from ..calibrate import forecast_errors, refine_schedule, search_schedule
from ..evaluate.methods import baseline_config
from ..io import atomic_write_text
from ..schedule import StepSchedule
from .config import TrainConfig
from .data import TrainingData
from .start import Fits
from .validation import Scorer

SEARCH_TRAJECTORIES = 40  # training trajectories a schedule plan or search reads


class Variant(NamedTuple):
    """What one set of predictors trains on: a placement of the full steps and whether a full-step correction is
    learned. `name` keeps its checkpoints apart from the other variants'; `placement` names the placement in
    schedule.json."""

    name: str
    placement: str
    full_steps: list[int]
    correction: bool


def uniform_schedule(config: TrainConfig) -> StepSchedule:
    return StepSchedule(config.interval, config.warmup)


def explicit_schedule(config: TrainConfig, full: list[int], num_steps: int) -> StepSchedule:
    """The schedule with these full steps (the plain uniform one when they are its own)."""
    uniform = uniform_schedule(config)
    if full == uniform.full_steps(num_steps):
        return uniform
    return StepSchedule(config.interval, config.warmup, explicit=tuple(full[config.warmup + 1 :]))


def variants(
    config: TrainConfig, placements: dict[str, list[int]], kept_correction: bool | None = None
) -> list[Variant]:
    """The variants to train: each placement, each with and without the correction when it is "auto" (only the kept
    one when an earlier run chose)."""
    if config.correction != "auto":
        return [Variant(name, name, full, config.correction) for name, full in placements.items()]
    corrections = (True, False) if kept_correction is None else (kept_correction,)
    return [
        Variant(f"{name}, {'with' if c else 'no'} correction", name, full, c)
        for name, full in placements.items()
        for c in corrections
    ]


class PlacementStore:
    """`out/schedule.json`: a placement search and, once every candidate is trained, the one kept (and the correction
    with correction "auto"). A later run of the same settings (a resumed run, another seed) reads it instead of
    searching again; other settings search afresh."""

    def __init__(self, out: Path, settings: dict[str, Any], log: Callable[[str], None]) -> None:
        self.path = out / "schedule.json"
        self.settings = settings
        self.log = log

    def candidates(self, search: Callable[[], dict[str, Any]]) -> tuple[dict[str, list[int]], bool | None]:
        """The placements to train on, by name: those `search` returns (uniform included, duplicates dropped), or
        the one kept before; and the correction kept before (None: none yet)."""
        path = self.path
        saved = distributed.on_main(lambda: json.loads(path.read_text()) if path.exists() else None)
        if saved is not None and saved.get("settings") == self.settings and "full_steps" in saved:
            kept = saved.get("kept", "placed")
            self.log(f"schedule: {kept} {saved['full_steps']} (kept before, {path})")
            return {kept: saved["full_steps"]}, saved.get("correction")
        if saved is None or saved.get("settings") != self.settings:
            saved = {"settings": self.settings, **search()}
            if distributed.current().is_main:
                atomic_write_text(path, json.dumps(saved, indent=1) + "\n")
        candidates: dict[str, list[int]] = {}
        for name in saved["held_out_psnr"]:
            if saved[name] not in candidates.values():
                candidates[name] = saved[name]
        return candidates, None

    def keep(self, placement: str, correction: bool | None, trained: dict[str, float]) -> None:
        """Record the placement (and the correction, unless None) kept and the held-out PSNR of the predictor
        trained on each candidate."""
        if distributed.current().is_main:
            saved = json.loads(self.path.read_text())
            saved.update(kept=placement, full_steps=saved[placement], trained_held_out_psnr=trained)
            if correction is not None:
                saved["correction"] = correction
            atomic_write_text(self.path, json.dumps(saved, indent=1) + "\n")


def placement_settings(config: TrainConfig, data: TrainingData) -> dict[str, Any]:
    """What a placement search and the choices kept after it depend on."""
    key = {k: getattr(config, k) for k in ("interval", "warmup", "val_fraction", "schedule")}
    key.update(search_trajectories=SEARCH_TRAJECTORIES, recording=data.rec.fingerprint, steps=data.num_steps)
    if data.val_rec is not None:
        key["validation"] = data.val_rec.fingerprint
    if config.correction == "auto":
        key["correction"] = "auto"
    return key


def search_full_steps(
    config: TrainConfig, fits: Fits, scorer: Scorer, log: Callable[[str], None], refine: bool = True
) -> dict[str, Any]:
    """Candidate placements of the uniform schedule's number of full steps, found for damped TaylorSeer O1 (its g
    fitted for the uniform schedule): by dynamic programming on its teacher-forced error
    (`calibrate.search_schedule`), then, with `refine`, by a closed-loop coordinate search
    (`calibrate.refine_schedule`, final-latent PSNR through the pipeline) started from the better of uniform and
    that, both on up to SEARCH_TRAJECTORIES training trajectories. Returns the placements and damped TaylorSeer O1's
    held-out PSNR on each (g refitted per placement)."""
    data = scorer.data
    num_steps = data.num_steps
    uniform_sched = uniform_schedule(config)
    uniform = uniform_sched.full_steps(num_steps)
    g = fits.damping(uniform_sched)
    search_idx = data.train_idx[:SEARCH_TRAJECTORIES]
    log(f"schedule {config.schedule}: {len(uniform)} full steps, on {len(search_idx)} training trajectories")
    errors = forecast_errors(data.rec, g, search_idx)
    planned = search_schedule(errors, len(uniform), config.warmup)

    out: dict[str, Any] = {"uniform": uniform, "dynamic programming": planned}

    def score(full: list[int]) -> float:
        damped = baseline_config("taylorseer-damped", explicit_schedule(config, full, num_steps), damping=g)
        return scorer.score(damped, search_idx)["psnr"]

    if refine:
        out["searched"], value = refine_schedule(
            score, uniform, num_steps, config.warmup, log=log, alternatives=[planned]
        )
        log(f"schedule search: {out['searched']} (training PSNR {value:.2f})")
    held_out = {}
    for name in out:
        schedule = explicit_schedule(config, out[name], num_steps)
        damped = baseline_config("taylorseer-damped", schedule, damping=fits.damping(schedule))
        held_out[name] = scorer.baseline(damped)["psnr"]
    log("schedules: held-out damped TaylorSeer O1 " + ", ".join(f"{n} {v:.2f}" for n, v in held_out.items()) + " dB")
    return {**out, "held_out_psnr": held_out}
