"""Training one schedule-free predictor (format 2) across schedules: recordings at several step counts, and on every
minibatch one budget (speed-up) and one placement of its full steps drawn at random, so the predictor meets every
combination it will serve. The closed loop is the calibrated recipe's: the log MSE of the final latent and of the
latents closing the first cache cycles, back-propagated through the real sampler.

Several recordings, not sub-schedules of one fine recording: a closed-loop rollout at 20 steps must be scored against
the 20-step sampler's own result, which a 50-step recording does not hold (its final latent differs from the 20-step
one by far more than a forecast's error: `benchmarks/schedule_free.py --discretisation` measures it).

Every epoch is scored on the held-out trajectories of every (step count, budget) cell; the kept weights are the
epoch with the best mean PSNR over the cells, and the kept placement the power of the sigma rule whose cells score
best with them. Resumable: a checkpoint after every epoch (`lesa.checkpoint`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import disable, distributed, enable
from ..adapters import get_adapter, model_class_name
from ..checkpoint import load_checkpoint, refuse_pickles, save_checkpoint
from ..config import LESAConfig
from ..evaluate.methods import baseline_config
from ..predictor import ScheduleFreeConfig, ScheduleFreePredictor, check_predictor_dir, stage_of
from ..predictor.schedule_free import forecast_inputs
from ..recording import Recording
from ..schedule import StepSchedule, full_step_count, sigma_budget, truncation_step, uniform_budget
from ..trajectories import stderr_notice
from .checkpoints import check_replicas, cpu_state
from .config import TrainConfig
from .data import TrainingData, minibatches
from .phases import apply_update, closed_loop_loss, frozen_pipeline, param_groups
from .start import Fits
from .validation import Scorer

CHECKPOINT = "schedule-free-seed{seed}.safetensors"


@dataclass(frozen=True)
class Start:
    """Where a predictor starts: kind (reuse, damped or per-cell), a_1's constant start and, per cell, the a_1 the
    coefficient networks are fitted to start at."""

    kind: str
    damping: float
    targets: dict[str, float] | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "damping": self.damping, "targets": self.targets}


@dataclass(frozen=True)
class Cell:
    """One (recording, budget) combination the predictor trains and is validated on."""

    source: int  # index of the recording
    num_steps: int
    speedup: float
    budget: int  # full steps

    @property
    def name(self) -> str:
        return f"{self.num_steps} steps x{self.speedup:g} ({self.budget} full)"


class ScheduleFreeTrainer:
    """Trains a `ScheduleFreePredictor` on recordings of one model at several step counts and saves it to `out`
    (config.json, model.safetensors, README.md, training_log.json).

    Example:
        >>> config = TrainConfig.from_recipe("schedule-free")
        >>> recordings = [Recording("rec-20"), Recording("rec-50")]  # doctest: +SKIP
        >>> trainer = ScheduleFreeTrainer(recordings, pipe, "pred", config)  # doctest: +SKIP
        >>> predictor = trainer.run()  # doctest: +SKIP
    """

    def __init__(
        self,
        recordings: list[Recording],
        pipe: Any,
        out_dir: str | Path,
        config: TrainConfig,
        validations: list[Recording] | None = None,
        log: Callable[[str], None] = print,
        progress: bool = True,
    ) -> None:
        self.out = Path(out_dir)
        check_predictor_dir(self.out)
        if config.format != 2:
            raise ValueError(f"ScheduleFreeTrainer trains format 2; the config has format {config.format}")
        if validations is not None and len(validations) != len(recordings):
            raise ValueError(
                f"{len(validations)} validation recording(s) for {len(recordings)} training recording(s): give one "
                "per --data, in the same order"
            )
        dist = distributed.current()
        self.log = log if dist.is_main else _quiet
        self.progress = progress and dist.is_main
        self.config = config
        self.pipe = pipe
        _check_recordings(recordings, model_class_name(pipe.transformer))
        notice = stderr_notice if dist.is_main else _quiet
        self.data = [
            TrainingData.split(rec, config.val_fraction, None if validations is None else validations[i], notice)
            for i, rec in enumerate(recordings)
        ]
        self.scorers = [Scorer(pipe, d, config.batch_size) for d in self.data]
        self.cells = self._cells()
        if not self.cells:
            raise ValueError(
                f"no budget of speedups {list(config.speedups)} leaves at least {config.min_full_steps} full steps "
                f"and a cached step on {[d.num_steps for d in self.data]} steps"
            )

    def _cells(self) -> list[Cell]:
        cfg = self.config
        cells = []
        for i, data in enumerate(self.data):
            for speedup in cfg.speedups:
                budget = full_step_count(data.num_steps, speedup)
                if cfg.min_full_steps <= budget < data.num_steps:
                    cells.append(Cell(i, data.num_steps, speedup, budget))
        return cells

    # -- schedules ------------------------------------------------------------------------------------------------
    def placement(self, cell: Cell, power: float | None) -> StepSchedule:
        """The cell's full steps by the sigma rule of `power` (None: uniform in steps)."""
        sigmas = self.data[cell.source].rec.sigmas
        if power is None:
            return uniform_budget(cell.num_steps, cell.budget, self.config.warmup)
        return sigma_budget(sigmas, cell.budget, self.config.warmup, power)

    def run_config(self, predictor: ScheduleFreePredictor, schedule: StepSchedule, **options: Any) -> LESAConfig:
        """The LESA configuration that runs `predictor` on `schedule`'s full steps."""
        return LESAConfig(
            predictor=predictor,
            interval=schedule.interval,
            warmup=schedule.warmup,
            explicit_full_steps=schedule.explicit,
            count_flops=False,
            **options,
        )

    # -- start ----------------------------------------------------------------------------------------------------
    @functools.cached_property
    def damping(self) -> float:
        """TaylorSeer O1's damping fitted (teacher forced) on the finest recording's uniform budget closest to 5x."""
        finest = max(range(len(self.data)), key=lambda i: self.data[i].num_steps)
        cell = min((c for c in self.cells if c.source == finest), key=lambda c: abs(c.speedup - 5))
        return Fits(self.data[finest]).damping(self.placement(cell, None))

    def choose_start(self) -> Start:
        """gain_init: reuse (a_1 = 0), damped (a_1 = `damping`) or best: on each cell the better of the two on its
        held-out trajectories, the coefficient networks fitted to start there (`fit_start`): reuse suits long cycles,
        damped TaylorSeer short ones, and one constant start for every cell would leave one kind far behind."""
        cfg = self.config
        g = self.damping
        kind = {"zero": "reuse", "reuse": "reuse", "damped": "damped", "best": "best"}.get(cfg.gain_init)
        if kind is None:
            raise ValueError(f"format 2 starts at reuse, damped or best, not gain_init {cfg.gain_init!r}")
        if kind != "best":
            return Start(kind, g if kind == "damped" else 0.0)
        reuse = self.score_cells(self.new_predictor(0, Start("reuse", 0.0)), cfg.placement_powers[0])
        damped = self.score_cells(self.new_predictor(0, Start("damped", g)), cfg.placement_powers[0])
        targets = {name: (g if damped[name]["psnr"] > reuse[name]["psnr"] else 0.0) for name in reuse}
        self.log(
            "start per cell (held-out PSNR reuse / damped): "
            + "; ".join(f"{n} {reuse[n]['psnr']:.2f} / {damped[n]['psnr']:.2f}" for n in reuse)
        )
        return Start("per-cell", 0.0, targets)

    def fit_start(self, predictor: ScheduleFreePredictor, targets: dict[str, float], iterations: int = 400) -> None:
        """Fit the coefficient networks so that a_1 is each cell's target (and a_2.. 0) at the inputs of every cached
        step of the cell on every trained placement (least squares, Adam; seconds)."""
        samples: dict[int, list[tuple[list[float], float]]] = {}
        window = predictor.config.window
        for cell in self.cells:
            sigmas = self.data[cell.source].rec.sigmas
            for power in self.config.placement_powers:
                full = self.placement(cell, power).full_steps(cell.num_steps)
                for step in range(cell.num_steps):
                    past = [sigmas[f] for f in full if f < step][-window:]
                    found = None if step in full else forecast_inputs(sigmas[step], past)
                    if found is not None:
                        stage = stage_of(float(sigmas[step]), tuple(predictor.config.thresholds))
                        samples.setdefault(stage, []).append((found[1], targets[cell.name]))
        first = next(iter(predictor.experts.values()))
        for stage, rows in samples.items():
            expert = first[stage]
            x = torch.tensor([r[0] for r in rows], device=expert.bias.device)
            target = torch.zeros(len(rows), expert.bias.numel(), device=x.device)
            target[:, 0] = torch.tensor([r[1] for r in rows], device=x.device)
            optimizer = torch.optim.Adam(expert.parameters(), lr=1e-2)
            for _ in range(iterations):
                optimizer.zero_grad()
                loss = ((expert.net(x) + expert.bias - target) ** 2).mean()
                loss.backward()
                optimizer.step()
            for experts in predictor.experts.values():  # every context starts alike
                experts[stage].load_state_dict(expert.state_dict())

    def new_predictor(self, seed: int, start: Start) -> ScheduleFreePredictor:
        cfg, data = self.config, self.data[0]
        settings = data.settings
        adapter = get_adapter(settings["model_class"])
        torch.manual_seed(seed)
        pc = ScheduleFreeConfig(
            model_class=settings["model_class"],
            tap=adapter.tap,
            feature_dim=data.rec.feature_dim,
            dtype=str(self.scorers[0].dtype).replace("torch.", ""),
            thresholds=list(cfg.thresholds if cfg.thresholds is not None else adapter.stage_thresholds),
            window=cfg.history,
            contexts=list(data.contexts),
            hidden=cfg.hidden,
            gain_bias=start.damping,
            correction=bool(cfg.correction),
            warmup=cfg.warmup,
            placement_power=cfg.placement_powers[0],
            trained_steps=sorted({d.num_steps for d in self.data}),
            base_model=settings["model"],
        )
        predictor = ScheduleFreePredictor(pc)
        if cfg.correction:
            # the calibrated fixed correction's strength early in the schedule (the first cache cycles, where it
            # helps), none late (where the full step's output also holds the model's pull toward the data)
            knots = torch.linspace(0, 1, pc.correction_knots).unsqueeze(1).expand_as(predictor.correction)
            with torch.no_grad():
                predictor.correction.copy_(cfg.correction_start * ((knots - 0.4) / 0.2).clamp(0, 1))
        predictor = predictor.to(self.scorers[0].device)
        if start.targets:
            self.fit_start(predictor, start.targets)
        return predictor

    # -- scoring --------------------------------------------------------------------------------------------------
    def val_indices(self, source: int) -> list[int]:
        idx = self.data[source].val_idx
        return idx[: self.config.val_limit] if self.config.val_limit else idx

    def score_cells(self, predictor: ScheduleFreePredictor, power: float | None) -> dict[str, dict[str, float]]:
        """Held-out latent MSE / PSNR of every cell with the predictor's forecasts on the placement of `power`."""
        out = {}
        for cell in self.cells:
            config = self.run_config(predictor, self.placement(cell, power))
            out[cell.name] = self.scorers[cell.source].score(config, self.val_indices(cell.source))
        return out

    def mean_psnr(self, predictor: ScheduleFreePredictor, power: float | None) -> float:
        scores = self.score_cells(predictor, power)
        return sum(v["psnr"] for v in scores.values()) / len(scores)

    def baseline_cells(self, power: float | None, damping: float) -> dict[str, dict[str, dict[str, float]]]:
        """The fixed forecasters (FORA, damped TaylorSeer O1) on every cell, for the training log."""
        rows: dict[str, dict[str, dict[str, float]]] = {"FORA": {}, f"TaylorSeer O1 damped (g {damping:.3f})": {}}
        for cell in self.cells:
            schedule = self.placement(cell, power)
            scorer, idx = self.scorers[cell.source], self.val_indices(cell.source)
            rows["FORA"][cell.name] = scorer.score(baseline_config("fora", schedule), idx)
            damped = baseline_config("taylorseer-damped", schedule, damping=damping)
            rows[f"TaylorSeer O1 damped (g {damping:.3f})"][cell.name] = scorer.score(damped, idx)
        return rows

    # -- training -------------------------------------------------------------------------------------------------
    def epoch_plan(self, epoch_seed: int) -> list[tuple[Cell, float, list[int]]]:
        """The epoch's minibatches: every recording's training trajectories once, each minibatch with a cell of its
        recording and a placement power drawn at random (seeded: equal on every rank)."""
        rng = random.Random(epoch_seed)
        plan = []
        for source, data in enumerate(self.data):
            cells = [c for c in self.cells if c.source == source]
            if not cells:
                continue
            for batch in minibatches(data.train_idx, self.config.batch_size, epoch_seed * 31 + source):
                plan.append((rng.choice(cells), rng.choice(self.config.placement_powers), batch))
        rng.shuffle(plan)
        return plan

    def train_epoch(self, predictor, optimizer, state: dict, epoch_seed: int, total: int, desc: str) -> float:
        cfg = self.config
        losses = []
        with frozen_pipeline(self.pipe):
            for cell, power, batch in tqdm(self.epoch_plan(epoch_seed), desc=desc, disable=not self.progress):
                schedule = self.placement(cell, power)
                scorer, rec = self.scorers[cell.source], self.data[cell.source].rec
                full = schedule.full_steps(cell.num_steps)
                ends = [s for s in full if s > schedule.warmup][: cfg.loss_cycles]
                config = self.run_config(
                    predictor,
                    schedule,
                    differentiable=True,
                    history_grad=cfg.history_grad,
                    checkpoint_trunk=cfg.checkpoint_trunk,
                    checkpoint_calls=cfg.checkpoint_calls,
                    grad_from_step=truncation_step(full, cell.num_steps, cfg.truncate_cycles),
                )
                share = scorer.share(batch)
                enable(self.pipe, config)
                try:
                    parts = (
                        closed_loop_loss(scorer, part, [rec.load(i) for i in part], ends)
                        for part in minibatches(share, cfg.micro_batch or max(len(share), 1))
                        if part
                    )
                    losses.append(apply_update(predictor, optimizer, state, parts, len(batch), cfg.lr_clar, total, cfg))
                finally:
                    disable(self.pipe)
        return sum(losses) / max(len(losses), 1)

    def train_seed(self, seed: int, start: Start) -> dict[str, Any]:
        """Train one seed, resuming from its checkpoint; returns the finished checkpoint."""
        cfg = self.config
        path = self.out / "checkpoints" / CHECKPOINT.format(seed=seed)
        distributed.on_main(lambda: refuse_pickles(path.parent, path.with_suffix(".pt").name))
        predictor = self.new_predictor(seed, start)
        distributed.broadcast_parameters(predictor)
        fingerprint = {
            **cfg.fingerprint(),
            "start": start.describe(),
            **{f"data{i}": d.fingerprint() for i, d in enumerate(self.data)},
        }
        fingerprint = _jsonable(fingerprint)
        ckpt = distributed.on_main(lambda: load_checkpoint(path) if path.exists() else None)
        optimizer = torch.optim.AdamW(param_groups(predictor, cfg.lr_clar, cfg), weight_decay=cfg.weight_decay)
        total = cfg.epochs_clar * len(self.epoch_plan(0))
        if ckpt is not None:
            if ckpt["fingerprint"] != fingerprint:
                raise ValueError(f"{path} was made with other settings or data; train into another --out or --restart")
            predictor.load_state_dict(ckpt["predictor"])
            if ckpt["done"]:
                return ckpt
            optimizer.load_state_dict(ckpt["optimizer"])
            self.log(f"seed {seed}: resuming from {path} after epoch {ckpt['epoch']}")
        else:
            init = self.score_cells(predictor, cfg.placement_powers[0])
            mean = _mean(init)
            ckpt = {
                "fingerprint": fingerprint,
                "epoch": 0,
                "done": False,
                "state": {"t": 0},
                "log": [{"epoch": 0, "val": init, "mean_psnr": mean}],
                "best": mean,
                "best_at": "init",
                "best_state": cpu_state(predictor),
            }
            self.log(f"seed {seed} init: mean held-out PSNR {mean:.2f} dB over {len(init)} cells")
        for epoch in range(ckpt["epoch"] + 1, cfg.epochs_clar + 1):
            desc = f"seed {seed} epoch {epoch}/{cfg.epochs_clar}"
            loss = self.train_epoch(predictor, optimizer, ckpt["state"], seed * 1000 + epoch, total, desc)
            check_replicas(predictor, desc)
            val = self.score_cells(predictor, cfg.placement_powers[0])
            mean = _mean(val)
            better = mean > ckpt["best"]
            if better:
                ckpt.update(best=mean, best_at=f"epoch {epoch}", best_state=cpu_state(predictor))
            ckpt["log"].append({"epoch": epoch, "train_loss": loss, "val": val, "mean_psnr": mean})
            self.log(f"{desc}: train loss {loss:.4f}, mean held-out PSNR {mean:.2f} dB{' *best*' if better else ''}")
            ckpt.update(epoch=epoch, predictor=predictor.state_dict(), optimizer=optimizer.state_dict())
            distributed.on_main(lambda: save_checkpoint(path, ckpt))
        ckpt["done"] = True
        distributed.on_main(lambda: save_checkpoint(path, ckpt))
        return ckpt

    def run(self) -> ScheduleFreePredictor:
        """Train every seed, keep the best by mean held-out PSNR over the cells, choose its placement power, save."""
        cfg = self.config
        sizes = ", ".join(
            f"{d.num_steps} steps: {len(d.train_idx)} training / {len(d.val_idx)} held-out" for d in self.data
        )
        self.log(
            f"lesa train (schedule-free): {sizes} trajectories; cells {', '.join(c.name for c in self.cells)}; "
            f"placement powers {list(cfg.placement_powers)}"
        )
        start = self.choose_start()
        results = {seed: self.train_seed(seed, start) for seed in range(cfg.seed, cfg.seed + cfg.seeds)}
        best_seed = max(results, key=lambda s: results[s]["best"])
        predictor = self.new_predictor(best_seed, start)
        predictor.load_state_dict(results[best_seed]["best_state"])
        predictor.eval()
        placements = {power: self.score_cells(predictor, power) for power in cfg.placement_powers}
        placements_uniform = self.score_cells(predictor, None)
        power = max(placements, key=lambda p: _mean(placements[p]))
        predictor.config.placement_power = power
        self.log(
            "placement: "
            + ", ".join(f"power {p:g} {_mean(v):.2f} dB" for p, v in placements.items())
            + f", uniform {_mean(placements_uniform):.2f} dB; keeping power {power:g}"
        )
        summary = {
            "format": 2,
            "best_seed": best_seed,
            "start": start.describe(),
            "seeds": {s: {"best": r["best"], "best_at": r["best_at"], "log": r["log"]} for s, r in results.items()},
            "cells": [c.name for c in self.cells],
            "placements": {f"power {p:g}": v for p, v in placements.items()} | {"uniform": placements_uniform},
            "baselines": self.baseline_cells(power, self.damping),
            "recordings": [str(d.rec.dir) for d in self.data],
            "validation_recordings": [None if d.val_rec is None else str(d.val_rec.dir) for d in self.data],
            # what `lesa bench` checks its evaluation trajectories against, over all recordings
            "training_trajectories": _merged_keys([d.trajectory_keys() for d in self.data]),
            "config": cfg.fingerprint(),
            "world_size": distributed.current().world_size,
        }
        if distributed.current().is_main:
            import json

            from .card import schedule_free_card

            log = json.dumps(summary, indent=1, default=str) + "\n"
            predictor.save_pretrained(
                self.out, card=schedule_free_card(predictor, summary), files={"training_log.json": log}
            )
        distributed.barrier()
        self.log(
            f"saved schedule-free predictor (seed {best_seed}, best at {results[best_seed]['best_at']}) to {self.out}"
        )
        return predictor


