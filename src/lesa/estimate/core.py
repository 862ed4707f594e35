"""The estimate: memory, FLOPs, time and disk of `lesa record`, `lesa train` and `lesa generate`, from config files.

Everything here is computed, nothing is run: parameter counts come from the components built on the meta device
(no memory, no weights), a transformer call's FLOPs and activation bytes from the per-block rules fitted at real
widths (`rules.json`, `benchmarks/fit_estimate.py`), a VAE decode from its per-pixel rule, disk from the layout
`lesa record` writes. What is left out is listed in `IGNORED`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..schedule import StepSchedule, full_step_count, truncation_step, uniform_budget
from . import rules as R
from .measure import TRUNK_KINDS, Geometry
from .spec import ModelSpec, load_spec

RULES_PATH = Path(__file__).parent / "rules.json"
GB = 1e9
# default throughput: an H100 SXM's dense bf16 peak (989 TFLOP/s) at 40 % utilisation
H100_BF16_PEAK_TFLOPS = 989.0
DEFAULT_UTILIZATION = 0.4
DEFAULT_TFLOPS = round(H100_BF16_PEAK_TFLOPS * DEFAULT_UTILIZATION)
DEFAULT_MEMORY_GB = 80.0
# the README's prompt counts (scripts/build_embedded.sh): 100 recorded training prompts, 200 validation prompts
DEFAULT_PROMPTS = 100
DEFAULT_VAL_PROMPTS = 200
IGNORED = (
    "text-encoder activations (no gradient, under 1 GB at these prompt lengths; their weights are counted)",
    "the CUDA context and allocator fragmentation (add ~1-3 GB on a GPU)",
    "elementwise FLOPs (norms, activations, residual adds: not counted by torch's FLOP counter either)",
    "the predictor's own FLOPs (a K-term weighted sum per cached step) and the dynamic-programming placement search",
)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# what the predictor's own graph keeps per cached step and context in the closed loop (measured: the KAN gain
# network [S+1, 256, 256, 1] of the default predictor builds its scaled spline weights anew each call, ~2.26 MB)
PREDICTOR_GRAPH_BYTES = 2.26e6


def predictor_graph_bytes(cfg) -> float:
    """Bytes the predictor's graph keeps per cached step and context (scaled from the default KAN's measurement)."""
    hidden = list(getattr(cfg, "kan_hidden", (256, 256)))
    size = math.prod(hidden[:2]) if len(hidden) > 1 else hidden[0] * 16
    return PREDICTOR_GRAPH_BYTES * size / (256 * 256)


@functools.cache
def load_rules(path: str | None = None) -> dict[str, Any]:
    return json.loads(Path(path or RULES_PATH).read_text())


# -- what each pipeline does with a prompt ------------------------------------------------------------------------
PIPELINES: dict[str, dict[str, Any]] = {
    # video: latent frames (F - 1) / 4 + 1; latents_fp32: the pipeline draws and steps its latents in float32;
    # cfg: "true" (a second, unconditional context with true_cfg_scale > 1 and a negative prompt) or "guidance"
    # (a second context whenever guidance_scale > 1)
    "FluxPipeline": dict(video=False, latents_fp32=False, cfg="true"),
    "QwenImagePipeline": dict(video=False, latents_fp32=False, cfg="true"),
    "HunyuanVideoPipeline": dict(video=True, latents_fp32=True, cfg="true"),
    "WanPipeline": dict(video=True, latents_fp32=True, cfg="guidance"),
}
TRANSFORMER_PIPELINES = {
    "FluxTransformer2DModel": "FluxPipeline",
    "QwenImageTransformer2DModel": "QwenImagePipeline",
    "HunyuanVideoTransformer3DModel": "HunyuanVideoPipeline",
    "WanTransformer3DModel": "WanPipeline",
}


@dataclass
class Workload:
    """What is estimated (None: the model's default from its shipped config, else the pipeline's)."""

    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int = 50
    text_tokens: int | None = None
    contexts: int | None = None  # cache contexts per step (2 with true CFG / CFG); None: from the settings below
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    dtype: str = "bfloat16"
    record_dtype: str = "bfloat16"
    prompts: int = DEFAULT_PROMPTS
    val_prompts: int = DEFAULT_VAL_PROMPTS  # 0: hold out a split of the recording instead (--val-fraction)
    interval: int = 7
    warmup: int = 3
    recipe: str = "calibrated"
    batch_size: int | None = None
    micro_batch: int | None = None
    checkpoint_trunk: bool | None = None
    checkpoint_calls: bool | None = None
    full_steps: int | None = None  # generate: a budget of full steps (evenly placed) instead of the interval rule
    train_overrides: dict[str, Any] = field(default_factory=dict)
    cpu_offload: bool = False
    tflops: float = DEFAULT_TFLOPS
    memory_gb: float = DEFAULT_MEMORY_GB


def train_config(work: Workload):
    """The TrainConfig `lesa train` would use for these settings."""
    try:
        from ..training import TrainConfig
    except ImportError:  # the layout before lesa.training
        from ..train import TrainConfig  # type: ignore[no-redef]
    overrides = dict(work.train_overrides)
    overrides.update(interval=work.interval, warmup=work.warmup)
    for name in ("batch_size", "micro_batch", "checkpoint_trunk", "checkpoint_calls"):
        if getattr(work, name) is not None:
            overrides[name] = getattr(work, name)
    if work.val_prompts and "val_fraction" not in overrides:
        overrides["val_fraction"] = 0.2  # scripts/build_embedded.sh: --val-data with --val-fraction 0.2
    return TrainConfig.from_recipe(work.recipe, **overrides)


# -- geometry -------------------------------------------------------------------------------------------------------
@dataclass
class CallShape:
    """One transformer call of one prompt."""

    geometry: Geometry
    latent_shape: tuple[int, ...]  # the pipeline's latents for one prompt (what record stores per step)
    latent_frames: int
    feature_tokens: int
    feature_width: int
    output_elements: int
    contexts: int


def call_shape(spec: ModelSpec, work: Workload) -> CallShape:
    """The token geometry, recorded tensors and cache contexts of one prompt's transformer call, as the pipeline
    lays them out (its VAE's compression, the transformer's patches)."""
    cls = spec.transformer_class
    pipe = PIPELINES.get(spec.pipeline) or PIPELINES.get(TRANSFORMER_PIPELINES.get(cls, ""), {})
    if not pipe:
        raise ValueError(f"no estimate for pipeline {spec.pipeline} / transformer {cls}")
    cfg = spec.transformer_config
    d = spec.defaults
    height = work.height or d.get("height") or 1024
    width = work.width or d.get("width") or 1024
    dims = R.model_dims(cls, cfg)
    text = work.text_tokens or d.get("text_tokens") or 512
    spatial, temporal = vae_factors(spec)
    if cls in ("FluxTransformer2DModel", "QwenImageTransformer2DModel"):
        if pipe["video"]:
            raise ValueError(f"{cls} is an image model")
        # FLUX / Qwen-Image: latents at 1/spatial, 2x2 patches packed into tokens
        h, w = height // (spatial * 2), width // (spatial * 2)
        frames = 1
        latent_shape = (h * w, dims["in"])
    else:
        num_frames = work.num_frames or d.get("num_frames") or 1
        frames = (num_frames - 1) // temporal + 1
        if cls == "HunyuanVideoTransformer3DModel":
            p, pt = int(cfg.get("patch_size", 2)), int(cfg.get("patch_size_t", 1))
        else:
            pt, p, _ = cfg.get("patch_size", (1, 2, 2))
        lh, lw = height // spatial, width // spatial
        h, w = lh // p, lw // p
        frames = frames // pt
        channels = int(cfg.get("in_channels", 16))
        latent_shape = (channels, frames * pt, lh, lw)
    geo = Geometry(frames, h, w, text)
    tokens = geo.image_tokens
    feature = dims["out"] if cls == "HunyuanVideoTransformer3DModel" else dims["w"]
    return CallShape(
        geometry=geo,
        latent_shape=latent_shape,
        latent_frames=frames,
        feature_tokens=tokens,
        feature_width=feature,
        output_elements=tokens * dims["out"],
        contexts=work.contexts or _contexts(spec, pipe, work),
    )


def vae_factors(spec: ModelSpec) -> tuple[int, int]:
    """(spatial, temporal) compression of the pipeline's VAE, from its config as the pipelines compute it."""
    cfg = spec.vae_config
    cls = spec.vae_class
    if cls == "AutoencoderKL":
        return 2 ** (len(cfg.get("block_out_channels", [0] * 4)) - 1), 1
    if cls == "AutoencoderKLHunyuanVideo":
        return int(cfg.get("spatial_compression_ratio", 8)), int(cfg.get("temporal_compression_ratio", 4))
    if cls in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        down = cfg.get("temperal_downsample", [False, True, True])
        return 2 ** len(down), 2 ** sum(bool(x) for x in down)
    return 8, 4


