"""The model card (README.md) saved with a trained predictor: what it is for, how it was trained, and its measured
validation errors beside the baselines'."""

from __future__ import annotations

from ..predictor import LESAPredictor
from ..recording import Recording


def model_card(predictor: LESAPredictor, summary: dict, rec: Recording) -> str:
    """The card of `predictor` from its training summary (training_log.json) and training recording."""
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
        placed = f", placed by `schedule={cfg.get('schedule')}`: {schedule.full_steps(pc.num_steps)}"
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