def _merged_keys(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "settings": [p["settings"] for p in parts],
        "keys": [k for p in parts for k in p["keys"]],
        "held_out_keys": [k for p in parts for k in p.get("held_out_keys", [])],
    }


def _mean(scores: dict[str, dict[str, float]]) -> float:
    return sum(v["psnr"] for v in scores.values()) / len(scores)


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _check_recordings(recordings: list[Recording], model_class: str) -> None:
    """One model, one set of generation settings: the recordings may differ in their step count only."""
    if not recordings:
        raise ValueError("no recording given (--data)")
    first = recordings[0]
    for rec in recordings:
        if rec.settings["model_class"] != model_class:
            raise ValueError(
                f"{rec.dir} was recorded from a {rec.settings['model_class']}, but the pipeline's transformer is a "
                f"{model_class}"
            )
        differ = sorted(
            k
            for k in {**first.settings, **rec.settings}
            if k != "steps" and first.settings.get(k) != rec.settings.get(k)
        )
        if differ:
            raise ValueError(
                f"{rec.dir} and {first.dir} differ in {differ}: the recordings of a schedule-free predictor may "
                "differ in --steps only"
            )
        if "latents" not in rec.shapes:
            raise ValueError(f"{rec.dir} holds no latents (recorded by an older lesa): record it again")
    steps = [r.settings["steps"] for r in recordings]
    if len(set(steps)) != len(steps):
        raise ValueError(f"two recordings of the same step count ({steps}): give one per step count")


def _quiet(*_args, **_kwargs) -> None:
    pass