def _contexts(spec: ModelSpec, pipe: dict, work: Workload) -> int:
    d = spec.defaults
    if pipe["cfg"] == "guidance":
        scale = work.guidance_scale if work.guidance_scale is not None else d.get("guidance_scale", 1.0)
        return 2 if scale > 1 else 1
    scale = work.true_cfg_scale if work.true_cfg_scale is not None else d.get("true_cfg_scale", 1.0)
    negative = work.negative_prompt if work.negative_prompt is not None else d.get("negative_prompt")
    return 2 if scale > 1 and negative is not None else 1


# -- the model ------------------------------------------------------------------------------------------------------
@functools.cache
def _component_params(library: str, class_name: str, config_json: str) -> int:
    """Parameters of one component, built on the meta device from its config (no memory)."""
    import torch

    config = json.loads(config_json)
    with torch.device("meta"):
        if library == "transformers":
            import transformers

            cfg = transformers.AutoConfig.for_model(**config)
            model = getattr(transformers, class_name)._from_config(cfg)
        else:
            import diffusers

            model = getattr(diffusers, class_name).from_config(config)
    return sum(p.numel() for p in model.parameters())


@functools.cache
def _arch(model_class: str, config_json: str) -> dict[str, Any]:
    return R.module_params(model_class, json.loads(config_json))


