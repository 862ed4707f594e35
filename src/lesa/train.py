"""Train a LESA predictor from a recording: phase `gt` (teacher forcing) then phase `clar` (closed loop).

Every epoch is scored by the closed-loop error of the final latent on a held-out split (the real pipeline from the
recorded noise, the predictor's own forecasts fed back), and the best-scoring weights are kept: the last epoch is
often not the best. Each phase has its own learning-rate schedule (cosine from its own peak to `lr_min`).
Checkpoints after every epoch make a killed run resume where it stopped.

Under `torchrun` every rank runs the same `Trainer`: each minibatch (the global batch) is split across ranks, each
rank loads / rolls out only its share, and gradients are summed over ranks before every update (phase gt through
DistributedDataParallel, phase clar through an explicit all-reduce after backward), so an update equals the
single-process update on the whole minibatch up to float reduction order. Held-out scoring is sharded and reduced;
rank 0 alone reads and writes checkpoints and the predictor.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import disable, distributed, enable
from .adapters import get_adapter
from .calibrate import damping_cycles, fit_damping, fit_linear, forecast_errors, refine_schedule, search_schedule
from .checkpoint import load_checkpoint, refuse_pickles, save_checkpoint
from .checks import check_numbers
from .config import CacheConfig, FORAConfig, LESAConfig, LinearForecastConfig, TaylorSeerConfig
from .correction import DEFAULT_CYCLES, DEFAULT_STRENGTH, first_cycles
from .io import atomic_write_text
from .predictor import LESAPredictor, PredictorConfig, check_predictor_dir
from .record import Recording, call_kwargs, pipeline_output
from .runtime import StepEvent, get_runtime
from .schedule import StepSchedule
from .trajectories import Trajectories, check_disjoint, stderr_notice, training_trajectories

PHASES = ("gt", "clar")
# allowed values of TrainConfig's string options (the CLI offers the same)
CHOICES = {
    "target": ("feature", "output"),
    "memory": ("steps", "full"),
    "gain_init": ("zero", "reuse", "damped", "linear", "best"),
    "loss": ("step", "cycle", "final"),
    "select": ("mse", "psnr"),
    "schedule": ("uniform", "plan", "search"),
}
SEARCH_TRAJECTORIES = 40  # training trajectories a schedule plan or search reads


# Named settings of `lesa train --recipe` (explicit options override them). "paper" is the faithful reproduction of
# arXiv 2602.20497: TrainConfig's own defaults. "calibrated" starts from the better of reuse and damped TaylorSeer
# O1 on a memory of full-step features, trains against the errors of the final latent and of the latents closing the
# first two cache cycles, back-propagated through the sampler, trains with and without a learned full-step
# correction (`lesa.correction`) on the uniform and a planned placement of the full steps, and keeps the one of those
# four whose trained predictor scores best on validation (BENCHMARKS.md; best with `--val-data`).
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
DEFAULT_RECIPE = "calibrated"


@dataclass
class TrainConfig:
    """Hyper-parameters of `lesa train` (defaults follow our calibration, see the README)."""

    interval: int = 7
    warmup: int = 3
    phases: tuple[str, ...] = PHASES
    epochs_gt: int = 3
    epochs_clar: int = 10
    lr_gt: float = 1e-3
    lr_clar: float = 3e-3
    lr_min: float = 1e-4  # floor of every phase's cosine schedule: 0 decays to zero; the peaks must be > 0
    weight_decay: float = 1e-4
    # decoupled decay toward the predictor's start instead of toward zero (a trust region around a calibrated start):
    # after each update every weight moves lr * anchor of its way back to its starting value; 0: off
    anchor: float = 0.0
    history_grad: bool = False  # closed loop: back-propagate through the features in the predictor's history too
    grad_clip: float = 1.0
    batch_size: int = 8
    # loss "final": roll out and back-propagate this many trajectories of a minibatch at once (per process), the
    # gradients accumulated into the minibatch's one update (equal up to float summation order); None: all at once
    micro_batch: int | None = None
    # loss "final": gradient checkpointing of the trunk blocks on the full steps the final-latent loss
    # back-propagates through (`LESAConfig.checkpoint_trunk`): each block keeps its inputs instead of its activations
    # (FLUX.1-dev at 4,096 + 512 tokens: ~20 GiB a full step without it) for one more forward of them; same gradients
    checkpoint_trunk: bool = True
    val_fraction: float = 0.2
    seeds: int = 1
    seed: int = 0
    target: str = "feature"
    thresholds: tuple[float, ...] | None = None  # None: the model adapter's default (0.9, 0.5; Qwen-Image 0.9, 0.4)
    windows: tuple[int, ...] = (4, 8, 8)
    history: int = 8
    kan_hidden: tuple[int, ...] = (256, 256)
    gain: str = "kan"
    memory: str = "steps"  # what the history holds: "steps" (paper) or "full" (full-step features only)
    # "zero": near reuse (the paper: a small random gain); "reuse": exactly at reuse (FORA); "damped": at TaylorSeer
    # O1 with the damping fitted on the training trajectories; "linear" (needs step_filters): at the least-squares
    # linear forecaster fitted there; "best": at whichever of reuse, damped (and linear, with step_filters) scores
    # highest on the held-out split of the current placement
    gain_init: str = "zero"
    step_filters: bool = False  # a learned filter per step on top of the stage experts' (memory "full")
    # closed loop: "step" (each cached step), "cycle" (the error integrated over a cache cycle) or "final" (the log
    # error of the final latent, back-propagated through the whole sampler: the held-out score itself)
    loss: str = "step"
    # loss "final": also the log MSE of the latent at the end of each of the first `loss_cycles` cache cycles (the
    # latent entering the full step that closes it) against the recorded latents, weighted like the final one: more
    # weight on the early cycles, where a forecast error decides which image the sampler settles on
    loss_cycles: int = 0
    # loss "final": learn a full-step correction (`lesa.correction`) with the forecasts, one strength per full step,
    # started at `correction_start` on the first `correction_cycles` cycles after the warm-up (0 later), at its own
    # learning rate (cosine to lr_min as the others); "auto": train with and without it, keep the better on validation
    correction: bool | str = False
    correction_start: float = DEFAULT_STRENGTH
    correction_cycles: int = DEFAULT_CYCLES
    lr_correction: float = 1e-2
    select: str = "mse"  # held-out score that picks the kept checkpoint: final-latent "mse" or "psnr"
    # where the interval's budget of full steps goes: "uniform" (every N steps), "plan" (also a placement by dynamic
    # programming on the teacher-forced error; a predictor is trained on each and the better on the held-out split
    # kept) or "search" (also a closed-loop search, slow)
    schedule: str = "uniform"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # numbers first: a NaN learning rate or a batch of 0 would only fail (or silently train nothing) hours in
        peaks = [("lr_gt", self.lr_gt), ("lr_clar", self.lr_clar), ("lr_correction", self.lr_correction)]
        check_numbers([*peaks, ("grad_clip", self.grad_clip)], 0, above=True)
        floors = [("lr_min", self.lr_min), ("weight_decay", self.weight_decay), ("anchor", self.anchor)]
        counts = [("epochs_gt", self.epochs_gt), ("epochs_clar", self.epochs_clar), ("warmup", self.warmup)]
        strength = [("correction_start", self.correction_start), ("correction_cycles", self.correction_cycles)]
        check_numbers([*floors, *counts, *strength], 0)
        sizes = [
            ("batch_size", self.batch_size),
            ("micro_batch", self.micro_batch),
            ("seeds", self.seeds),
            ("interval", self.interval),
        ]
        widths = [("history", self.history), *(("windows", k) for k in self.windows)]
        check_numbers([*sizes, *widths, *(("kan_hidden", w) for w in self.kan_hidden)], 1)
        check_numbers(("thresholds", t) for t in self.thresholds or ())
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown or not self.phases:
            raise ValueError(f"unknown phase(s) {unknown or self.phases}; phases are {', '.join(PHASES)}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.gain_init == "linear" and not self.step_filters:
            raise ValueError("gain_init 'linear' sets the per-step filters: it needs step_filters")
        if (self.gain_init != "zero" or self.step_filters) and self.memory != "full":
            raise ValueError(
                f"gain_init {self.gain_init!r} / step_filters {self.step_filters} act on full-step features: "
                "they need memory 'full'"
            )
        if not 0 <= self.val_fraction < 1:  # 0: train on every trajectory (needs a validation recording)
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.loss_cycles < 0 or (self.loss_cycles and self.loss != "final"):
            raise ValueError(f"loss_cycles must be >= 0 and needs loss 'final', got {self.loss_cycles} / {self.loss!r}")
        if self.correction not in (True, False, "auto"):
            raise ValueError(f"correction must be true, false or 'auto', got {self.correction!r}")
        if self.correction and self.loss != "final":
            raise ValueError(f"a learned correction trains on the final latent: needs loss 'final', got {self.loss!r}")
        if self.micro_batch is not None and self.loss != "final":  # the other losses update inside the rollout
            raise ValueError(f"micro_batch splits the rollouts of loss 'final', got loss {self.loss!r}")

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it."""
        data = asdict(self)
        # seeds: each has its own checkpoint; micro_batch, checkpoint_trunk: how the work is laid out, not what is
        # trained (as the number of ranks), so a run that ran out of memory resumes with a smaller micro-batch
        for name in ("seeds", "micro_batch", "checkpoint_trunk"):
            data.pop(name)
        return json.loads(json.dumps(data))

    @classmethod
    def from_recipe(cls, recipe: str = DEFAULT_RECIPE, **overrides: Any) -> TrainConfig:
        """A config with a named recipe's settings (RECIPES), then `overrides`; the dataclass defaults alone are the
        paper's settings."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; recipes are {', '.join(RECIPES)}")
        settings = {**RECIPES[recipe], **overrides}
        if "windows" in overrides and "history" not in overrides:  # the history is as long as the largest window
            settings["history"] = max(settings["windows"])
        if settings.get("loss", "step") != "final":  # terms of loss "final"
            for name in ("loss_cycles", "correction"):
                if name not in overrides:
                    settings.pop(name, None)
        return cls(**settings)

    def better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        """Whether held-out score `a` beats `b` by the `select` criterion."""
        return a["psnr"] > b["psnr"] if self.select == "psnr" else a["mse"] < b["mse"]


def split_indices(n: int, val_fraction: float, groups: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """A fixed train / held-out split of n trajectories (independent of the training seed).

    `groups` (e.g. each trajectory's prompt): trajectories of one group land on the same side, so a prompt recorded
    with several seeds never is both trained on and held out; the split is drawn over groups, and with one
    trajectory per group it is the plain split.
    """
    if n < 2:
        raise ValueError(f"training needs at least 2 recorded trajectories (one held out for validation), got {n}")
    keys = list(groups) if groups is not None else list(range(n))
    if len(keys) != n:
        raise ValueError(f"split_indices: {len(keys)} groups for {n} trajectories")
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    if len(members) < 2:
        raise ValueError(
            f"training needs at least 2 distinct prompts (one held out for validation), got {len(members)}"
        )
    order = list(members.values())
    random.Random(1234).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return sorted(i for m in order[n_val:] for i in m), sorted(i for m in order[:n_val] for i in m)


def check_validation_recording(train: Recording, val: Recording, notice: Callable[[str], None] = stderr_notice) -> None:
    """Raise a ValueError unless `val` can validate predictors trained on `train`: the same model, sampler settings,
    sigmas, contexts and tensor shapes, and none of `train`'s trajectories (one trained on would not be held out);
    `notice` one line when some start from the initial noise of a training trajectory of another prompt.

    Trajectories, not prompt strings, are compared (`lesa.trajectories`): a class-conditional model's prompts repeat
    with other seeds, and a reworded prompt with a training trajectory's seed is another string."""
    where = f"validation recording {val.dir} (for {train.dir})"
    for key in sorted({*train.settings, *val.settings} - {"seed"}):  # the noise seed may differ
        if train.settings.get(key) != val.settings.get(key):
            raise ValueError(
                f"{where}: settings field {key!r} is {val.settings.get(key)!r}, the training recording's is "
                f"{train.settings.get(key)!r}; record the validation prompts with the same settings"
            )
    for name in ("sigmas", "contexts", "shapes"):
        if getattr(train, name) != getattr(val, name):
            raise ValueError(f"{where}: its {name} differ from the training recording's")
    check_disjoint(
        Trajectories.of(val),
        [Trajectories.of(train)],
        where,
        "the training recording",
        "validation needs trajectories that are not trained on",
        "seed base (`lesa record --seed`)",
        notice,
    )


def cosine_lr(peak: float, floor: float, t: int, total: int) -> float:
    if total <= 1:
        return peak
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(t, total) / total))


