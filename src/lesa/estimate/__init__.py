"""`lesa estimate`: peak accelerator memory, FLOPs, time and disk of record / train / generate, from config files.

No weights are loaded and nothing runs on an accelerator: parameter counts come from each component built on the
meta device, a transformer call's FLOPs and activation bytes from per-block rules fitted on real-width
configurations of FLUX, Qwen-Image, HunyuanVideo and Wan measured on CPU (`benchmarks/fit_estimate.py`,
docs/real-scale.md), the VAE decode from a per-pixel rule fitted the same way, disk from the layout `lesa record`
writes. Every figure is an estimate; `IGNORED` lists what is left out.

    >>> from lesa.estimate import Workload, estimate
    >>> e = estimate("flux.1-dev", Workload(height=1024, width=1024, interval=7, micro_batch=2))  # doctest: +SKIP
    >>> e["train"]["peak_gb"], e["record"]["disk_per_prompt_gb"]  # doctest: +SKIP

For `lesa train` (up-front refusal) and `--dry-run`: `workload_from_settings`, `check_fits`, `format_estimate`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from typing import Any

from .core import (
    DEFAULT_MEMORY_GB,
    DEFAULT_PROMPTS,
    DEFAULT_TFLOPS,
    DEFAULT_UTILIZATION,
    DEFAULT_VAL_PROMPTS,
    H100_BF16_PEAK_TFLOPS,
    IGNORED,
    Workload,
    estimate,
)
from .spec import ModelSpec, load_spec, shipped

__all__ = [
    "DEFAULT_MEMORY_GB",
    "DEFAULT_TFLOPS",
    "IGNORED",
    "ModelSpec",
    "README_SETTINGS",
    "Workload",
    "add_arguments",
    "check_fits",
    "check_train",
    "dry_run",
    "device_memory_gb",
    "estimate",
    "format_estimate",
    "format_table",
    "load_spec",
    "run",
    "train_workload",
    "workload_from_settings",
]

# the four models of the README table, at the settings docs/models.md runs them with
README_SETTINGS: dict[str, dict[str, Any]] = {
    "flux.1-dev": dict(height=1024, width=1024, steps=50, guidance_scale=3.5),
    "qwen-image": dict(height=1328, width=1328, steps=50, true_cfg_scale=4.0, negative_prompt=" "),
    "hunyuanvideo": dict(height=480, width=640, num_frames=65, steps=50),
    "wan2.1-t2v-1.3b": dict(height=480, width=832, num_frames=81, steps=50, guidance_scale=5.0),
}
# recording settings (manifest "settings") -> Workload fields
_SETTINGS = ("steps", "height", "width", "num_frames", "guidance_scale", "negative_prompt", "true_cfg_scale")


def workload_from_settings(settings: dict[str, Any], **overrides: Any) -> Workload:
    """A Workload from a recording's settings (`Recording.settings`: steps, height, width, num_frames,
    guidance_scale, negative_prompt, true_cfg_scale, record dtype) and keyword overrides (any Workload field, e.g.
    contexts=len(recording.contexts), prompts=len(recording), recipe=..., micro_batch=...)."""
    fields = {k: settings[k] for k in _SETTINGS if settings.get(k) is not None}
    if settings.get("dtype"):
        fields["record_dtype"] = settings["dtype"]
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Workload(**fields)


def device_memory_gb(device: str | None = None) -> float | None:
    """Total memory of a CUDA device in GB (1e9 bytes); None for the CPU or when there is no CUDA device."""
    import torch

    if device is not None and not str(device).startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device or "cuda")).total_memory / 1e9


def check_fits(model: str | ModelSpec, work: Workload, memory_gb: float | None = None, config=None) -> dict[str, Any]:
    """The estimate of `lesa train` under `work` (`config`: its exact TrainConfig, else `work`'s recipe); a
    ValueError, naming the estimate and the settings that would fit, when its peak exceeds `memory_gb` (default
    `work.memory_gb`)."""
    if memory_gb is not None:
        work = replace(work, memory_gb=memory_gb)
    e = estimate(model, work, config)
    train = e["train"]
    if train["fits"]:
        return e
    phase = max(train["phases"], key=lambda p: p["peak_gb"])
    settings = f"batch {phase.get('batch')}" + (
        f", micro-batch {phase['micro_batch']}" if "micro_batch" in phase else ""
    )
    message = (
        f"estimated peak memory of lesa train on {e['model']} is {train['peak_gb']:.1f} GB (phase {phase['phase']}, "
        f"{settings}), over the device's {work.memory_gb:.1f} GB"
    )
    fit = train.get("suggestion")
    if fit:
        message += f"; {_fit_options(fit)} is estimated at {fit['peak_gb']:.1f} GB" + (
            " (the same updates, gradients accumulated)" if fit.get("micro_batch") else ""
        )
    else:
        message += "; no micro-batch fits: use a device with more memory, a lower resolution or fewer frames"
    raise ValueError(message + " (`lesa estimate` prints the details; estimates leave ~1-3 GB of CUDA context out)")


def train_workload(
    recording, config, dtype: str = "bfloat16", validation=None, recipe: str | None = None, cpu_offload: bool = False
) -> Workload:
    """The Workload of training `config` (named `recipe`) on `recording` (a `Recording`: its settings, contexts and
    trajectories; `validation`: the --val-data recording; `cpu_offload`: lesa train --cpu-offload)."""
    return workload_from_settings(
        recording.settings,
        contexts=len(recording.contexts),
        prompts=len(recording),
        val_prompts=len(validation) if validation is not None else 0,
        interval=config.interval,
        warmup=config.warmup,
        dtype=dtype,
        recipe=recipe,
        cpu_offload=cpu_offload,
    )


def check_train(
    model: str,
    recording,
    config,
    device: str | None,
    dtype: str = "bfloat16",
    validation=None,
    cpu_offload: bool = False,
) -> dict[str, Any] | None:
    """`lesa train`'s up-front check: on a CUDA device, the estimate of training `config` on `recording` (for a
    schedule-free run, the recording of the most steps: its densest cell) with `model`'s config files; a
    ValueError naming the estimate and the settings that fit when it exceeds the device's memory. None (nothing
    checked) on the CPU, or when `model` has no config files to read (a tiny test pipeline, the embedded model)."""
    memory = device_memory_gb(device)
    if memory is None:
        return None
    try:
        spec = load_spec(model)
    except (ValueError, OSError):
        return None
    work = train_workload(recording, config, dtype, validation, cpu_offload=cpu_offload)
    return check_fits(spec, work, memory, config=config)


def dry_run(model: str | None, work: Workload, part: str, config=None) -> str:
    """`--dry-run` of lesa record / train / generate: the estimate of that command's `part` from `model`'s config
    files (nothing loaded, nothing run); a ValueError for a model without them."""
    try:
        spec = load_spec(model) if model else None
    except (ValueError, OSError) as e:
        spec, reason = None, str(e)
    else:
        reason = "the embedded model and the tiny pipelines have no diffusers config files"
    if spec is None:
        raise ValueError(
            f"--dry-run estimates from a model's config files, which {model or 'the default model'} lacks ({reason}): "
            "give --model a pipeline directory, a hub id or a shipped config (lesa estimate --help)"
        )
    return format_estimate(estimate(spec, work, config), parts=(part,))


def _fit_options(fit: dict[str, Any]) -> str:
    options = f"--batch-size {fit['batch_size']}"
    if fit.get("micro_batch"):
        options += f" --micro-batch {fit['micro_batch']}"  # the trunk checkpointed: the default
    if fit.get("checkpoint_calls"):
        options += " --set checkpoint_calls=true"
    if fit.get("cpu_offload"):
        options += " --cpu-offload"
    return options


def _h(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:,.1f} min"


def format_estimate(e: dict[str, Any], parts: tuple[str, ...] = ("record", "train", "generate")) -> str:
    """The estimate as text (every figure estimated): the model and call, then `parts` of record / train /
    generate (`--dry-run` prints its command's part only)."""
    w = e["workload"]
    g = e["geometry"]
    size = f"{w['height'] or '?'}x{w['width'] or '?'}" + (f"x{w['num_frames']}" if w.get("num_frames") else "")
    lines = [
        f"lesa estimate: {e['model']} ({e['pipeline']}), {size}, {w['steps']} steps, {w['contexts']} context(s), "
        f"{g['latent_tokens']:,} latent + {g['text_tokens']} text tokens, {w['dtype']}",
        "All figures ESTIMATED (rules fitted on CPU measurements at real widths; docs/real-scale.md); time at "
        f"{e['device']['tflops']:g} TFLOP/s sustained; device memory {e['device']['memory_gb']:g} GB.",
        "",
        "weights: "
        + ", ".join(f"{n} {p / 1e9:.2f} B params ({e['weights_gb'][n]:.1f} GB)" for n, p in e["params"].items()),
        f"transformer call: full {e['call']['full_tflop']:.2f} TFLOP (attention {e['call']['attention_share']:.0%}); "
        f"cached step {e['call']['cached_tflop'] * 1e3:.1f} GFLOP = {e['call']['cached_fraction']:.3%} of a full one",
        "",
        f"record ({e['record']['prompts']} prompts): disk {e['record']['disk_per_prompt_gb']:.2f} GB per prompt, "
        f"{e['record']['disk_gb']:,.1f} GB in all; peak memory {e['record']['peak_gb']:.1f} GB"
        f"{' (--cpu-offload)' if w['cpu_offload'] else ''}; {e['record']['tflop_per_prompt']:,.0f} TFLOP per prompt, "
        f"{_h(e['record']['hours'])} in all",
    ]
    if "record" not in parts:
        lines.pop()
    if "train" in parts:
        lines += _train_lines(e)
    if "generate" in parts:
        lines.append(_generate_line(e))
    lines += ["", "left out: " + "; ".join(e["ignored"])]
    return "\n".join(lines)


def _train_lines(e: dict[str, Any]) -> list[str]:
    w, lines = e["workload"], []
    t = e["train"]
    if t.get("densest_speedup"):
        schedule = (
            f"schedule-free, at its densest cell: x{t['densest_speedup']:g} on {w['steps']} steps, "
            f"{t['schedule']['full']} full"
        )
    else:
        schedule = f"interval {w['interval']}, warm-up {w['warmup']}"
    lines.append(
        f"train (--recipe {t['recipe']}{' --cpu-offload' if w['cpu_offload'] else ''}, {schedule}; "
        f"{t['train_trajectories']} training / {t['val_trajectories']} validation trajectories, "
        f"{t['variants']} variant(s)): peak "
        f"{t['peak_gb']:.1f} GB{'' if t['fits'] else ' -- DOES NOT FIT'}; {t['tflop'] / 1e3:,.1f} PFLOP, "
        f"{t['gpu_hours']:,.1f} GPU-hours"
    )
    for p in t["phases"]:
        detail = f"  phase {p['phase']}"
        if p.get("loss") == "final":
            detail += (
                f" (loss final, batch {p['batch']}, micro-batch {p['micro_batch']}): {p['peak_gb']:.1f} GB; "
                f"blocks checkpointed {p['peak_checkpointed_gb']:.1f} GB, calls checkpointed "
                f"{p['peak_calls_checkpointed_gb']:.1f} GB, not checkpointed "
                f"{p['peak_not_checkpointed_gb']:.1f} GB; kept per trajectory {p['kept_per_trajectory_gb']:.1f} GB"
            )
        else:
            detail += f" ({p.get('loss', p.get('note', ''))}, batch {p.get('batch', '-')}): {p['peak_gb']:.1f} GB"
        lines.append(detail)
    lines.append(f"  held-out scoring (no gradients, batch of the minibatch): {t['validation_peak_gb']:.1f} GB")
    if t.get("suggestion"):
        s = t["suggestion"]
        lines.append(f"  fits with {_fit_options(s)}: {s['peak_gb']:.1f} GB")
    elif not t["fits"]:
        lines.append("  no micro-batch fits this device")
    return lines


def _generate_line(e: dict[str, Any]) -> str:
    gen, steps = e["generate"], e["workload"]["steps"]
    vae = f"; VAE decode {gen['vae_decode_gb']:.1f} GB" if gen["vae_decode_gb"] is not None else ""
    return (
        f"generate (LESA, {gen['full_steps']} of {steps} steps full): peak {gen['peak_gb']:.1f} GB{vae}; "
        f"{gen['tflop']:,.0f} TFLOP, {gen['seconds']:.1f} s; FLOPs speed-up {gen['flops_speedup']:.2f}x"
    )


def table_estimates(**overrides: Any) -> dict[str, dict[str, Any]]:
    """The estimates of the README table: each shipped model at its README settings; the calibrated recipe as
    configured (batch 8 at once by default) and at micro-batch 1, and the paper recipe (keyword overrides: Workload
    fields for all)."""
    out = {}
    for name, settings in README_SETTINGS.items():
        work = Workload(**{**settings, **overrides})
        out[name] = {
            "calibrated": estimate(name, work),
            "calibrated_micro1": estimate(name, replace(work, micro_batch=1)),
            "paper": estimate(name, replace(work, recipe="paper", micro_batch=None)),
        }
    return out


def _fits_column(cal: dict[str, Any], micro1: dict[str, Any]) -> str:
    t = cal["train"]
    memory = cal["device"]["memory_gb"]
    if t["fits"]:
        return f"fits as configured ({t['peak_gb']:.0f} GB)"
    fit = t.get("suggestion")
    if fit:
        return f"{_fit_options(fit)}: {fit['peak_gb']:.0f} GB"
    return f"no setting fits {memory:g} GB (micro-batch 1: {micro1['train']['peak_gb']:.0f} GB)"


def format_table(estimates: dict[str, dict[str, Any]]) -> str:
    """The README table (markdown); every figure estimated."""
    first = next(iter(estimates.values()))["calibrated"]
    w0 = first["workload"]
    batch = next(p for p in first["train"]["phases"] if p.get("loss") == "final")["batch"]
    memory = first["device"]["memory_gb"]
    rows = [
        "| model, setting | record: disk per prompt | record: peak | generate: peak | train `paper`: peak | "
        f"train `calibrated`, batch {batch} at once: trunk checkpointed / not | `calibrated` on {memory:g} GB | "
        "GPU-hours per predictor: `calibrated` / `paper` | cached step / full step (FLOPs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in estimates.values():
        cal, paper, micro1 = pair["calibrated"], pair["paper"], pair["calibrated_micro1"]
        w = cal["workload"]
        size = f"{w['height']}x{w['width']}" + (f"x{w['num_frames']}" if w.get("num_frames") else "")
        clar = next(p for p in cal["train"]["phases"] if p.get("loss") == "final")
        rows.append(
            f"| {cal['model']} {size}, {w['steps']} steps, {w['contexts']} context(s) | "
            f"{cal['record']['disk_per_prompt_gb']:.2f} GB | {cal['record']['peak_gb']:.1f} GB | "
            f"{cal['generate']['peak_gb']:.1f} GB | {paper['train']['peak_gb']:.1f} GB | "
            f"{clar['peak_checkpointed_gb']:.0f} / {clar['peak_not_checkpointed_gb']:,.0f} GB | "
            f"{_fits_column(cal, micro1)} | {cal['train']['gpu_hours']:,.1f} / {paper['train']['gpu_hours']:,.1f} | "
            f"{cal['call']['cached_fraction'] * 100:.3f} % |"
        )
    rows.append(
        f"\nEvery figure estimated (`lesa estimate --table`): interval {w0['interval']}, warm-up {w0['warmup']}, "
        f"{w0['prompts']} recorded prompts (80 trained) + {w0['val_prompts']} validation prompts, bf16, "
        f"{first['device']['tflops']:g} TFLOP/s sustained, GB = 1e9 bytes."
    )
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lesa estimate` (the CLI adds them to its subparser)."""
    names = ", ".join(sorted({p.stem for p in shipped().values()}))
    parser.add_argument(
        "--model",
        default=None,
        help=f"a local diffusers pipeline directory, a hub id (config files only) or a shipped config ({names})",
    )
    parser.add_argument("--table", action="store_true", help="the README table: the four shipped models")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None, help="frames of a video pipeline")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens per prompt (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--true-cfg-scale", type=float, default=None)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--contexts", type=int, default=None, help="cache contexts per step (default: from CFG)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--record-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="recorded training prompts")
    parser.add_argument(
        "--val-prompts",
        type=int,
        default=DEFAULT_VAL_PROMPTS,
        help="validation prompts (--val-data); 0: a held-out split of the recording",
    )
    parser.add_argument("--interval", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    try:
        from ..training import DEFAULT_RECIPE, RECIPES
    except ImportError:  # the layout before lesa.training
        from ..train import DEFAULT_RECIPE, RECIPES  # type: ignore[no-redef]
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=tuple(RECIPES))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--checkpoint-trunk", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--checkpoint-calls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="checkpoint each full step's whole transformer call instead of its blocks (lesa train --set "
        "checkpoint_calls=true)",
    )
    parser.add_argument(
        "--cpu-offload",
        action="store_true",
        help="record / generate with model CPU offload; train with every model but the transformer on the CPU",
    )
    parser.add_argument(
        "--tflops",
        type=float,
        default=DEFAULT_TFLOPS,
        help=f"sustained TFLOP/s of the device (default {DEFAULT_TFLOPS:g}: an H100 SXM's "
        f"{H100_BF16_PEAK_TFLOPS:g} dense bf16 at {DEFAULT_UTILIZATION * 100:.0f}%% utilisation)",
    )
    parser.add_argument(
        "--memory-gb", type=float, default=DEFAULT_MEMORY_GB, help="device memory, GB (default 80: an H100)"
    )
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def workload_from_args(args: argparse.Namespace) -> Workload:
    for name in ("height", "width", "num_frames", "steps", "text_tokens", "contexts", "batch_size", "micro_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("tflops", "memory_gb"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    return Workload(
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        steps=args.steps,
        text_tokens=args.text_tokens,
        contexts=args.contexts,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
        negative_prompt=args.negative_prompt,
        dtype=args.dtype,
        record_dtype=args.record_dtype,
        prompts=args.prompts,
        val_prompts=args.val_prompts,
        interval=args.interval,
        warmup=args.warmup,
        recipe=args.recipe,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        checkpoint_trunk=args.checkpoint_trunk,
        checkpoint_calls=args.checkpoint_calls,
        cpu_offload=args.cpu_offload,
        tflops=args.tflops,
        memory_gb=args.memory_gb,
    )


def run(args: argparse.Namespace) -> int:
    """`lesa estimate`: print the estimate of one model (--model) or the README table (--table)."""
    work = workload_from_args(args)
    if args.table:
        per_model = {"steps", "height", "width", "num_frames", "guidance_scale", "true_cfg_scale", "negative_prompt"}
        common = {k: v for k, v in work.__dict__.items() if k not in per_model and v != getattr(Workload(), k)}
        estimates = table_estimates(**common)
        if args.json:
            print(json.dumps(estimates, indent=1, default=str))
        else:
            print(format_table(estimates))
        return 0
    if args.model is None:
        raise ValueError("give --model (a pipeline directory, hub id or shipped config) or --table")
    e = estimate(args.model, work)
    print(json.dumps(e, indent=1, default=str) if args.json else format_estimate(e))
    return 0