def architecture(spec: ModelSpec) -> dict[str, Any]:
    return _arch(spec.transformer_class, json.dumps(spec.transformer_config, sort_keys=True))


def component_params(spec: ModelSpec) -> dict[str, int]:
    out = {}
    for name, comp in spec.components.items():
        if name == "transformer":
            out[name] = architecture(spec)["total"]
        else:
            out[name] = _component_params(comp["library"], comp["class"], json.dumps(comp["config"], sort_keys=True))
    return out


def _text_tokens(comp: dict[str, Any], text: int) -> int:
    tokens = comp.get("tokens", text)
    if isinstance(tokens, str):  # "text_tokens+34": the template tokens a pipeline drops after encoding
        return text + int(tokens.split("+")[1])
    return int(tokens)


# -- one transformer call -----------------------------------------------------------------------------------------
def transformer_call(spec: ModelSpec, shape: CallShape, batch: int, dtype: str, rules=None) -> dict[str, float]:
    """A full call at `batch` prompts (one context) by the rules, and the cached call (embedders and head only)."""
    rules = (rules or load_rules())["transformers"].get(spec.transformer_class)
    if rules is None:
        raise ValueError(f"no fitted rules for {spec.transformer_class}")
    arch = architecture(spec)
    dims = R.model_dims(spec.transformer_class, spec.transformer_config)
    geo = replace(shape.geometry, batch=batch)
    full = R.predict_call(rules, arch, geo, dims, dtype)
    cached_flops = {"forward": 0.0, "backward": 0.0}
    for kind, n in arch["counts"].items():
        if kind not in TRUNK_KINDS:  # runs on every step (HunyuanVideo's token refiner)
            one = R.block_flops(rules, kind, arch["kinds"].get(kind, {}), geo, dims)
            for key in cached_flops:
                cached_flops[key] += n * one[key]
    one = R.block_flops(rules, "rest", arch["rest"], geo, dims)
    for key in cached_flops:
        cached_flops[key] += one[key]
    mem = rules["memory"]
    return {
        **full,
        "cached_forward_flops": cached_flops["forward"],
        "cached_backward_flops": cached_flops["backward"],
        # what a cached step of the closed loop keeps: the forecast and the head's saved tensors
        "cached_retained": R.rule_bytes(mem.get("retained.cached", mem["retained.rest"]), geo, dims, dtype),
        "transient_train": R.rule_bytes(mem["transient_train"], geo, dims, dtype),
        "transient_checkpoint": R.rule_bytes(mem["transient_checkpoint"], geo, dims, dtype),
    }


