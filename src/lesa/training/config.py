"""`TrainConfig`: every setting of `lesa train`, grouped and documented (the CLI's `--set` and `--print-config` are
generated from these fields).

Example:
    >>> from lesa.training import TrainConfig
    >>> config = TrainConfig.from_recipe("calibrated", epochs_clar=2)
    >>> config.loss, config.epochs_clar
    ('final', 2)
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..checks import check_numbers
from ..correction import DEFAULT_CYCLES, DEFAULT_STRENGTH
from .recipes import DEFAULT_RECIPE, recipe_settings

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
GROUPS = ("schedule", "optimiser", "loss", "predictor", "start", "selection")


def setting(default: Any, group: str, doc: str) -> Any:
    """A documented TrainConfig field of `group`."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"group": group, "doc": doc})
    return field(default=default, metadata={"group": group, "doc": doc})


@dataclass
class TrainConfig:
    """Hyper-parameters of `lesa train`. The dataclass defaults are the paper's settings (the `paper` recipe); the
    `calibrated` recipe (the CLI's default) changes some of them (`lesa.training.recipes`)."""

    # -- schedule: which steps run the trunk
    interval: int = setting(7, "schedule", "full step every N steps after the warm-up")
    warmup: int = setting(3, "schedule", "steps 0..warmup always run the trunk")
    schedule: str = setting(
        "uniform",
        "schedule",
        "placement of the interval's full steps: uniform; plan (also a placement by dynamic programming on the "
        "teacher-forced error, the better trained predictor kept); search (also a closed-loop search, slow)",
    )
    speedups: tuple[float, ...] = setting(
        (2.5, 4.0, 5.0, 6.25),
        "schedule",
        "format 2: the budgets (steps per full step) it trains and validates on, at every recorded step count",
    )
    min_full_steps: int = setting(4, "schedule", "format 2: budgets below this many full steps are left out")
    placement_powers: tuple[float, ...] = setting(
        (1.0, 1.3),
        "schedule",
        "format 2: powers of the sigma placement rule (schedule.sigma_budget) it trains on; the best on validation "
        "is saved as the predictor's own",
    )
    # -- optimiser
    phases: tuple[str, ...] = setting(PHASES, "optimiser", "phases in order: gt (teacher forcing), clar (closed loop)")
    epochs_gt: int = setting(3, "optimiser", "epochs of phase gt")
    epochs_clar: int = setting(10, "optimiser", "epochs of phase clar")
    lr_gt: float = setting(1e-3, "optimiser", "peak learning rate of phase gt")
    lr_clar: float = setting(3e-3, "optimiser", "peak learning rate of phase clar")
    lr_min: float = setting(1e-4, "optimiser", "floor of every phase's cosine schedule (0: decay to zero)")
    weight_decay: float = setting(1e-4, "optimiser", "AdamW weight decay (replaced by the anchor when anchor > 0)")
    anchor: float = setting(
        0.0,
        "optimiser",
        "decoupled decay toward the predictor's start instead of zero: after each update every weight moves "
        "lr * anchor of its way back to its starting value (a trust region around a calibrated start); 0: off",
    )
    grad_clip: float = setting(1.0, "optimiser", "gradient norm clip")
    batch_size: int = setting(8, "optimiser", "trajectories per minibatch (the global batch under torchrun)")
    micro_batch: int | None = setting(
        None,
        "optimiser",
        "loss final: roll out and back-propagate this many trajectories at once (per process), their gradients "
        "accumulated into the minibatch's one update; None: all at once",
    )
    lr_correction: float = setting(1e-2, "optimiser", "peak learning rate of the learned full-step correction")
    # -- loss
    loss: str = setting(
        "step",
        "loss",
        "closed-loop loss: step (each cached step), cycle (the error integrated over a cache cycle) or final (the "
        "log error of the final latent, back-propagated through the whole sampler: the held-out score itself)",
    )
    loss_cycles: int = setting(
        0,
        "loss",
        "loss final: also the log MSE of the latent closing each of the first N cache cycles (more weight on the "
        "early cycles, where a forecast error decides which image the sampler settles on)",
    )
    truncate_cycles: int | None = setting(
        None,
        "loss",
        "loss final: back-propagate through the last N cache cycles only (truncated back-propagation through time: "
        "the steps before them run without autograd, so a rollout keeps the graph of N cycles, not of all); None: "
        "through the whole sampler",
    )
    target: str = setting("feature", "loss", "what the step/cycle losses compare: the tapped feature or the output")
    history_grad: bool = setting(
        False, "loss", "closed loop: back-propagate through the features in the predictor's history too"
    )
    checkpoint_trunk: bool = setting(
        True,
        "loss",
        "loss final: gradient checkpointing of the trunk blocks on the full steps the loss back-propagates through "
        "(each block keeps its inputs instead of its activations, for one more forward of it; same gradients)",
    )
    checkpoint_calls: bool = setting(
        False,
        "loss",
        "loss final: checkpoint each full step's whole transformer call instead of its blocks: a rollout keeps per "
        "full step its inputs and the feature its forecasts read, not every block's inputs, and backward holds one "
        "call's activations at a time (fewer kept bytes when a rollout has many full steps; same gradients)",
    )
    # -- predictor architecture
    format: int = setting(
        1, "predictor", "1: one predictor per sigma schedule (the paper); 2: schedule-free (any steps, shift, budget)"
    )
    hidden: int = setting(16, "predictor", "format 2: width of the coefficient KAN's one hidden layer")
    thresholds: tuple[float, ...] | None = setting(
        None, "predictor", "stage boundaries on sigma (None: the model adapter's, 0.9, 0.5; Qwen-Image 0.9, 0.4)"
    )
    windows: tuple[int, ...] = setting((4, 8, 8), "predictor", "history window K of each stage expert")
    history: int = setting(8, "predictor", "features the history keeps")
    kan_hidden: tuple[int, ...] = setting((256, 256), "predictor", "hidden widths of the gain KAN")
    gain: str = setting("kan", "predictor", "gain network")
    memory: str = setting("steps", "predictor", "what the history holds: steps (paper) or full (full steps only)")
    step_filters: bool = setting(
        False, "predictor", "a learned filter per step on top of the stage experts' (memory full)"
    )
    # -- start
    gain_init: str = setting(
        "zero",
        "start",
        "zero: near reuse (the paper: a small random gain); reuse: exactly at reuse (FORA); damped: at TaylorSeer O1 "
        "with its damping fitted on the training trajectories; linear (needs step_filters): at the least-squares "
        "linear forecaster; best: whichever of those scores highest on the held-out split of the placement",
    )
    correction: bool | str = setting(
        False,
        "start",
        "loss final: learn a full-step correction (lesa.correction) with the forecasts, one strength per full step; "
        "auto: train with and without it, keep the better on validation",
    )
    correction_start: float = setting(DEFAULT_STRENGTH, "start", "the correction's starting strength")
    correction_cycles: int = setting(DEFAULT_CYCLES, "start", "cycles after the warm-up the correction starts on")
    # -- selection
    select: str = setting("mse", "selection", "held-out score that picks the kept checkpoint: mse or psnr")
    val_fraction: float = setting(0.2, "selection", "share of the prompts held out (0: needs a validation recording)")
    val_limit: int = setting(
        0, "selection", "format 2: held-out trajectories per (step count, budget) cell scored each epoch (0: all)"
    )
    seeds: int = setting(1, "selection", "training seeds; the best on the held-out split is kept")
    seed: int = setting(0, "selection", "first training seed")
    extra: dict[str, Any] = setting({}, "selection", "free-form notes kept in the training log")

    def __post_init__(self) -> None:
        # numbers first: a NaN learning rate or a batch of 0 would only fail (or silently train nothing) hours in
        peaks = [("lr_gt", self.lr_gt), ("lr_clar", self.lr_clar), ("lr_correction", self.lr_correction)]
        check_numbers([*peaks, ("grad_clip", self.grad_clip)], 0, above=True)
        floors = [("lr_min", self.lr_min), ("weight_decay", self.weight_decay), ("anchor", self.anchor)]
        counts = [("epochs_gt", self.epochs_gt), ("epochs_clar", self.epochs_clar), ("warmup", self.warmup)]
        strength = [("correction_start", self.correction_start), ("correction_cycles", self.correction_cycles)]
        check_numbers([*floors, *counts, *strength, ("val_limit", self.val_limit)], 0)
        sizes = [
            ("batch_size", self.batch_size),
            ("micro_batch", self.micro_batch),
            ("seeds", self.seeds),
            ("interval", self.interval),
        ]
        widths = [("history", self.history), *(("windows", k) for k in self.windows)]
        check_numbers([*sizes, *widths, *(("kan_hidden", w) for w in self.kan_hidden), ("hidden", self.hidden)], 1)
        check_numbers([*(("speedups", v) for v in self.speedups), ("min_full_steps", self.min_full_steps)], 1)
        check_numbers((("placement_powers", v) for v in self.placement_powers), 0, above=True)
        if self.format not in (1, 2):
            raise ValueError(f"format must be 1 or 2, got {self.format!r}")
        if self.format == 2 and (self.memory != "full" or self.loss != "final" or self.phases != ("clar",)):
            raise ValueError(
                "format 2 trains in the closed loop on full-step features: it needs memory 'full', loss 'final' and "
                f"phases clar (the schedule-free recipe), got {self.memory!r}, {self.loss!r}, {self.phases}"
            )
        if self.format == 2 and self.correction == "auto":
            raise ValueError("format 2: correction must be true or false (auto compares placements of one schedule)")
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
        if self.truncate_cycles is not None and (self.truncate_cycles < 1 or self.loss != "final"):
            raise ValueError(
                f"truncate_cycles must be >= 1 and needs loss 'final', got {self.truncate_cycles} / {self.loss!r}"
            )
        if self.micro_batch is not None and self.loss != "final":  # the other losses update inside the rollout
            raise ValueError(f"micro_batch splits the rollouts of loss 'final', got loss {self.loss!r}")

    @classmethod
    def from_recipe(cls, recipe: str = DEFAULT_RECIPE, **overrides: Any) -> TrainConfig:
        """A config with a named recipe's settings (`recipes.RECIPES`), then `overrides`."""
        return cls(**recipe_settings(recipe, overrides))

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it."""
        data = asdict(self)
        # seeds: each has its own checkpoint; micro_batch, checkpoint_*: how the work is laid out, not what is
        # trained (as the number of ranks), so a run that ran out of memory resumes with a smaller micro-batch
        for name in ("seeds", "micro_batch", "checkpoint_trunk", "checkpoint_calls"):
            data.pop(name)
        return json.loads(json.dumps(data))

    def better(self, a: dict[str, float], b: dict[str, float]) -> bool:
        """Whether held-out score `a` beats `b` by the `select` criterion."""
        return a["psnr"] > b["psnr"] if self.select == "psnr" else a["mse"] < b["mse"]


def documented_fields() -> list[tuple[str, str, Any, str]]:
    """(name, group, default, doc) of every TrainConfig field, in declaration order."""
    out = []
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        out.append((f.name, f.metadata["group"], default, f.metadata["doc"]))
    return out


def settings_doc() -> str:
    """docs/train-settings.md: every setting of `lesa train` with its default (tests/test_cli.py checks the file is
    current; regenerate it by writing this function's text there)."""
    from ..settings import settings_reference

    intro = (
        "Every setting of `lesa train`, generated from `lesa.training.TrainConfig`. The defaults are the `paper` "
        "recipe's; the `calibrated` recipe (the default) and `schedule-free` change some of them "
        "(`lesa/training/recipes.py`; see the "
        "effective values with `lesa train --data D --out O --print-config`). Change any with `--set key=value` "
        "(lists as `4,8,8`, switches as `true`/`false`, `none` for unset) or `--config FILE` (JSON or TOML, e.g. the "
        "output of `--print-config`)."
    )
    return settings_reference(TrainConfig, "`lesa train` settings", intro)