def latent_psnr(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of a final latent against the full-compute latent, peak = the reference's range."""
    mse = float(((pred.float() - ref.float()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


class Trainer:
    """Trains one or more seeds of a predictor on one recording, with checkpoints in `out/checkpoints`.

    Without `validation`, a fixed split of the recording's prompts is held out for validation (checkpoint, start,
    placement and correction choices); with it, the trajectories of `validation` (a recording of other prompts with
    the same settings) are the held-out ones and every trajectory of `recording` is trained on (config.val_fraction
    0) or all but that split of it. Trajectory indices of `validation` follow those of `recording` (n, n + 1, ...)."""

    def __init__(
        self,
        recording: Recording,
        pipe,
        out_dir: str | Path,
        config: TrainConfig,
        log=print,
        progress: bool = True,
        validation: Recording | None = None,
    ) -> None:
        self.rec = recording
        self.val_rec = validation
        self.pipe = pipe
        self.out = Path(out_dir)
        check_predictor_dir(self.out)  # before any work: the predictor is saved there at the end
        self.base = config  # as given: its correction may be "auto"; self.cfg is the variant being trained
        self.cfg = config if config.correction != "auto" else replace(config, correction=True)
        self.dist = distributed.current()
        self.log = log if self.dist.is_main else _quiet
        self.progress = progress and self.dist.is_main
        self.settings = recording.settings
        self.num_steps = self.settings["steps"]
        self._use_schedule(StepSchedule(config.interval, config.warmup))
        if not self.cached_steps:
            raise ValueError(
                f"interval {config.interval} / warmup {config.warmup} leave no cached step in {self.num_steps} steps "
                f"(steps 0..{config.warmup} are always full): nothing to train. For a few-step (distilled) model use "
                "a short warm-up and interval, e.g. --warmup 1 --interval 2 (see docs/models.md, 'Few-step models')"
            )
        # Few-step schedules: a cached step s has at most s earlier features, so a window beyond the last cached
        # step's index can never fill; shrink K to what the schedule can supply (50 steps: no change).
        reach = max(self.cached_steps)
        if config.loss_cycles and "latents" not in recording.shapes:
            raise ValueError(
                f"loss_cycles {config.loss_cycles} scores the latents of each step, which {recording.dir} does not "
                "hold (recorded before `lesa record` stored them): record it again into a new directory, or pass "
                "--loss-cycles 0"
            )
        self.windows = tuple(min(k, reach) for k in config.windows)
        prompts = [entry["prompt"] for entry in recording.entries]
        if validation is None:
            if config.val_fraction == 0:
                raise ValueError("val_fraction 0 holds nothing out: give a validation recording (--val-data)")
            self.train_idx, self.val_idx = split_indices(len(recording), config.val_fraction, prompts)
        else:
            check_validation_recording(recording, validation, stderr_notice if self.dist.is_main else _quiet)
            # a val_fraction still leaves that split of the recording out of training (e.g. when the validation
            # prompts describe its scenes afresh); it is not scored either
            train = split_indices(len(recording), config.val_fraction, prompts)[0] if config.val_fraction else None
            self.train_idx = train if train is not None else list(range(len(recording)))
            self.val_idx = list(range(len(recording), len(recording) + len(validation)))
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self.sigmas = torch.tensor(recording.sigmas, dtype=torch.float32)
        model_class = type(pipe.transformer).__name__
        if model_class != self.settings["model_class"]:
            raise ValueError(
                f"{recording.dir} was recorded from a {self.settings['model_class']}, "
                f"but the pipeline's transformer is a {model_class}"
            )

    @classmethod
    def for_scoring(
        cls, recording: Recording, predictor: PredictorConfig, val_fraction: float = 0.2, pipe=None
    ) -> Trainer:
        """A quiet trainer on `predictor`'s schedule (its placed full steps too) and `lesa train`'s held-out split,
        for scoring predictors and baselines on that split; it trains nothing and writes nothing. Without `pipe`, the
        recording's model on the CPU."""
        if pipe is None:
            from .models import load_pipeline

            pipe = load_pipeline(recording.settings["model"], "cpu")
            pipe.set_progress_bar_config(disable=True)
        config = TrainConfig(interval=predictor.interval, warmup=predictor.warmup, val_fraction=val_fraction)
        trainer = cls(recording, pipe, "unused", config, log=_quiet, progress=False)
        trainer._use_schedule(predictor.schedule())
        return trainer

    def _trajectory(self, i: int) -> tuple[Recording, int]:
        """The recording holding trajectory `i` and its index there (validation trajectories follow the others)."""
        n = len(self.rec)
        return (self.rec, i) if i < n or self.val_rec is None else (self.val_rec, i - n)

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        rec, j = self._trajectory(i)
        return rec.load(j)

    def _prompt(self, i: int) -> str:
        rec, j = self._trajectory(i)
        return rec.entries[j]["prompt"]

    # -- predictor ---------------------------------------------------------------------------------------------------
    def new_predictor(self, seed: int) -> LESAPredictor:
        adapter = get_adapter(self.settings["model_class"])
        thresholds = self.cfg.thresholds if self.cfg.thresholds is not None else adapter.stage_thresholds
        torch.manual_seed(seed)
        config = PredictorConfig(
            model_class=self.settings["model_class"],
            tap=adapter.tap,
            num_steps=self.num_steps,
            sigmas=list(self.rec.sigmas),
            feature_dim=self.rec.feature_dim,
            dtype=str(self.dtype).replace("torch.", ""),
            interval=self.cfg.interval,
            warmup=self.cfg.warmup,
            explicit_full_steps=list(self.schedule.explicit),
            thresholds=list(thresholds),
            windows=list(self.windows),
            history=min(self.cfg.history, max(self.windows)),
            contexts=list(self.rec.contexts),
            kan_hidden=list(self.cfg.kan_hidden),
            gain=self.cfg.gain,
            target=self.cfg.target,
            memory=self.cfg.memory,
            gain_bias=self.damping if self.start in ("damped", "linear") else 0.0,
            step_filters=self.cfg.step_filters,
            correction=self.cfg.correction,
            base_model=self.settings["model"],
        )
        predictor = LESAPredictor(config)
        if self.cfg.correction:
            with torch.no_grad():
                for step, strength in self.start_correction().items():
                    predictor.correction[step] = strength
        if self.start != "zero":  # exactly reuse / damped TaylorSeer O1 until trained
            for experts in predictor.experts.values():
                for expert in experts:
                    expert.zero_gain()
        if self.start == "linear":  # ... and with the per-step filters exactly the least-squares forecaster
            self._start_at_linear(predictor)
        return predictor.to(self.device)

    @functools.cached_property
    def start(self) -> str:
        """Where a new predictor starts: gain_init, with "best" resolved by the closed-loop held-out PSNR on the
        current schedule of reuse (FORA), damped TaylorSeer O1 and, with step filters, the least-squares linear
        forecaster. (A placement that suits reuse can leave damped TaylorSeer far behind: starting there, training
        may not even climb back to reuse.)"""
        if self.cfg.gain_init != "best":
            return self.cfg.gain_init
        scores = {
            "reuse": self.baseline_error(FORAConfig(**self._schedule_kwargs(), correction=self.start_correction()))[
                "psnr"
            ],
            "damped": self._damped_score(correction=self.start_correction()),
        }
        if self.cfg.step_filters:
            history = min(self.cfg.history, max(self.windows))
            linear = LinearForecastConfig(
                weights=self.linear_weights(history), **self._schedule_kwargs(), correction=self.start_correction()
            )
            scores["linear"] = self.baseline_error(linear)["psnr"]
        start = max(scores, key=scores.get)
        self.log(f"start: {start} (held-out PSNR " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + " dB)")
        return start

    def start_correction(self) -> dict[int, float]:
        """The correction a predictor starts from on the current schedule (`correction.first_cycles`); {} when off."""
        if not self.cfg.correction:
            return {}
        full = self.schedule.full_steps(self.num_steps)
        return first_cycles(full, self.cfg.warmup, self.cfg.correction_start, self.cfg.correction_cycles)

    @torch.no_grad()
    def _start_at_linear(self, predictor: LESAPredictor) -> None:
        """Set the per-step filters so that each cached step's folded filter equals the least-squares linear
        forecaster's weights over the last `history` full-step features (fitted on the training trajectories)."""
        history = predictor.config.history
        weights = self.linear_weights(history)
        for context, table in predictor.step_filters.items():
            for step, w in weights.items():
                target = torch.zeros(history)
                for j, wj in enumerate(w):  # w is newest first; the window is oldest first
                    target[history - 1 - j] = wj
                target[history - 1] -= 1.0  # the forecast adds h[-1] itself
                table[step] = target - predictor.step_coefficients(context, step, self.sigmas)[0]

    def linear_weights(self, history: int) -> dict[int, list[float]]:
        """The least-squares linear forecaster of the current schedule, fitted on the training trajectories."""
        cache = self.__dict__.setdefault("_linear", {})
        key = (self.schedule, history)
        if key not in cache:
            cache[key] = fit_linear(self.rec, self.schedule, history=history, indices=self.train_idx)
        return cache[key]

    def _use_schedule(self, schedule: StepSchedule) -> None:
        if schedule == getattr(self, "schedule", None):
            return  # keep what was fitted on it (run() sets the kept schedule again after training)
        self.schedule = schedule
        self.cached_steps = schedule.cached_steps(self.num_steps)
        for fitted in ("damping", "start"):  # refit on the new schedule when next asked
            self.__dict__.pop(fitted, None)

    def variants(self) -> list[tuple[str, str, list[int], bool]]:
        """What `run` trains a predictor on, as (name, placement, full steps, correction): the placements of
        `schedule_candidates` (the uniform one alone with schedule "uniform"), each with and without the correction
        when it is "auto" (only the kept one when an earlier run chose)."""
        if self.base.schedule == "uniform":
            placements = {"uniform": StepSchedule(self.cfg.interval, self.cfg.warmup).full_steps(self.num_steps)}
            kept = None
        else:
            placements, kept = self.schedule_candidates()
        if self.base.correction != "auto":
            return [(name, name, full, self.base.correction) for name, full in placements.items()]
        corrections = (True, False) if kept is None else (kept,)
        return [
            (f"{name}, {'with' if c else 'no'} correction", name, full, c)
            for name, full in placements.items()
            for c in corrections
        ]

    def _use_variant(self, full: list[int], correction: bool) -> None:
        self.cfg = replace(self.base, correction=correction)
        self.__dict__.pop("start", None)  # where a predictor starts depends on the correction too
        self._use_schedule(self._explicit(full))

    def schedule_candidates(self) -> tuple[dict[str, list[int]], bool | None]:
        """Schedule "plan" / "search": the placements to train on, by name: those of `search_full_steps` (uniform
        included, duplicates dropped), or the one kept before, and the correction kept before (None: none yet). The
        search is saved to `out/schedule.json` and, once `run` has trained on every candidate, the kept one with it;
        later runs of the same schedule settings (a resumed run, another seed) read it instead of searching again."""
        path = self.out / "schedule.json"
        key = self.schedule_settings()
        saved = distributed.on_main(lambda: json.loads(path.read_text()) if path.exists() else None)
        if saved is not None and saved.get("settings") == key and "full_steps" in saved:
            kept = saved.get("kept", "placed")
            self.log(f"schedule: {kept} {saved['full_steps']} (kept before, {path})")
            return {kept: saved["full_steps"]}, saved.get("correction")
        if saved is None or saved.get("settings") != key:
            saved = {"settings": key, **self.search_full_steps(refine=self.cfg.schedule == "search")}
            if self.dist.is_main:
                atomic_write_text(path, json.dumps(saved, indent=1) + "\n")
        candidates: dict[str, list[int]] = {}
        for name in saved["held_out_psnr"]:
            if saved[name] not in candidates.values():
                candidates[name] = saved[name]
        return candidates, None

    def keep_schedule(self, placement: str, correction: bool, trained: dict[str, float]) -> None:
        """Record in `out/schedule.json` the placement (and with correction "auto" the correction) kept and the
        held-out PSNR of the predictor trained on each candidate."""
        path = self.out / "schedule.json"
        if self.dist.is_main:
            saved = json.loads(path.read_text())
            saved.update(kept=placement, full_steps=saved[placement], trained_held_out_psnr=trained)
            if self.base.correction == "auto":
                saved["correction"] = correction
            atomic_write_text(path, json.dumps(saved, indent=1) + "\n")

    def schedule_settings(self) -> dict[str, Any]:
        """What a schedule search and the choices kept after it depend on (a saved search is reused only under the
        same settings)."""
        key = {k: getattr(self.cfg, k) for k in ("interval", "warmup", "val_fraction", "schedule")}
        key.update(search_trajectories=SEARCH_TRAJECTORIES, recording=self.rec.fingerprint, steps=self.num_steps)
        if self.val_rec is not None:
            key["validation"] = self.val_rec.fingerprint
        if self.base.correction == "auto":
            key["correction"] = "auto"
        return key

    def search_full_steps(self, refine: bool = True) -> dict[str, Any]:
        """Candidate placements of the uniform schedule's number of full steps, found for damped TaylorSeer O1 (its
        g fitted for the uniform schedule): by dynamic programming on its teacher-forced error
        (`calibrate.search_schedule`), then, with `refine`, by a closed-loop coordinate search
        (`calibrate.refine_schedule`, final-latent PSNR through the pipeline) started from the better of uniform and
        that, both on up to SEARCH_TRAJECTORIES training trajectories. Returns the schedules and damped TaylorSeer
        O1's held-out PSNR on each (g refitted per schedule)."""
        uniform_schedule = StepSchedule(self.cfg.interval, self.cfg.warmup)
        self._use_schedule(uniform_schedule)
        uniform = uniform_schedule.full_steps(self.num_steps)
        g = self.damping
        search_idx = self.train_idx[:SEARCH_TRAJECTORIES]
        self.log(f"schedule {self.cfg.schedule}: {len(uniform)} full steps, on {len(search_idx)} training trajectories")
        errors = forecast_errors(self.rec, g, search_idx)
        planned = search_schedule(errors, len(uniform), self.cfg.warmup)

        out: dict[str, Any] = {"uniform": uniform, "dynamic programming": planned}

        def score(full: list[int]) -> float:
            config = TaylorSeerConfig(order=1, damping=g, **self._schedule_kwargs(full))
            return self.closed_loop_error(config, search_idx)["psnr"]

        if refine:
            out["searched"], value = refine_schedule(
                score, uniform, self.num_steps, self.cfg.warmup, log=self.log, alternatives=[planned]
            )
            self.log(f"schedule search: {out['searched']} (training PSNR {value:.2f})")
        held_out = {}
        for name in out:
            self._use_schedule(self._explicit(out[name]))
            held_out[name] = self._damped_score()
        self._use_schedule(uniform_schedule)
        self.log(
            "schedules: held-out damped TaylorSeer O1 "
            + ", ".join(f"{name} {v:.2f}" for name, v in held_out.items())
            + " dB"
        )
        return {**out, "held_out_psnr": held_out}

    def _explicit(self, full: list[int]) -> StepSchedule:
        """The schedule with these full steps (the plain uniform one when they are its own)."""
        uniform = StepSchedule(self.cfg.interval, self.cfg.warmup)
        if full == uniform.full_steps(self.num_steps):
            return uniform
        return StepSchedule(self.cfg.interval, self.cfg.warmup, explicit=tuple(full[self.cfg.warmup + 1 :]))

    def _schedule_kwargs(self, full: list[int] | None = None) -> dict[str, Any]:
        """A CacheConfig's schedule fields for the current schedule (or for the one with these full steps)."""
        s = self.schedule if full is None else self._explicit(full)
        return dict(interval=s.interval, warmup=s.warmup, explicit_full_steps=s.explicit, count_flops=False)

    def _damped_score(self, correction: dict[int, float] | None = None) -> float:
        """Held-out PSNR of damped TaylorSeer O1 (g fitted on the training split) on the current schedule, with
        `correction` if given."""
        config = TaylorSeerConfig(order=1, damping=self.damping, **self._schedule_kwargs(), correction=correction or {})
        return self.baseline_error(config)["psnr"]

    @functools.cached_property
    def damping(self) -> float:
        """TaylorSeer O1's damping g fitted on the training trajectories (closed-form least squares); 1 when no
        cached step has two full steps before it (a few-step schedule: every forecast is then the last feature)."""
        # decided from the schedule, not by catching fit_damping's ValueError: that also means a corrupt shard
        if not damping_cycles(self.schedule, self.num_steps):
            return 1.0
        return fit_damping(self.rec, self.schedule, self.train_idx)

    def _update(
        self,
        predictor: LESAPredictor,
        optimizer: torch.optim.Optimizer,
        state: dict,
        loss_sum: torch.Tensor | Iterable[torch.Tensor] | None,
        count: int,
        peak: float,
        total: int,
        ddp: bool = False,
    ) -> float:
        """One update from this rank's summed loss `loss_sum` (L1 error, or log MSE with loss "final"; None: this rank
        has no data in the minibatch) over a minibatch of `count` elements (trajectories with loss "final") on all
        ranks together. Returns the minibatch's mean loss (equal on all ranks).

        `loss_sum` may also be an iterable of the summed losses of the share's micro-batches: each is back-propagated
        as it comes (a generator rolls the next one out only then, so one micro-batch's graph is alive at a time) and
        their gradients add up to the whole share's. Gradients are summed over ranks: with `ddp` by
        DistributedDataParallel during backward (it averages, so the loss carries the world size), otherwise by an
        explicit all-reduce after backward.
        """
        scale = (self.dist.world_size if ddp else 1) / count
        optimizer.zero_grad(set_to_none=True)
        local = torch.zeros(1, dtype=torch.float64)
        for part in [loss_sum] if isinstance(loss_sum, torch.Tensor) else loss_sum or ():
            local += part.detach().double().reshape(1).cpu()
            (part * scale).backward()
        value = float(distributed.all_reduce_sum(local)[0]) / count
        if not math.isfinite(value):  # divergence guard: never let a NaN update reach the weights (all ranks agree)
            state["skipped"] = state.get("skipped", 0) + 1
            optimizer.zero_grad(set_to_none=True)  # after the backward DDP expects of its forward
            return value
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(group.get("peak", peak), self.cfg.lr_min, state["t"], total)
        if not ddp:
            distributed.all_reduce_gradients(predictor)
        torch.nn.utils.clip_grad_norm_(predictor.parameters(), self.cfg.grad_clip)
        optimizer.step()
        if self.cfg.anchor > 0:
            with torch.no_grad():
                for p, start in zip(predictor.parameters(), state["anchor"], strict=True):
                    p.lerp_(start, min(1.0, optimizer.param_groups[0]["lr"] * self.cfg.anchor))
        state["t"] += 1
        return value

    def _param_groups(self, predictor: LESAPredictor, peak: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: the learned correction (if any) at its own peak learning rate."""
        correction = [predictor.correction] if predictor.config.correction else []
        rest = [p for p in predictor.parameters() if all(p is not c for c in correction)]
        groups: list[dict[str, Any]] = [{"params": rest, "lr": peak}]
        if correction:
            groups.append({"params": correction, "lr": self.cfg.lr_correction, "peak": self.cfg.lr_correction})
        return groups

    def _share(self, batch: list[int]) -> list[int]:
        """This rank's part of a minibatch (the whole minibatch in one process)."""
        return batch[self.dist.rank :: self.dist.world_size]

    def _elements(self, key: str) -> int:
        """Elements of one trajectory's `key` tensor at one step."""
        return math.prod(self.rec.shapes[key][1:])

    def _stack(self, data: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        """(steps, batch, ...) float32 on the device; an empty batch gives a zero-size tensor of the right shape."""
        if not data:
            steps, *shape = self.rec.shapes[key]
            return torch.zeros((steps, 0, *shape), device=self.device)
        return torch.stack([d[key] for d in data], 1).to(self.device, torch.float32)

    def _batches(self, indices: list[int], seed: int | None = None, size: int | None = None) -> list[list[int]]:
        """Minibatches of `indices` (of `size`, default batch_size), shuffled by `seed` (None: in order)."""
        order = list(indices)
        if seed is not None:
            random.Random(seed).shuffle(order)
        b = size or self.cfg.batch_size
        return [order[i : i + b] for i in range(0, len(order), b)]

    def _updates_per_rollout(self, phase: str) -> int:
        """Updates per minibatch: one per cached step and context, or with the cycle loss of phase clar one per cache
        cycle (run of cached steps) and context."""
        if phase == "clar" and self.cfg.loss == "final":
            return 1
        if phase == "clar" and self.cfg.loss == "cycle":
            steps = [s for s in self.cached_steps if s - 1 not in self.cached_steps]
        else:
            steps = self.cached_steps
        return len(steps) * len(self.rec.contexts)

    def _updates_per_epoch(self, phase: str) -> int:
        return math.ceil(len(self.train_idx) / self.cfg.batch_size) * self._updates_per_rollout(phase)

    # -- phases ------------------------------------------------------------------------------------------------------
    def gt_epoch(self, predictor, optimizer, state, epoch_seed: int, total: int, desc: str) -> float:
        """Teacher forcing: the history always holds recorded features; no transformer call."""
        losses = []
        ddp = self.dist.distributed
        # every forecast uses one expert of one context: the other parameters get no gradient in that update
        model = (
            DistributedDataParallel(predictor, find_unused_parameters=True, forward_sync_buffers=False)
            if ddp
            else predictor
        )
        for batch in tqdm(self._batches(self.train_idx, epoch_seed), desc=desc, disable=not self.progress, leave=False):
            data = [self.rec.load(i) for i in self._share(batch)]
            for ctx in self.rec.contexts:
                key = f"{ctx}.feature"
                feats = self._stack(data, key)
                count = len(batch) * self._elements(key)
                for s in self.cached_steps:
                    past = [feats[j] for j in predictor.past_steps(s)]
                    pred = model(past, ctx, s, self.sigmas)
                    loss_sum = (pred - feats[s]).abs().sum()
                    losses.append(
                        self._update(predictor, optimizer, state, loss_sum, count, self.cfg.lr_gt, total, ddp=ddp)
                    )
        return sum(losses) / len(losses)

    def clar_epoch(self, predictor, optimizer, state, epoch_seed: int, total: int, desc: str) -> float:
        """Closed loop: the real sampler from the recorded noise; forecasts feed back; loss vs the recording.

        Each rank rolls out its share of the minibatch; a rank with no share still takes part in every update."""
        losses: list[float] = []
        targets: dict[str, torch.Tensor] = {}
        key = "feature" if self.cfg.target == "feature" else "output"
        batch_size = 0

        # loss "cycle": per context, the dt-weighted error summed over the cached steps since the last full step
        pending: dict[str, tuple[torch.Tensor, float]] = {}
        step_sizes = (self.sigmas[:-1] - self.sigmas[1:]).abs().tolist()

        def update(context: str, loss_sum: torch.Tensor) -> None:
            count = batch_size * self._elements(f"{context}.{key}")
            losses.append(self._update(predictor, optimizer, state, loss_sum, count, self.cfg.lr_clar, total))

        def flush(context: str) -> None:
            if context in pending:
                error, weight = pending.pop(context)
                with torch.enable_grad():  # a full step's event comes inside the pipeline's no_grad
                    update(context, (error / weight).abs().sum())

        def observer(event: StepEvent) -> None:
            if event.full:
                flush(event.context)
                return
            pred = event.tap if key == "feature" else event.output
            target = as_call_batch(targets[event.context][event.step], pred.dim()).to(pred.device)
            if self.cfg.loss == "step":
                update(event.context, (pred.float() - target).abs().sum())
            else:
                error, weight = pending.get(event.context, (0.0, 0.0))
                w = step_sizes[event.step]
                pending[event.context] = (error + w * (pred.float() - target), weight + w)

        config = LESAConfig(
            predictor=predictor,
            differentiable=True,
            history_grad=self.cfg.history_grad,
            checkpoint_trunk=self.cfg.checkpoint_trunk,
            count_flops=False,
        )
        final = self.cfg.loss == "final"  # one loss on the rollout's result: no per-step observer, no targets
        updates = self._updates_per_rollout("clar")
        with self._frozen_pipeline():
            enable(self.pipe, config)
            try:
                if not final:
                    get_runtime(self.pipe.transformer).observers.append(observer)
                for batch in tqdm(
                    self._batches(self.train_idx, epoch_seed), desc=desc, disable=not self.progress, leave=False
                ):
                    share = self._share(batch)
                    batch_size = len(batch)
                    before = len(losses)
                    if share and final:  # one micro-batch rolled out (and its graph alive) at a time
                        parts = (
                            self.final_loss(part, [self.rec.load(i) for i in part])
                            for part in self._batches(share, size=self.cfg.micro_batch or len(share))
                        )
                        losses.append(
                            self._update(predictor, optimizer, state, parts, batch_size, self.cfg.lr_clar, total)
                        )
                    elif share:
                        data = [self.rec.load(i) for i in share]
                        for ctx in self.rec.contexts:
                            targets[ctx] = torch.stack([d[f"{ctx}.{key}"] for d in data], 1).float()
                        self._run(share, data)
                        for ctx in list(pending):
                            flush(ctx)
                    else:  # nothing to roll out here: join the other ranks' gradient sums with no contribution
                        count = batch_size * self._elements(f"{self.rec.contexts[0]}.{key}")  # scales the logged loss
                        for _ in range(updates):
                            losses.append(
                                self._update(predictor, optimizer, state, None, count, self.cfg.lr_clar, total)
                            )
                    if share and len(losses) - before != updates:
                        raise RuntimeError(
                            f"a closed-loop rollout made {len(losses) - before} updates, expected {updates} "
                            f"(loss {self.cfg.loss!r}, {len(self.rec.contexts)} contexts)"
                        )
            finally:
                disable(self.pipe)
        return sum(losses) / max(len(losses), 1)

    @contextlib.contextmanager
    def _frozen_pipeline(self) -> Iterator[None]:
        """Within: every parameter of the pipeline's modules (transformer, text encoders, VAE, any other nn.Module
        component) frozen, their requires_grad flags restored after. The closed loop trains the predictor alone: a
        text encoder left trainable under loss "final" would get a gradient of every weight (~9.8 GB on FLUX.1-dev)
        and autograd would keep its activations; frozen, it runs as without gradients."""
        components = getattr(self.pipe, "components", {})
        modules = [m for m in (self.pipe.transformer, *components.values()) if isinstance(m, torch.nn.Module)]
        flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]  # a shared module: twice, same flag
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def final_loss(self, batch: list[int], data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Loss "final": the summed log MSE of these trajectories' final latents against the recording, with
        gradients through the whole sampler (the pipeline must run a differentiable LESAConfig). Its mean over
        trajectories is the held-out score, mean PSNR, up to sign and scale. The features in the predictor's history
        stay detached unless `history_grad`: a forecast then reaches the loss through the latents and every later step,
        not through later forecasts (the exact gradient, `history_grad`, trains stably only at a low learning rate,
        BENCHMARKS.md). With `loss_cycles`, the same term of the latents at the end of the first cache cycles is
        added."""

        def log_mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
            return ((x.float() - ref.to(x.device, torch.float32)) ** 2).flatten(1).mean(1).log().sum()

        full = self.cycle_ends()[: self.cfg.loss_cycles]
        with self.latents_at(full, len(batch)) as latents:
            loss = log_mse(self._run(batch, data, grad=True), torch.stack([d["final"] for d in data]))
        for step in full:
            loss = loss + log_mse(latents[step], torch.stack([d["latents"][step] for d in data]))
        return loss

    def cycle_ends(self) -> list[int]:
        """The full steps after the warm-up: each closes a cache cycle, and the latent entering it ends that cycle."""
        return [s for s in self.schedule.full_steps(self.num_steps) if s > self.cfg.warmup]

    @contextlib.contextmanager
    def latents_at(self, steps: Sequence[int], rows: int) -> Iterator[dict[int, torch.Tensor]]:
        """Within: the latent entering each of `steps` in the pipeline's calls, by step (its first `rows` rows, one
        per prompt: a pipeline that batches guidance repeats them), with its autograd graph."""
        latents: dict[int, torch.Tensor] = {}

        def grab(event: StepEvent) -> None:  # the first context's call of a step: every context gets these latents
            if event.step in steps and event.step not in latents:
                latents[event.step] = event.latents[:rows]

        observers = get_runtime(self.pipe.transformer).observers
        observers.append(grab)
        try:
            yield latents
        finally:
            observers.remove(grab)

    def _run(self, batch: list[int], data: list[dict[str, torch.Tensor]], grad: bool = False) -> torch.Tensor:
        """The pipeline on these trajectories' prompts and noise; `grad`: with autograd through the whole sampler
        (diffusers pipelines run `__call__` under no_grad, so its undecorated function is called)."""
        prompts = [self._prompt(i) for i in batch]
        noise = torch.stack([d["noise"] for d in data]).to(self.device, self.dtype)
        kwargs = call_kwargs(self.settings, self.pipe)
        if isinstance(kwargs.get("negative_prompt"), str):  # one negative prompt per prompt of the batch
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
        if not grad:
            return pipeline_output(self.pipe(prompt=prompts, latents=noise, **kwargs))
        with torch.enable_grad():
            call = inspect.unwrap(type(self.pipe).__call__)
            return pipeline_output(call(self.pipe, prompt=prompts, latents=noise, **kwargs))

    # -- validation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollouts(
        self, config: CacheConfig, indices: list[int], steps: Sequence[int] = ()
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]]:
        """The pipeline run with `config` on these trajectories, in the order of `indices`: per trajectory its
        recording, its final latent and the latent entering each of `steps` (fp32, on the CPU)."""
        enable(self.pipe, config)
        try:
            for batch in self._batches(indices):
                data = [self._load(i) for i in batch]
                with self.latents_at(steps, len(batch)) as latents:
                    final = self._run(batch, data).float().cpu()
                for row, d in enumerate(data):
                    yield d, final[row], {s: x[row].float().cpu() for s, x in latents.items()}
        finally:
            disable(self.pipe)

    def trajectory_errors(self, config: CacheConfig, indices: list[int]) -> list[tuple[float, float]]:
        """(MSE, PSNR) of each trajectory's final latent against the recording, running the pipeline with `config`,
        in the order of `indices` (this process's trajectories only: no reduction across ranks)."""
        return [
            (float(((out - d["final"]) ** 2).mean()), latent_psnr(out, d["final"]))
            for d, out, _ in self.rollouts(config, indices)
        ]

    def closed_loop_error(self, config: CacheConfig, indices: list[int] | None = None) -> dict[str, float]:
        """Mean MSE and PSNR of the final latent against the recording, running the pipeline with `config`
        (each rank runs its share of `indices`; the means are over all of them and equal on every rank)."""
        indices = self.val_idx if indices is None else indices
        sums = torch.zeros(3, dtype=torch.float64)  # MSE, PSNR, count
        for mse, psnr in self.trajectory_errors(config, self._share(indices)):
            sums += torch.tensor([mse, psnr, 1.0])
        mse, psnr, n = distributed.all_reduce_sum(sums).tolist()
        return {"mse": mse / n, "psnr": psnr / n}

    def baseline_error(self, config: CacheConfig) -> dict[str, float]:
        """`closed_loop_error` on the held-out split of a fixed (untrained) method, computed once per configuration:
        the start of a predictor and the training log's baselines score the same ones."""
        cache = self.__dict__.setdefault("_baseline_errors", {})
        key = repr(config)  # the whole configuration, schedule included
        if key not in cache:
            cache[key] = self.closed_loop_error(config)
        return cache[key]

    def score(self, predictor: LESAPredictor) -> dict[str, float]:
        return self.closed_loop_error(LESAConfig(predictor=predictor, count_flops=False))

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it: the settings of the variant being trained and
        the content of the recordings it trains and validates on (other data under the same path is other data)."""
        validation = None if self.val_rec is None else self.val_rec.fingerprint
        return {**self.cfg.fingerprint(), "data": self.rec.fingerprint, "validation_data": validation}

    # -- one seed, resumable -----------------------------------------------------------------------------------------
    def train_seed(self, seed: int, variant: str | None = None) -> dict[str, Any]:
        """Train one seed on the current schedule and correction (`variant`: their name when `run` trains several,
        which keeps its checkpoints apart from the others')."""
        slug = None if variant is None else variant.replace(",", "").replace(" ", "-")
        name = f"seed{seed}" if slug is None else f"{slug}-seed{seed}"
        ckpt_path = self.out / "checkpoints" / f"{name}.safetensors"
        distributed.on_main(lambda: refuse_pickles(ckpt_path.parent, f"{name}.pt"))
        predictor = self.new_predictor(seed)
        distributed.broadcast_parameters(predictor)  # bit-identical replicas from the start, whatever the phase
        # what --anchor pulls toward (kept in the optimiser state, so a resumed run pulls toward the same start)
        anchor = {"anchor": [p.detach().clone() for p in predictor.parameters()]} if self.cfg.anchor else {}
        fingerprint = self.fingerprint()
        # rank 0 reads the checkpoint and hands it to every rank: the replicas resume from the same state
        ckpt = distributed.on_main(lambda: load_checkpoint(ckpt_path) if ckpt_path.exists() else None)
        if ckpt is not None:
            # a setting added since the checkpoint was written counts as its default, the behaviour from before it
            saved = {**TrainConfig().fingerprint(), **ckpt["fingerprint"]}
            if saved != fingerprint:
                recordings = {"data": "the --data recording", "validation_data": "the --val-data recording"}
                diff = [
                    f"{k}: {recordings[k]}'s content differs" if k in recordings else k
                    for k in {**saved, **fingerprint}
                    if saved.get(k) != fingerprint.get(k)
                ]
                raise ValueError(
                    f"{ckpt_path} was made with other settings ({', '.join(diff)}); "
                    f"train into another --out or pass --restart"
                )
            ckpt["fingerprint"] = fingerprint
            predictor.load_state_dict(ckpt["predictor"])
            if not ckpt["done"]:
                phase = self.cfg.phases[ckpt["phase_index"]] if ckpt["phase_index"] >= 0 else "init"
                self.log(f"seed {seed}: resuming from {ckpt_path} after {phase} epoch {ckpt['epoch']}")
        else:
            ckpt = {"fingerprint": fingerprint, "phase_index": -1, "epoch": 0, "log": [], "done": False}
            init = self.score(predictor)
            ckpt.update(best=init, best_state=_cpu_state(predictor), best_at="init")
            ckpt["log"].append({"phase": "init", "epoch": 0, "val": init})
        if ckpt["done"]:
            return ckpt
        epochs = {"gt": self.cfg.epochs_gt, "clar": self.cfg.epochs_clar}
        peaks = {"gt": self.cfg.lr_gt, "clar": self.cfg.lr_clar}
        for p, phase in enumerate(self.cfg.phases):
            resuming = p == ckpt["phase_index"]
            if p < ckpt["phase_index"] or (resuming and ckpt["epoch"] >= epochs[phase]):
                continue
            # a fresh optimizer and learning-rate schedule for every phase (never the previous phase's)
            decay = 0.0 if self.cfg.anchor else self.cfg.weight_decay  # the anchor replaces the decay toward zero
            optimizer = torch.optim.AdamW(self._param_groups(predictor, peaks[phase]), weight_decay=decay)
            total = epochs[phase] * self._updates_per_epoch(phase)
            state, start = {"t": 0, **anchor}, 1
            if resuming:
                optimizer.load_state_dict(ckpt["optimizer"])
                state, start = ckpt["opt_state"], ckpt["epoch"] + 1
            run_epoch = self.gt_epoch if phase == "gt" else self.clar_epoch
            for epoch in range(start, epochs[phase] + 1):
                desc = f"seed {seed} {phase} {epoch}/{epochs[phase]}"
                loss = run_epoch(predictor, optimizer, state, seed * 1000 + p * 100 + epoch, total, desc)
                self._check_replicas(predictor, desc)
                val = self.score(predictor)
                ckpt["log"].append(
                    {
                        "phase": phase,
                        "epoch": epoch,
                        "train_loss": loss,
                        "val": val,
                        "lr": optimizer.param_groups[0]["lr"],
                    }
                )
                better = self.cfg.better(val, ckpt["best"])
                if better:
                    ckpt.update(best=val, best_state=_cpu_state(predictor), best_at=f"{phase} {epoch}")
                self.log(
                    f"{desc}: train loss {loss:.5f}, val latent MSE {val['mse']:.3e} "
                    f"(PSNR {val['psnr']:.2f} dB){' *best*' if better else ''}"
                )
                ckpt.update(
                    phase_index=p,
                    epoch=epoch,
                    predictor=predictor.state_dict(),
                    optimizer=optimizer.state_dict(),
                    opt_state=state,
                )
                self._save_checkpoint(ckpt_path, ckpt)
        ckpt["done"] = True
        self._save_checkpoint(ckpt_path, ckpt)
        return ckpt

    def _save_checkpoint(self, path: Path, ckpt: dict) -> None:
        if self.dist.is_main:
            save_checkpoint(path, ckpt)

    def _check_replicas(self, predictor: LESAPredictor, where: str) -> None:
        """Every rank must hold bit-identical weights after an epoch (cheap: one broadcast of the weights)."""
        diff = distributed.replicas_differ(predictor)
        if diff != 0.0:
            raise RuntimeError(
                f"{where}: the ranks' predictor weights differ (max abs {diff:.3e}); gradients not in sync"
            )

    # -- the whole job -----------------------------------------------------------------------------------------------
    def run(self) -> LESAPredictor:
        """Train every seed of every variant (each candidate placement with schedule "plan" / "search", with and
        without the correction when it is "auto") and save the predictor that scores best on the held-out split."""
        variants = self.variants()
        named = self.base.schedule != "uniform" or self.base.correction == "auto"  # checkpoints by variant
        self.log(
            f"lesa train: {len(self.train_idx)} training / {len(self.val_idx)} held-out trajectories"
            + (f" (held out: {self.val_rec.dir})" if self.val_rec is not None else "")
            + f", {self.num_steps} steps, interval {self.cfg.interval}, warmup {self.cfg.warmup}, windows "
            f"{','.join(map(str, self.windows))}, phases {','.join(self.cfg.phases)}, "
            f"target {self.cfg.target}, {self.cfg.seeds} seed(s); "
            + "; ".join(f"{name}: full steps {full}" for name, _, full, _ in variants)
        )
        results: dict[tuple[str, int], dict[str, Any]] = {}
        for name, _, full, correction in variants:
            self._use_variant(full, correction)
            for seed in range(self.cfg.seed, self.cfg.seed + self.cfg.seeds):
                results[name, seed] = self.train_seed(seed, name if named else None)
        best = next(iter(results))
        for key, result in results.items():
            if self.cfg.better(result["best"], results[best]["best"]):
                best = key
        kept, best_seed = best
        _, placement, kept_full, kept_correction = next(v for v in variants if v[0] == kept)
        trained = None
        if len(variants) > 1:
            trained = {
                name: max(r["best"]["psnr"] for (n, _), r in results.items() if n == name) for name, *_ in variants
            }
            self.log(
                f"keeping {kept}: full steps {kept_full} (held-out PSNR of the trained predictors: "
                + "; ".join(f"{name} {v:.2f}" for name, v in trained.items())
                + " dB)"
            )
        if self.base.schedule != "uniform" and trained is not None:
            self.keep_schedule(placement, kept_correction, trained)
        self._use_variant(kept_full, kept_correction)
        results = {seed: r for (name, seed), r in results.items() if name == kept}
        predictor = self.new_predictor(best_seed)
        predictor.load_state_dict(results[best_seed]["best_state"])
        predictor.eval()
        # one digest of the kept weights per rank: all equal, or the replicas drifted apart
        replicas = distributed.all_gather_objects(weights_digest(predictor))
        sched = self._schedule_kwargs()
        baselines = {
            "FORA": self.baseline_error(FORAConfig(**sched)),
            "TaylorSeer O1": self.baseline_error(TaylorSeerConfig(order=1, **sched)),
        }
        damped = TaylorSeerConfig(order=1, damping=self.damping, **sched)
        baselines[f"TaylorSeer O1 damped (g {self.damping:.3f})"] = self.baseline_error(damped)
        if self.schedule.searched:
            uniform = StepSchedule(self.cfg.interval, self.cfg.warmup)
            g = fit_damping(self.rec, uniform, self.train_idx) if damping_cycles(uniform, self.num_steps) else 1.0
            damped = TaylorSeerConfig(
                order=1, damping=g, interval=uniform.interval, warmup=uniform.warmup, count_flops=False
            )
            baselines[f"TaylorSeer O1 damped (g {g:.3f}), uniform schedule"] = self.baseline_error(damped)
        linear = LinearForecastConfig(weights=self.linear_weights(3), **sched)
        baselines["least-squares linear (3 full steps)"] = self.baseline_error(linear)
        start = self.start_correction()
        if start:  # the fixed forecasters with the correction this predictor started from
            strength = f"strength {self.cfg.correction_start:.3g} at {sorted(start)}"
            baselines[f"FORA + correction ({strength})"] = self.baseline_error(FORAConfig(**sched, correction=start))
            damped = TaylorSeerConfig(order=1, damping=self.damping, **sched, correction=start)
            baselines[f"TaylorSeer O1 damped + correction ({strength})"] = self.baseline_error(damped)
            baselines["LESA without its correction"] = self.closed_loop_error(
                LESAConfig(predictor=predictor, count_flops=False, learned_correction=False)
            )
        baselines["LESA (this predictor)"] = self.score(predictor)
        summary = {
            "best_seed": best_seed,
            "seeds": {s: {"best": r["best"], "best_at": r["best_at"], "log": r["log"]} for s, r in results.items()},
            "validation": baselines,
            "train_trajectories": len(self.train_idx),
            "val_trajectories": len(self.val_idx),
            # what `lesa bench` checks its evaluation trajectories against (`trajectories.training_trajectories`)
            "training_trajectories": training_trajectories(
                self.settings, map(self._trajectory, self.train_idx), map(self._trajectory, self.val_idx)
            ),
            "start": self.start,
            "candidates": trained,
            "validation_recording": None if self.val_rec is None else str(self.val_rec.dir),
            "config": self.cfg.fingerprint(),
            "world_size": self.dist.world_size,
            "replica_digests": replicas,
        }
        if len(set(replicas)) != 1:
            raise RuntimeError(f"the ranks ended with different predictor weights (digests {replicas})")
        if self.dist.is_main:
            log = json.dumps(summary, indent=1, default=str) + "\n"
            card = model_card(predictor, summary, self.rec)
            predictor.save_pretrained(self.out, card=card, files={"training_log.json": log})
        distributed.barrier()  # no rank returns before the predictor is on disk
        for name, v in baselines.items():
            self.log(f"validation {name}: latent MSE {v['mse']:.3e}, PSNR {v['psnr']:.2f} dB")
        self.log(f"saved predictor (seed {best_seed}, best at {results[best_seed]['best_at']}) to {self.out}")
        return predictor


def as_call_batch(per_prompt: torch.Tensor, dims: int) -> torch.Tensor:
    """Recorded tensors of a batch of prompts, (prompt, ...), laid out as the transformer call's batch: a pipeline
    that batches classifier-free guidance (recorded per prompt as (chunk, ...)) calls the transformer with the
    chunks of all prompts in turn, [uncond x B, cond x B]."""
    if per_prompt.dim() == dims + 1:
        return per_prompt.transpose(0, 1).flatten(0, 1)
    return per_prompt


def one_step_errors(predictor: LESAPredictor, rec: Recording, indices: list[int]) -> dict[str, float]:
    """Teacher-forced one-step error (mean absolute error on the tap) at the schedule's cached steps, on recorded
    trajectories: the predictor from the recorded history, FORA and TaylorSeer O1 from the recorded full steps."""
    pc = predictor.config
    schedule = pc.schedule()
    full = schedule.full_steps(pc.num_steps)
    sigmas = torch.tensor(pc.sigmas, dtype=torch.float32)
    device = next(predictor.parameters()).device
    sums = {"lesa": 0.0, "fora": 0.0, "taylorseer_o1": 0.0}
    count = 0
    with torch.no_grad():
        for i in indices:
            data = rec.load(i)
            for ctx in rec.contexts:
                feats = data[f"{ctx}.feature"].to(device, torch.float32)
                for s in schedule.cached_steps(pc.num_steps):
                    last = max(f for f in full if f < s)
                    before = [f for f in full if f < last]
                    slope = (feats[last] - feats[before[-1]]) / (last - before[-1]) if before else 0
                    past = [feats[j] for j in predictor.past_steps(s)]
                    guesses = {
                        "lesa": predictor.forecast(past, ctx, s, sigmas),
                        "fora": feats[last],
                        "taylorseer_o1": feats[last] + (s - last) * slope,
                    }
                    for name, guess in guesses.items():
                        sums[name] += float((guess - feats[s]).abs().mean())
                    count += 1
    return {name: total / count for name, total in sums.items()}


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights as saved (fp32, sorted by name): equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _quiet(*_args, **_kwargs) -> None:
    pass


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def model_card(predictor: LESAPredictor, summary: dict, rec: Recording) -> str:
    pc = predictor.config
    schedule = pc.schedule()
    full = len(schedule.full_steps(pc.num_steps))
    size = rec.settings.get("height"), rec.settings.get("width")
    size = f"{size[0]}x{size[1]}" if None not in size else "the pipeline's default size"
    rows = "\n".join(f"| {name} | {v['mse']:.4e} | {v['psnr']:.2f} |" for name, v in summary["validation"].items())
    seeds = "\n".join(
        f"| {s} | {r['best']['mse']:.4e} | {r['best']['psnr']:.2f} | {r['best_at']} |"
        for s, r in summary["seeds"].items()
    )
    cfg = summary["config"]
    placed = ""
    if schedule.searched:
        placed = f", placed by `--schedule {cfg.get('schedule')}`: {schedule.full_steps(pc.num_steps)}"
    candidates = ""
    if summary.get("candidates"):
        candidates = "\n- Kept the best on the held-out trajectories of the predictors trained on each candidate: " + (
            "; ".join(f"{name} {v:.2f} dB" for name, v in summary["candidates"].items())
        )
    held_out = f"`{summary['validation_recording']}`" if summary.get("validation_recording") else f"`{rec.dir}`"
    loss = {
        "step": f"L1 on the {cfg['target']}, per cached step",
        "cycle": f"L1 on the {cfg['target']}, integrated over each cache cycle",
        "final": "log MSE of the final latent, back-propagated through the sampler",
    }[cfg.get("loss", "step")]
    if cfg.get("loss_cycles"):
        loss += f", plus that of the latent closing each of the first {cfg['loss_cycles']} cache cycles"
    loss += "; exact gradient (through the predictor's history too)" if cfg.get("history_grad") else ""
    phases = "; ".join(f"{phase} {cfg[f'epochs_{phase}']} epochs at lr {cfg[f'lr_{phase}']}" for phase in cfg["phases"])
    decay = any(cfg[f"lr_{phase}"] != cfg["lr_min"] for phase in cfg["phases"])
    phases += f" (cosine to {cfg['lr_min']})" if decay else " (constant)"
    memory = "the last K full-step features" if pc.memory == "full" else "the last K features"
    correction = ""
    if pc.correction:
        strengths = predictor.correction.detach().tolist()
        learned = ", ".join(f"{s}: {strengths[s]:.3f}" for s in schedule.full_steps(pc.num_steps) if s > pc.warmup)
        correction = (
            f"\n- Full-step correction (`lesa.correction`), learned with the forecasts from strength "
            f"{cfg.get('correction_start', 0):.3g} on the first {cfg.get('correction_cycles')} cycles at lr "
            f"{cfg.get('lr_correction')}; strength per full step: {learned}"
        )
    start = {
        "reuse": "started at reuse (FORA)",
        "damped": "started at damped TaylorSeer O1",
        "linear": "per-step filters, started at the least-squares linear forecaster",
    }.get(summary.get("start", cfg.get("gain_init")), "started near reuse")
    return f"""---
library_name: lesa
tags: [lesa, diffusion, caching, {pc.model_class}]
---
# LESA predictor for `{pc.base_model}`

A learned, stage-aware feature predictor (LESA) for a `{pc.model_class}`: on cached steps the transformer trunk is
skipped and this predictor forecasts the tapped feature ({pc.tap}).

- Base model: `{pc.base_model}` ({pc.model_class}); tap: {pc.tap}; feature width {pc.feature_dim}
- Schedule: {pc.num_steps} steps, interval N = {pc.interval}, warm-up E = {pc.warmup}: {full} full steps
  ({pc.num_steps / full:.2f}x fewer trunk executions){placed}
- Stages: thresholds {pc.thresholds} on sigma, windows K = {pc.windows}, history {pc.history}, contexts {pc.contexts}
- Memory: {pc.memory} ({memory}); gain offset {pc.gain_bias:.4f} ({start}){correction}{candidates}
- Parameters: {predictor.num_parameters():,}
- Training data: {summary["train_trajectories"]} training trajectories from `{rec.dir}` ({len(rec)} prompts
  recorded at {size}); {summary["val_trajectories"]} held-out trajectories from {held_out}
- Training: {phases}; closed-loop loss: {loss}; batch
  {cfg["batch_size"]}; checkpoint by held-out {cfg.get("select", "mse")}; kept: seed {summary["best_seed"]}

## Measured validation error (held-out trajectories, closed loop, same schedule)
Error of the final latent against the unaccelerated run from the same noise (lower MSE / higher PSNR is better).

| method | latent MSE | latent PSNR (dB) |
|---|---|---|
{rows}

## Seeds (best epoch of each, selected on the held-out split)
| seed | latent MSE | latent PSNR (dB) | best at |
|---|---|---|---|
{seeds}

Use: `lesa.enable(pipe, lesa.LESAConfig(predictor="<this directory>"))` or
`lesa generate --model <pipeline> --cache lesa --predictor <this directory> ...`.
"""