def vae_decode(spec: ModelSpec, shape: CallShape) -> dict[str, float] | None:
    from .vae import vae_estimate

    rule = load_rules().get("vae", {}).get(spec.vae_class or "")
    if rule is None:
        return None
    geo = shape.geometry
    if spec.transformer_class in ("FluxTransformer2DModel", "QwenImageTransformer2DModel"):
        latent = (1, geo.height * 2, geo.width * 2)
    else:
        _, f, lh, lw = shape.latent_shape
        latent = (f, lh, lw)
    return vae_estimate(rule, spec.vae_class, latent)


# -- the estimate -------------------------------------------------------------------------------------------------
def _gb(x: float) -> float:
    return x / GB


def estimate(model: str | ModelSpec, work: Workload | None = None, config=None) -> dict[str, Any]:
    """The estimate of record / train / generate for `model` (a shipped name, hub id, pipeline directory or spec)
    under `work`; `config`: the exact TrainConfig of `lesa train` (default: `work`'s recipe and settings). Every
    figure is estimated (rules fitted on CPU measurements at real widths); see `IGNORED`."""
    work = work or Workload()
    spec = model if isinstance(model, ModelSpec) else load_spec(model)
    shape = call_shape(spec, work)
    dtype = work.dtype
    b = BYTES[dtype]
    params = component_params(spec)
    weights = {name: n * b for name, n in params.items()}
    weights_total = sum(weights.values())
    steps = work.steps
    ctx = shape.contexts
    text = shape.geometry.text
    text_flops = sum(2 * params[name] * _text_tokens(comp, text) for name, comp in spec.text_encoders())
    one = transformer_call(spec, shape, 1, dtype)
    full_flops, cached_flops = one["forward_flops"], one["cached_forward_flops"]

    # record: every step full, per prompt
    latent_elems = math.prod(shape.latent_shape)
    latent_bytes = latent_elems * (4 if PIPELINES[_pipeline(spec)]["latents_fp32"] else b)
    rb = BYTES[work.record_dtype]
    per_step = latent_bytes + ctx * (shape.feature_tokens * shape.feature_width + shape.output_elements) * rb
    disk = latent_bytes + steps * per_step + latent_elems * 4 + (steps + 1) * 4
    record_flops = text_flops + ctx * steps * full_flops
    offload_peak = max(
        [weights["transformer"] + one["peak_inference"]] + [w for n, w in weights.items() if n != "transformer"]
    )
    record_peak = offload_peak if work.cpu_offload else weights_total + one["peak_inference"]

    # generate with LESA at interval N, or at a budget of full steps
    if work.full_steps is not None:
        sched = uniform_budget(steps, full_step_count(steps, full_steps=work.full_steps), work.warmup)
    else:
        sched = StepSchedule(work.interval, work.warmup)
    n_full = len(sched.full_steps(steps))
    n_cached = steps - n_full
    cfg = config if config is not None else train_config(work)
    history = min(cfg.history, max(cfg.windows))
    hist_bytes = ctx * history * shape.feature_tokens * shape.feature_width * b
    predictor_bytes = ctx * 2.4e6 * 4
    vae = vae_decode(spec, shape)
    gen_flops = text_flops + ctx * (n_full * full_flops + n_cached * cached_flops) + (vae["flops"] if vae else 0)
    denoise_peak = one["peak_inference"] + hist_bytes + predictor_bytes
    decode_peak = (vae["peak"] if vae else 0) + hist_bytes + predictor_bytes
    if work.cpu_offload:
        generate_peak = max(weights["transformer"] + denoise_peak, weights.get("vae", 0) + decode_peak, offload_peak)
    else:
        generate_peak = weights_total + max(denoise_peak, decode_peak)

    train = train_estimate(spec, shape, work, cfg, weights, text_flops, one)
    return {
        "model": spec.name,
        "source": spec.source,
        "pipeline": spec.pipeline,
        "workload": {**asdict(work), **_resolved(spec, work), "contexts": ctx, "text_tokens": text},
        "geometry": {
            "latent_tokens": shape.geometry.image_tokens,
            "text_tokens": text,
            "latent_grid": [shape.geometry.frames, shape.geometry.height, shape.geometry.width],
            "feature": [shape.feature_tokens, shape.feature_width],
        },
        "params": params,
        "weights_gb": {n: _gb(w) for n, w in weights.items()},
        "call": {
            "full_tflop": full_flops / 1e12,
            "cached_tflop": cached_flops / 1e12,
            "cached_fraction": cached_flops / full_flops,
            "attention_share": one["attention_flops"] / full_flops,
            "inference_activations_gb": _gb(one["peak_inference"]),
            "kept_per_call_gb": _gb(one["retained"]),
            "kept_per_call_checkpointed_gb": _gb(one["kept_checkpoint"]),
        },
        "record": {
            "disk_per_prompt_gb": _gb(disk),
            "disk_gb": _gb(disk * work.prompts),
            "peak_gb": _gb(record_peak),
            "tflop_per_prompt": record_flops / 1e12,
            "hours": record_flops * work.prompts / (work.tflops * 1e12) / 3600,
            "prompts": work.prompts,
        },
        "train": train,
        "generate": {
            "peak_gb": _gb(generate_peak),
            "tflop": gen_flops / 1e12,
            "seconds": gen_flops / (work.tflops * 1e12),
            "full_steps": n_full,
            "flops_speedup": (text_flops + ctx * steps * full_flops + (vae["flops"] if vae else 0)) / gen_flops,
            "vae_decode_gb": _gb(vae["peak"]) if vae else None,
            "vae_tflop": vae["flops"] / 1e12 if vae else None,
        },
        "device": {"tflops": work.tflops, "memory_gb": work.memory_gb},
        "ignored": list(IGNORED),
    }


