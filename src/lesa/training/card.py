"""The model card (README.md) saved with a trained predictor: what it is for, how it was trained, and its measured
validation errors beside the baselines'."""

from __future__ import annotations

from ..predictor import LESAPredictor, ScheduleFreePredictor
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


def schedule_free_card(predictor: ScheduleFreePredictor, summary: dict) -> str:
    """The card of a schedule-free predictor from its training summary (training_log.json)."""
    pc = predictor.config
    cells = summary["cells"]
    best = summary["seeds"][summary["best_seed"]]
    kept = next(
        e["val"]
        for e in best["log"]
        if (e["epoch"] == 0 and best["best_at"] == "init") or f"epoch {e['epoch']}" == best["best_at"]
    )
    rows = [("LESA (this predictor, its own placement)", summary["placements"][f"power {pc.placement_power:g}"])]
    rows += [(f"{name} (same placement)", v) for name, v in summary["baselines"].items()]
    rows += [("LESA on the uniform placement", summary["placements"]["uniform"])]
    header = "| method | " + " | ".join(cells) + " |\n|---|" + "---|" * len(cells)
    table = "\n".join(f"| {name} | " + " | ".join(f"{v[c]['psnr']:.2f}" for c in cells) + " |" for name, v in rows)
    cfg = summary["config"]
    begin = summary["start"]
    start = f"at {begin['kind']} (a_1 = {begin['damping']:.3f})"
    if begin["targets"]:
        damped = [c for c, v in begin["targets"].items() if v]
        start = f"per cell at the better of reuse and damped TaylorSeer O1 (damped on: {', '.join(damped) or 'none'})"
    return f"""---
library_name: lesa
tags: [lesa, diffusion, caching, {pc.model_class}]
---
# LESA predictor for `{pc.base_model}` (schedule-free, format 2)

A learned, stage-aware feature predictor (LESA) for a `{pc.model_class}` that serves **any step count, any shift of the
sigma schedule and any budget**: its forecast coefficients and full-step correction are computed from the sigmas of
the step and of the last {pc.window} full steps, never from a step index.

- Tap: {pc.tap}; feature width {pc.feature_dim}; contexts {pc.contexts}; stages: thresholds {pc.thresholds} on sigma
- Coefficient network per stage and context: a KAN of 4 schedule inputs, one hidden layer of {pc.hidden}, started
  {start}; learned correction: {pc.correction}
- Budget: `speedup` (default {pc.default_speedup:g}) or `full_steps`; full steps after the warm-up
  (0..{pc.warmup}) placed by the sigma rule of power {pc.placement_power:g} (`lesa.schedule.sigma_budget`)
- Trained on recordings at {pc.trained_steps} steps, budgets {list(cfg["speedups"])} x placement powers
  {list(cfg["placement_powers"])}; {cfg["epochs_clar"]} closed-loop epochs at lr {cfg["lr_clar"]},
  batch {cfg["batch_size"]}; kept seed {summary["best_seed"]} at {best["best_at"]}
- Parameters: {predictor.num_parameters():,}

## Held-out latent PSNR (dB) per cell (closed loop, final latent against the unaccelerated run)
{header}
{table}

(At selection: {", ".join(f"{c} {kept[c]['psnr']:.2f}" for c in cells)}.)

Use: `lesa.enable(pipe, lesa.LESAConfig(predictor="<this directory>", speedup=4))` or
`lesa generate --model <pipeline> --predictor <this directory> --steps 28 --speedup 4 ...`.
"""
