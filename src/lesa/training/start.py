"""Where a new predictor starts: the fixed forecasters fitted on the training trajectories (damped TaylorSeer O1, the
least-squares linear forecaster), the choice among them, the full-step correction it starts with, and
`new_predictor`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..adapters import get_adapter
from ..calibrate import damping_cycles, fit_damping, fit_linear
from ..correction import first_cycles
from ..evaluate.methods import baseline_config
from ..predictor import LESAPredictor, PredictorConfig
from ..schedule import StepSchedule
from .config import TrainConfig
from .data import TrainingData
from .validation import Scorer


class Fits:
    """The fixed forecasters fitted on the training trajectories, once per schedule (teacher forced, seconds)."""

    def __init__(self, data: TrainingData) -> None:
        self.data = data
        self._damping: dict[StepSchedule, float] = {}
        self._linear: dict[tuple[StepSchedule, int], dict[int, list[float]]] = {}

    def damping(self, schedule: StepSchedule) -> float:
        """TaylorSeer O1's damping g (closed-form least squares); 1 when no cached step has two full steps before it
        (a few-step schedule: every forecast is then the last feature)."""
        if schedule not in self._damping:
            # decided from the schedule, not by catching fit_damping's ValueError: that also means a corrupt shard
            cycles = damping_cycles(schedule, self.data.num_steps)
            self._damping[schedule] = fit_damping(self.data.rec, schedule, self.data.train_idx) if cycles else 1.0
        return self._damping[schedule]

    def linear_weights(self, schedule: StepSchedule, history: int) -> dict[int, list[float]]:
        """The least-squares linear forecaster over the last `history` full-step features."""
        key = (schedule, history)
        if key not in self._linear:
            self._linear[key] = fit_linear(self.data.rec, schedule, history=history, indices=self.data.train_idx)
        return self._linear[key]


def start_correction(config: TrainConfig, schedule: StepSchedule, num_steps: int) -> dict[int, float]:
    """The correction a predictor starts from on `schedule` (`correction.first_cycles`); {} when off."""
    if not config.correction:
        return {}
    full = schedule.full_steps(num_steps)
    return first_cycles(full, config.warmup, config.correction_start, config.correction_cycles)


@dataclass(frozen=True)
class Start:
    """Where the predictors of one variant start: `kind` (zero, reuse, damped or linear), TaylorSeer's damping, the
    starting correction and, for kind linear, the per-step least-squares weights."""

    kind: str
    damping: float
    correction: dict[int, float]
    linear: dict[int, list[float]] | None = None


def choose_start(
    config: TrainConfig,
    schedule: StepSchedule,
    history: int,
    fits: Fits,
    scorer: Scorer,
    log: Callable[[str], None],
) -> Start:
    """gain_init, with "best" resolved by the closed-loop held-out PSNR on `schedule` of reuse (FORA), damped
    TaylorSeer O1 and, with step filters, the least-squares linear forecaster. (A placement that suits reuse can
    leave damped TaylorSeer far behind: starting there, training may not even climb back to reuse.)"""
    correction = start_correction(config, schedule, scorer.data.num_steps)
    kind = config.gain_init
    if kind == "best":
        candidates = {
            "reuse": baseline_config("fora", schedule, correction),
            "damped": baseline_config("taylorseer-damped", schedule, correction, damping=fits.damping(schedule)),
        }
        if config.step_filters:
            weights = fits.linear_weights(schedule, history)
            candidates["linear"] = baseline_config("linear", schedule, correction, weights=weights)
        scores = {name: scorer.baseline(candidate)["psnr"] for name, candidate in candidates.items()}
        kind = max(scores, key=scores.get)
        log(f"start: {kind} (held-out PSNR " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + " dB)")
    damping = fits.damping(schedule) if kind in ("damped", "linear") else 0.0
    linear = fits.linear_weights(schedule, history) if kind == "linear" else None
    return Start(kind, damping, correction, linear)


def new_predictor(
    config: TrainConfig,
    data: TrainingData,
    schedule: StepSchedule,
    windows: tuple[int, ...],
    start: Start,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> LESAPredictor:
    """A predictor for `schedule`, seeded, at `start`."""
    settings = data.settings
    adapter = get_adapter(settings["model_class"])
    thresholds = config.thresholds if config.thresholds is not None else adapter.stage_thresholds
    torch.manual_seed(seed)
    pc = PredictorConfig(
        model_class=settings["model_class"],
        tap=adapter.tap,
        num_steps=data.num_steps,
        sigmas=list(data.rec.sigmas),
        feature_dim=data.rec.feature_dim,
        dtype=str(dtype).replace("torch.", ""),
        interval=config.interval,
        warmup=config.warmup,
        explicit_full_steps=list(schedule.explicit),
        thresholds=list(thresholds),
        windows=list(windows),
        history=min(config.history, max(windows)),
        contexts=list(data.contexts),
        kan_hidden=list(config.kan_hidden),
        gain=config.gain,
        target=config.target,
        memory=config.memory,
        gain_bias=start.damping,
        step_filters=config.step_filters,
        correction=config.correction,
        base_model=settings["model"],
    )
    predictor = LESAPredictor(pc)
    if config.correction:
        with torch.no_grad():
            for step, strength in start.correction.items():
                predictor.correction[step] = strength
    if start.kind != "zero":  # exactly reuse / damped TaylorSeer O1 until trained
        for experts in predictor.experts.values():
            for expert in experts:
                expert.zero_gain()
    if start.kind == "linear":  # ... and with the per-step filters exactly the least-squares forecaster
        _start_at_linear(predictor, start.linear or {}, data.sigmas())
    return predictor.to(device)


@torch.no_grad()
def _start_at_linear(predictor: LESAPredictor, weights: dict[int, list[float]], sigmas: torch.Tensor) -> None:
    """Set the per-step filters so that each cached step's folded filter equals the least-squares linear
    forecaster's `weights` over the last `history` full-step features."""
    history = predictor.config.history
    for context, table in predictor.step_filters.items():
        for step, w in weights.items():
            target = torch.zeros(history)
            for j, wj in enumerate(w):  # w is newest first; the window is oldest first
                target[history - 1 - j] = wj
            target[history - 1] -= 1.0  # the forecast adds h[-1] itself
            table[step] = target - predictor.step_coefficients(context, step, sigmas)[0]