def _resolved(spec: ModelSpec, work: Workload) -> dict[str, Any]:
    """The size settings in effect (the workload's, else the model's defaults)."""
    d = spec.defaults
    out = {"height": work.height or d.get("height"), "width": work.width or d.get("width")}
    if PIPELINES[_pipeline(spec)]["video"]:
        out["num_frames"] = work.num_frames or d.get("num_frames") or 1
    return out


def _pipeline(spec: ModelSpec) -> str:
    return spec.pipeline if spec.pipeline in PIPELINES else TRANSFORMER_PIPELINES[spec.transformer_class]


def training_schedule(cfg, steps: int) -> StepSchedule:
    """The schedule whose rollouts set a training run's memory: a format-1 predictor's own; for a schedule-free one
    (format 2) its densest cell at `steps` (the smallest speed-up it trains, evenly placed): an upper bound, as
    its sigma placements keep as many full steps."""
    if getattr(cfg, "format", 1) == 2:
        return uniform_budget(steps, full_step_count(steps, min(cfg.speedups)), cfg.warmup)
    return StepSchedule(cfg.interval, cfg.warmup)


def _schedule_counts(cfg, steps: int) -> dict[str, int]:
    sched = training_schedule(cfg, steps)
    full = sched.full_steps(steps)
    cached = sched.cached_steps(steps)
    # the final loss back-propagates from the first cached step, or with truncation from the cycles it keeps
    first = max(min(cached) if cached else steps, truncation_step(full, steps, getattr(cfg, "truncate_cycles", None)))
    return {
        "full": len(full),
        "cached": len(cached),
        "graph_full": sum(1 for s in full if s > first),
        "graph_cached": sum(1 for s in cached if s >= first),
    }


