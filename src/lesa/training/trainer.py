"""`Trainer.run`: every variant (placement x correction) x every seed, the best on the held-out split kept, scored
beside the fixed baselines and saved with its model card and training log."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..adapters import model_class_name
from ..evaluate.methods import baseline_config
from ..predictor import LESAPredictor, check_predictor_dir
from ..recording import Recording
from ..trajectories import stderr_notice
from .card import model_card
from .checkpoints import train_seed
from .config import TrainConfig
from .data import TrainingData
from .phases import Phases
from .placement import (
    PlacementStore,
    Variant,
    explicit_schedule,
    placement_settings,
    search_full_steps,
    uniform_schedule,
    variants,
)
from .start import Fits, choose_start
from .validation import Scorer


class Trainer:
    """Trains one or more seeds of a predictor on one recording, with checkpoints in `out/checkpoints`, and saves
    the best to `out` (config.json, model.safetensors, README.md, training_log.json).

    Example:
        >>> config = TrainConfig.from_recipe("calibrated")
        >>> trainer = Trainer(Recording("rec"), pipe, "predictor", config)  # doctest: +SKIP
        >>> predictor = trainer.run()  # doctest: +SKIP

    `validation`: a recording of other prompts with the same settings whose trajectories are the held-out ones
    (`TrainingData`)."""

    def __init__(
        self,
        recording: Recording,
        pipe: Any,
        out_dir: str | Path,
        config: TrainConfig,
        log: Callable[[str], None] = print,
        progress: bool = True,
        validation: Recording | None = None,
    ) -> None:
        self.out = Path(out_dir)
        check_predictor_dir(self.out)  # before any work: the predictor is saved there at the end
        self.config = config  # as given: its correction may be "auto" (each variant decides it)
        dist = distributed.current()
        self.log = log if dist.is_main else _quiet
        self.progress = progress and dist.is_main
        num_steps = recording.settings["steps"]
        cached = uniform_schedule(config).cached_steps(num_steps)
        if not cached:
            raise ValueError(
                f"interval {config.interval} / warmup {config.warmup} leave no cached step in {num_steps} steps "
                f"(steps 0..{config.warmup} are always full): nothing to train. For a few-step (distilled) model use "
                "a short warm-up and interval, e.g. --warmup 1 --interval 2 (see docs/models.md, 'Few-step models')"
            )
        if config.loss_cycles and "latents" not in recording.shapes:
            raise ValueError(
                f"loss_cycles {config.loss_cycles} scores the latents of each step, which {recording.dir} does not "
                "hold (recorded before `lesa record` stored them): record it again into a new directory, or pass "
                "--set loss_cycles=0"
            )
        # Few-step schedules: a cached step s has at most s earlier features, so a window beyond the last cached
        # step's index can never fill; shrink K to what the schedule can supply (50 steps: no change).
        self.windows = tuple(min(k, max(cached)) for k in config.windows)
        self.data = TrainingData.split(
            recording, config.val_fraction, validation, stderr_notice if dist.is_main else _quiet
        )
        model_class = model_class_name(pipe.transformer)
        if model_class != recording.settings["model_class"]:
            raise ValueError(
                f"{recording.dir} was recorded from a {recording.settings['model_class']}, "
                f"but the pipeline's transformer is a {model_class}"
            )
        self.pipe = pipe
        self.scorer = Scorer(pipe, self.data, config.batch_size)
        self.fits = Fits(self.data)

    @property
    def train_idx(self) -> list[int]:
        return self.data.train_idx

    @property
    def val_idx(self) -> list[int]:
        return self.data.val_idx

    def variant(self, full: list[int] | None = None, correction: bool | None = None, name: str = "uniform") -> Variant:
        """A variant of this run: these full steps (default: the uniform placement) and correction (default: the
        config's, "auto" counting as with)."""
        full = uniform_schedule(self.config).full_steps(self.data.num_steps) if full is None else full
        correction = self.config.correction in (True, "auto") if correction is None else correction
        return Variant(name, name, full, correction)

    def phases(self, variant: Variant | None = None) -> Phases:
        """What trains `variant` (default: `self.variant()`), its start chosen (scored on the held-out split when
        gain_init is "best")."""
        variant = variant or self.variant()
        config = replace(self.config, correction=variant.correction)
        schedule = explicit_schedule(config, variant.full_steps, self.data.num_steps)
        history = min(config.history, max(self.windows))
        start = choose_start(config, schedule, history, self.fits, self.scorer, self.log)
        return Phases(self.pipe, self.data, self.scorer, variant, config, schedule, self.windows, start, self.progress)

    def train_seed(self, seed: int, variant: Variant | None = None) -> dict[str, Any]:
        """Train one seed of `variant` (default: `self.variant()`) into out/checkpoints; returns its finished
        checkpoint (`checkpoints.train_seed`)."""
        return train_seed(self.phases(variant), seed, self.out, self.log)

    def placements(self) -> PlacementStore:
        """out/schedule.json of this run's placement settings."""
        return PlacementStore(self.out, placement_settings(self.config, self.data), self.log)

    def variants(self) -> list[Variant]:
        """The variants `run` trains: the uniform placement alone with schedule "uniform"; with "plan" / "search" the
        candidates of the placement search (or the one kept before, `PlacementStore`)."""
        cfg = self.config
        if cfg.schedule == "uniform":
            return variants(cfg, {"uniform": uniform_schedule(cfg).full_steps(self.data.num_steps)})
        placements, kept = self.placements().candidates(
            lambda: search_full_steps(cfg, self.fits, self.scorer, self.log, refine=cfg.schedule == "search")
        )
        return variants(cfg, placements, kept)

    def run(self) -> LESAPredictor:
        """Train every seed of every variant and save the predictor that scores best on the held-out split."""
        cfg, data = self.config, self.data
        todo = self.variants()
        named = cfg.schedule != "uniform" or cfg.correction == "auto"  # checkpoints by variant
        self.log(
            f"lesa train: {len(data.train_idx)} training / {len(data.val_idx)} held-out trajectories"
            + (f" (held out: {data.val_rec.dir})" if data.val_rec is not None else "")
            + f", {data.num_steps} steps, interval {cfg.interval}, warmup {cfg.warmup}, windows "
            f"{','.join(map(str, self.windows))}, phases {','.join(cfg.phases)}, "
            f"target {cfg.target}, {cfg.seeds} seed(s); "
            + "; ".join(f"{v.name}: full steps {v.full_steps}" for v in todo)
        )
        results: dict[tuple[str, int], dict[str, Any]] = {}
        trained_by: dict[str, Phases] = {}
        for variant in todo:
            phases = trained_by[variant.name] = self.phases(variant)
            for seed in range(cfg.seed, cfg.seed + cfg.seeds):
                results[variant.name, seed] = train_seed(
                    phases, seed, self.out, self.log, variant.name if named else None
                )
        best = next(iter(results))
        for key, result in results.items():
            if cfg.better(result["best"], results[best]["best"]):
                best = key
        kept_name, best_seed = best
        kept = next(v for v in todo if v.name == kept_name)
        trained = None
        if len(todo) > 1:
            trained = {v.name: max(r["best"]["psnr"] for (n, _), r in results.items() if n == v.name) for v in todo}
            self.log(
                f"keeping {kept.name}: full steps {kept.full_steps} (held-out PSNR of the trained "
                "predictors: " + "; ".join(f"{name} {v:.2f}" for name, v in trained.items()) + " dB)"
            )
        if cfg.schedule != "uniform" and trained is not None:
            self.placements().keep(kept.placement, kept.correction if cfg.correction == "auto" else None, trained)
        phases = trained_by[kept.name]
        results = {seed: r for (name, seed), r in results.items() if name == kept.name}
        predictor = phases.new_predictor(best_seed)
        predictor.load_state_dict(results[best_seed]["best_state"])
        predictor.eval()
        # one digest of the kept weights per rank: all equal, or the replicas drifted apart
        replicas = distributed.all_gather_objects(weights_digest(predictor))
        summary = {
            "best_seed": best_seed,
            "seeds": {s: {"best": r["best"], "best_at": r["best_at"], "log": r["log"]} for s, r in results.items()},
            "validation": self.validation_rows(phases, predictor),
            "train_trajectories": len(data.train_idx),
            "val_trajectories": len(data.val_idx),
            # what `lesa bench` checks its evaluation trajectories against (`trajectories.training_trajectories`)
            "training_trajectories": data.trajectory_keys(),
            "start": phases.start.kind,
            "candidates": trained,
            "validation_recording": None if data.val_rec is None else str(data.val_rec.dir),
            "config": phases.config.fingerprint(),
            "world_size": distributed.current().world_size,
            "replica_digests": replicas,
        }
        if len(set(replicas)) != 1:
            raise RuntimeError(f"the ranks ended with different predictor weights (digests {replicas})")
        if distributed.current().is_main:
            log = json.dumps(summary, indent=1, default=str) + "\n"
            card = model_card(predictor, summary, data.rec)
            predictor.save_pretrained(self.out, card=card, files={"training_log.json": log})
        distributed.barrier()  # no rank returns before the predictor is on disk
        for name, v in summary["validation"].items():
            self.log(f"validation {name}: latent MSE {v['mse']:.3e}, PSNR {v['psnr']:.2f} dB")
        self.log(f"saved predictor (seed {best_seed}, best at {results[best_seed]['best_at']}) to {self.out}")
        return predictor

    def validation_rows(self, phases: Phases, predictor: LESAPredictor) -> dict[str, dict[str, float]]:
        """The training log's held-out table: the fixed baselines on the kept placement (damped TaylorSeer also on
        the uniform one when the placement was searched; with a correction, the baselines with the correction the
        predictor started from) and the predictor, with and without its correction."""
        schedule, score = phases.schedule, self.scorer.baseline
        g = self.fits.damping(schedule)
        rows = {
            "FORA": score(baseline_config("fora", schedule)),
            "TaylorSeer O1": score(baseline_config("taylorseer-o1", schedule)),
            f"TaylorSeer O1 damped (g {g:.3f})": score(baseline_config("taylorseer-damped", schedule, damping=g)),
        }
        if schedule.searched:
            uniform = uniform_schedule(self.config)
            g_uniform = self.fits.damping(uniform)
            damped = baseline_config("taylorseer-damped", uniform, damping=g_uniform)
            rows[f"TaylorSeer O1 damped (g {g_uniform:.3f}), uniform schedule"] = score(damped)
        weights = self.fits.linear_weights(schedule, 3)
        rows["least-squares linear (3 full steps)"] = score(baseline_config("linear", schedule, weights=weights))
        start = phases.start.correction
        if start:  # the fixed forecasters with the correction this predictor started from
            strength = f"strength {phases.config.correction_start:.3g} at {sorted(start)}"
            rows[f"FORA + correction ({strength})"] = score(baseline_config("fora", schedule, start))
            damped = baseline_config("taylorseer-damped", schedule, start, damping=g)
            rows[f"TaylorSeer O1 damped + correction ({strength})"] = score(damped)
            rows["LESA without its correction"] = self.scorer.score_predictor(predictor, learned_correction=False)
        rows["LESA (this predictor)"] = self.scorer.score_predictor(predictor)
        return rows


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights as saved (fp32, sorted by name): equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _quiet(*_args, **_kwargs) -> None:
    pass
