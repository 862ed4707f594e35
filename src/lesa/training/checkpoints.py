"""One seed of one variant, resumable: the phases' epochs with a checkpoint after each (safetensors + JSON,
`lesa.checkpoint`), every epoch scored on the held-out split and the best-scoring weights kept (the last epoch is often
not the best). Rank 0 alone reads and writes checkpoints; the replicas resume from the same state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..checkpoint import load_checkpoint, refuse_pickles, save_checkpoint
from ..predictor import LESAPredictor
from .config import TrainConfig
from .phases import Phases


def fingerprint(phases: Phases) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the settings of the variant being trained and the
    content of the recordings it trains and validates on."""
    return {**phases.config.fingerprint(), **phases.data.fingerprint()}


def checkpoint_path(out: Path, seed: int, variant: str | None) -> Path:
    """`out/checkpoints/seedS.safetensors`, or `VARIANT-seedS` when a run trains several variants."""
    slug = None if variant is None else variant.replace(",", "").replace(" ", "-")
    name = f"seed{seed}" if slug is None else f"{slug}-seed{seed}"
    return out / "checkpoints" / f"{name}.safetensors"


def _mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    recordings = {"data": "the --data recording", "validation_data": "the --val-data recording"}
    return [
        f"{k}: {recordings[k]}'s content differs" if k in recordings else k
        for k in {**saved, **current}
        if saved.get(k) != current.get(k)
    ]


def train_seed(
    phases: Phases, seed: int, out: Path, log: Callable[[str], None], variant: str | None = None
) -> dict[str, Any]:
    """Train one seed of `phases`' variant (`variant`: its name when a run trains several, which keeps its
    checkpoints apart), resuming from its checkpoint. Returns the finished checkpoint (best state, log)."""
    cfg = phases.config
    dist = phases.dist
    ckpt_path = checkpoint_path(out, seed, variant)
    distributed.on_main(lambda: refuse_pickles(ckpt_path.parent, ckpt_path.with_suffix(".pt").name))
    predictor = phases.new_predictor(seed)
    distributed.broadcast_parameters(predictor)  # bit-identical replicas from the start, whatever the phase
    # what --anchor pulls toward (kept in the optimiser state, so a resumed run pulls toward the same start)
    anchor = {"anchor": [p.detach().clone() for p in predictor.parameters()]} if cfg.anchor else {}
    current = fingerprint(phases)
    ckpt = distributed.on_main(lambda: load_checkpoint(ckpt_path) if ckpt_path.exists() else None)
    if ckpt is not None:
        # a setting added since the checkpoint was written counts as its default, the behaviour from before it
        saved = {**TrainConfig().fingerprint(), **ckpt["fingerprint"]}
        if saved != current:
            raise ValueError(
                f"{ckpt_path} was made with other settings ({', '.join(_mismatch(saved, current))}); "
                f"train into another --out or pass --restart"
            )
        ckpt["fingerprint"] = current
        predictor.load_state_dict(ckpt["predictor"])
        if not ckpt["done"]:
            phase = cfg.phases[ckpt["phase_index"]] if ckpt["phase_index"] >= 0 else "init"
            log(f"seed {seed}: resuming from {ckpt_path} after {phase} epoch {ckpt['epoch']}")
    else:
        ckpt = {"fingerprint": current, "phase_index": -1, "epoch": 0, "log": [], "done": False}
        init = phases.scorer.score_predictor(predictor)
        ckpt.update(best=init, best_state=cpu_state(predictor), best_at="init")
        ckpt["log"].append({"phase": "init", "epoch": 0, "val": init})
    if ckpt["done"]:
        return ckpt

    def save() -> None:
        if dist.is_main:
            save_checkpoint(ckpt_path, ckpt)

    epochs = {"gt": cfg.epochs_gt, "clar": cfg.epochs_clar}
    peaks = {"gt": cfg.lr_gt, "clar": cfg.lr_clar}
    for p, phase in enumerate(cfg.phases):
        resuming = p == ckpt["phase_index"]
        if p < ckpt["phase_index"] or (resuming and ckpt["epoch"] >= epochs[phase]):
            continue
        # a fresh optimizer and learning-rate schedule for every phase (never the previous phase's)
        decay = 0.0 if cfg.anchor else cfg.weight_decay  # the anchor replaces the decay toward zero
        optimizer = torch.optim.AdamW(phases.param_groups(predictor, peaks[phase]), weight_decay=decay)
        total = epochs[phase] * phases.updates_per_epoch(phase)
        state, start = {"t": 0, **anchor}, 1
        if resuming:
            optimizer.load_state_dict(ckpt["optimizer"])
            state, start = ckpt["opt_state"], ckpt["epoch"] + 1
        run_epoch = phases.gt_epoch if phase == "gt" else phases.clar_epoch
        for epoch in range(start, epochs[phase] + 1):
            desc = f"seed {seed} {phase} {epoch}/{epochs[phase]}"
            loss = run_epoch(predictor, optimizer, state, seed * 1000 + p * 100 + epoch, total, desc)
            check_replicas(predictor, desc)
            val = phases.scorer.score_predictor(predictor)
            ckpt["log"].append(
                {"phase": phase, "epoch": epoch, "train_loss": loss, "val": val, "lr": optimizer.param_groups[0]["lr"]}
            )
            better = cfg.better(val, ckpt["best"])
            if better:
                ckpt.update(best=val, best_state=cpu_state(predictor), best_at=f"{phase} {epoch}")
            log(
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
            save()
    ckpt["done"] = True
    save()
    return ckpt


def check_replicas(predictor: LESAPredictor, where: str) -> None:
    """Every rank must hold bit-identical weights after an epoch (cheap: one broadcast of the weights)."""
    diff = distributed.replicas_differ(predictor)
    if diff != 0.0:
        raise RuntimeError(f"{where}: the ranks' predictor weights differ (max abs {diff:.3e}); gradients not in sync")


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