def train_estimate(spec, shape, work: Workload, cfg, weights: dict[str, float], text_flops, one) -> dict[str, Any]:
    """Peak memory of each phase of `cfg` and the FLOPs / GPU-hours of the whole run (every variant, seed, epoch and
    held-out scoring); with `work.cpu_offload` (lesa train --cpu-offload) only the transformer's weights stay on the
    device, and each other model visits it alone, before a rollout's graph exists."""
    if work.cpu_offload:
        resident = weights["transformer"]
        visit = max([w for n, w in weights.items() if n != "transformer"], default=0.0)
    else:
        resident, visit = sum(weights.values()), 0.0
    dtype = work.dtype
    b = BYTES[dtype]
    ctx = shape.contexts
    steps = work.steps
    counts = _schedule_counts(cfg, steps)
    feat = shape.feature_tokens * shape.feature_width
    batch = cfg.batch_size
    micro = min(cfg.micro_batch or batch, batch)
    history = min(cfg.history, max(cfg.windows))
    # the predictor: ~2.37 M fp32 parameters per context at 50 steps (kan_hidden 256, 256), with its gradient and
    # AdamW's two moments
    predictor = ctx * 2.4e6 * 4 * 4
    n_val = work.val_prompts or max(1, round(work.prompts * cfg.val_fraction))
    n_train = work.prompts - (round(work.prompts * cfg.val_fraction) if cfg.val_fraction else 0)

    def call(batch_: int) -> dict[str, float]:
        return one if batch_ == 1 else transformer_call(spec, shape, batch_, dtype)

    def final_loss(micro_: int, checkpoint: str) -> dict[str, float]:
        """Loss "final": what a rollout of `micro_` trajectories keeps for backward, and the peak of its backward,
        with `checkpoint` "none", "blocks" (checkpoint_trunk) or "calls" (checkpoint_calls)."""
        c = call(micro_)
        if checkpoint == "calls":
            # a full step keeps its inputs and the feature later forecasts read (a latent-sized input and one
            # hidden state); backward recomputes one call at a time, with everything it keeps
            per_full = micro_ * feat * b
            transient = c["retained"] + c["transient_train"]
        elif checkpoint == "blocks":
            per_full, transient = c["kept_checkpoint"], c["transient_checkpoint"]
        else:
            per_full, transient = c["retained"], c["transient_train"]
        # a cached step keeps the forecast, the head's saved tensors and the predictor's own graph (once per call)
        per_cached = c["cached_retained"] + predictor_graph_bytes(cfg)
        kept = ctx * (counts["graph_full"] * per_full + counts["graph_cached"] * per_cached)
        # backward: one call's transient, and the predictor's graph's own (about its size again)
        transient += predictor_graph_bytes(cfg)
        return {"kept": kept, "peak": resident + predictor + kept + transient}

    validation_peak = (
        resident + predictor + max(call(batch)["peak_inference"] + ctx * history * batch * feat * b, visit)
    )
    rollout = text_flops + ctx * (
        counts["full"] * one["forward_flops"] + counts["cached"] * one["cached_forward_flops"]
    )
    phases = []
    flops = 0.0
    val_passes = 0
    variants = 1
    schedule_free = getattr(cfg, "format", 1) == 2
    if cfg.schedule != "uniform" and not schedule_free:
        variants *= 2  # the uniform placement and a planned one
        val_passes += 2  # damped TaylorSeer O1 scored on each placement
    if cfg.correction == "auto" and not schedule_free:
        variants *= 2  # with and without the learned correction
    seeds = cfg.seeds
    if cfg.gain_init == "best":
        val_passes += 2 * variants  # reuse and damped TaylorSeer O1 scored on each variant
    val_passes += variants * seeds  # the initial score of every seed
    val_passes += 8  # the training log's baselines and the kept predictor
    for phase in cfg.phases:
        epochs = cfg.epochs_gt if phase == "gt" else cfg.epochs_clar
        val_passes += variants * seeds * epochs
        if phase == "gt":  # teacher forcing: recorded features of a minibatch on the device, no transformer call
            peak = resident + predictor + ctx * steps * batch * feat * 4
            phases.append(
                dict(phase="gt", peak_gb=_gb(peak), batch=batch, epochs=epochs, note="recorded features, fp32")
            )
            continue
        if cfg.loss == "final":
            backward = ctx * (
                counts["graph_full"] * one["backward_flops"] + counts["graph_cached"] * one["cached_backward_flops"]
            )
            mode = "calls" if cfg.checkpoint_calls else "blocks" if cfg.checkpoint_trunk else "none"
            recompute = ctx * counts["graph_full"] * one["forward_flops"] if mode != "none" else 0.0
            per_traj = rollout + backward + recompute
            with_ckpt = final_loss(micro, "blocks")["peak"]
            with_calls = final_loss(micro, "calls")["peak"]
            without = final_loss(micro, "none")["peak"]
            peak = max({"calls": with_calls, "blocks": with_ckpt, "none": without}[mode], validation_peak)
            phases.append(
                dict(
                    phase="clar",
                    loss="final",
                    peak_gb=_gb(peak),
                    peak_checkpointed_gb=_gb(max(with_ckpt, validation_peak)),
                    peak_calls_checkpointed_gb=_gb(max(with_calls, validation_peak)),
                    peak_not_checkpointed_gb=_gb(max(without, validation_peak)),
                    kept_per_trajectory_gb=_gb(final_loss(1, mode)["kept"]),
                    batch=batch,
                    micro_batch=micro,
                    epochs=epochs,
                )
            )
        else:  # one update per cached step (or cycle) through the head only; full steps without gradients
            per_traj = rollout + ctx * counts["cached"] * one["cached_backward_flops"]
            c = call(batch)
            peak = max(resident + predictor + c["peak_inference"] + c["cached_retained"], validation_peak)
            phases.append(dict(phase="clar", loss=cfg.loss, peak_gb=_gb(peak), batch=batch, epochs=epochs))
        flops += variants * seeds * epochs * n_train * per_traj
    flops += val_passes * n_val * rollout
    peak = max(p["peak_gb"] for p in phases)
    out = {
        "recipe": work.recipe,
        "phases": phases,
        "peak_gb": peak,
        "validation_peak_gb": _gb(validation_peak),
        "variants": variants,
        "train_trajectories": n_train,
        "val_trajectories": n_val,
        "val_passes": val_passes,
        "tflop": flops / 1e12,
        "gpu_hours": flops / (work.tflops * 1e12) / 3600,
        "fits": peak <= work.memory_gb,
        "schedule": counts,
        # a schedule-free run: every figure at its densest cell (`training_schedule`), on one recording
        "densest_speedup": min(cfg.speedups) if schedule_free else None,
    }
    if not out["fits"]:
        out["suggestion"] = fitting_settings(spec, shape, work, cfg, weights, text_flops, one)
    return out


def fitting_settings(spec, shape, work: Workload, cfg, weights, text_flops, one) -> dict[str, Any] | None:
    """The settings closest to `cfg` whose estimate fits `work.memory_gb`: the same batch with the largest
    micro-batch that fits (loss "final"; the trunk's blocks checkpointed, else its calls), the encoders offloaded to
    the CPU only where no micro-batch fits without; else a smaller batch; None when nothing does."""
    final = cfg.loss == "final"
    for batch in range(cfg.batch_size, 0, -1):
        micros = range(min(cfg.micro_batch or batch, batch), 0, -1) if final else [None]
        for offload in sorted({work.cpu_offload, True}):
            for micro in micros:
                for calls in (False, True) if final else (False,):
                    trial = replace(cfg, batch_size=batch, micro_batch=micro)
                    if final:
                        trial = replace(trial, checkpoint_trunk=True, checkpoint_calls=calls)
                    trial_work = replace(work, memory_gb=math.inf, cpu_offload=offload)
                    peak = train_estimate(spec, shape, trial_work, trial, weights, text_flops, one)["peak_gb"]
                    if peak <= work.memory_gb:
                        out = {"batch_size": batch, "micro_batch": micro, "peak_gb": peak, "cpu_offload": offload}
                        if final:
                            out.update(checkpoint_trunk=True, checkpoint_calls=calls)
                        return out
    return None


# -- checks at real scale (benchmarks/fit_estimate.py) --------------------------------------------------------------
def meta_call_flops(spec: ModelSpec, work: Workload | None = None) -> dict[str, Any]:
    """Forward FLOPs of the whole transformer (every block) at the workload's resolution, counted on the meta device
    (no memory; attention through the math path, counted as its matmuls), full and with every trunk block skipped
    (a cached step), against the rules."""
    import time

    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .measure import example_inputs, skipped_trunk

    start = time.perf_counter()
    work = work or Workload()
    shape = call_shape(spec, work)
    with torch.device("meta"):
        model = getattr(diffusers, spec.transformer_class)(**spec.transformer_config).to(torch.bfloat16)
    model.requires_grad_(False)
    kwargs = example_inputs(spec.transformer_class, spec.transformer_config, shape.geometry)
    kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    counted = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(**kwargs)
        counted["full"] = counter.get_total_flops()
        with skipped_trunk(model), FlopCounterMode(display=False) as counter:
            model(**kwargs)
        counted["cached"] = counter.get_total_flops()
    one = transformer_call(spec, shape, 1, work.dtype) if RULES_PATH.exists() else {}
    return {
        "geometry": asdict(shape.geometry),
        "meta_full_flops": counted["full"],
        "meta_cached_flops": counted["cached"],
        "rules_full_flops": one.get("forward_flops"),
        "rules_cached_flops": one.get("cached_forward_flops"),
        "seconds": time.perf_counter() - start,
    }


def meta_table(rows: list[dict], rules: dict[str, Any]) -> str:
    """Markdown: meta-device counts against the rules (evaluated with `rules`)."""
    lines = [
        "| model | tokens (latent + text) | full call: meta device | rules | ratio | cached call: meta device | "
        "rules | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"flux": "flux.1-dev", "qwen": "qwen-image", "hunyuan": "hunyuanvideo", "wan": "wan2.1-t2v-1.3b"}
    for r in rows:
        spec = load_spec(names[r["model"]])
        shape = call_shape(spec, Workload())
        one = transformer_call(spec, shape, 1, "bfloat16", rules)
        g = r["geometry"]
        lines.append(
            f"| {spec.name} | {g['frames'] * g['height'] * g['width']:,} + {g['text']} | "
            f"{r['meta_full_flops'] / 1e12:.2f} TFLOP | {one['forward_flops'] / 1e12:.2f} TFLOP | "
            f"{one['forward_flops'] / r['meta_full_flops']:.3f} | {r['meta_cached_flops'] / 1e9:.2f} GFLOP | "
            f"{one['cached_forward_flops'] / 1e9:.2f} GFLOP | "
            f"{one['cached_forward_flops'] / r['meta_cached_flops']:.3f} |"
        )
    return "\n".join(lines)
