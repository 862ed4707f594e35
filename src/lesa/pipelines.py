"""Pipeline helpers: loading a pipeline (a local diffusers directory or hub id, the embedded model, or a tiny random
pipeline by name), how a run names its model, device and dtype options, and the call arguments and output of a
recorded run.

The default is the embedded model when its trained weights are present in the package; otherwise a *tiny
FluxPipeline with random weights* built locally in code (`lesa.testing`), which exercises the workflow offline but
draws noise.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from .adapters import ADAPTERS, get_adapter

TINY_MODEL = "tiny-random-flux"
EMBEDDED_MODEL = "embedded"
# the other tiny random pipelines (tiny-random-qwenimage, ...) are named in lesa.testing.TINY_MODELS


SCHEDULE_FREE = "schedule-free"


def shipped_predictor(interval: int | None = None) -> Path:
    """The LESA predictor shipped for the embedded model: the schedule-free one (any step count and budget), or with
    `interval` the format-1 predictor of interval N (50 steps, warm-up 3), where one ships.

    Example:
        >>> import lesa
        >>> shipped_predictor().name, (shipped_predictor() / "config.json").is_file()
        ('schedule-free', True)
        >>> config = lesa.LESAConfig(predictor=shipped_predictor(), speedup=4)
    """
    from .embedded.loading import PREDICTORS_DIR

    path = PREDICTORS_DIR / (SCHEDULE_FREE if interval is None else f"n{interval}")
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in PREDICTORS_DIR.iterdir() if (p / "config.json").is_file())
        wanted = "the schedule-free predictor" if interval is None else f"a predictor for interval {interval}"
        raise FileNotFoundError(
            f"{wanted} is not shipped (shipped: {', '.join(available) or 'none'}); pass --predictor DIR"
        )
    return path


def default_model() -> str:
    from .embedded.loading import SHIPPED_DIR

    return EMBEDDED_MODEL if (SHIPPED_DIR / "transformer").is_dir() else TINY_MODEL


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """The device `--device` names (None: cuda if available, else cpu), refused up front when it is no torch device
    or this machine lacks it (torch would only fail deep inside the first transfer)."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"--device {device}: no {parsed.type} device is available on this machine")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if parsed.index is not None and count is not None and parsed.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} {parsed.type} device(s)")
    return device


def float_dtype(name: str, option: str = "--dtype") -> torch.dtype:
    """The floating-point torch dtype called `name` (e.g. bfloat16); a ValueError naming `option` otherwise."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{option} {name!r} is not a floating-point torch dtype (e.g. float32, bfloat16, float16)")
    return dtype


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    """The pipeline dtype `--dtype` names (None: bfloat16 on cuda, float32 elsewhere)."""
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return float_dtype(name)


def load_pipeline(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    cpu_offload: bool = False,
    offload_encoders: bool = False,
):
    """A pipeline from a local directory or hub id (`model`), or the default, in `dtype`: moved to `device`, or with
    `cpu_offload` kept on the CPU and moved to `device` one component at a time (`enable_model_cpu_offload`), or
    with `offload_encoders` the transformer on `device` and every other model on the CPU until its own call
    (`offload_encoders_to_cpu`, what `lesa train --cpu-offload` uses).

    Example:
        >>> pipe = load_pipeline("tiny-random-flux", device="cpu")
        >>> type(pipe).__name__, pipe.transformer.dtype, pipe.device.type
        ('FluxPipeline', torch.float32, 'cpu')
        >>> pipe = load_pipeline("black-forest-labs/FLUX.1-dev", device="cuda", dtype="bfloat16")  # doctest: +SKIP
    """
    from diffusers import DiffusionPipeline

    from .embedded.loading import is_embedded_dir, load_embedded
    from .testing import TINY_MODELS

    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype, device)
    model = model or default_model()
    built_here = model in TINY_MODELS or model == EMBEDDED_MODEL or is_embedded_dir(model)
    if model in TINY_MODELS:
        pipe = TINY_MODELS[model]()
    elif model == EMBEDDED_MODEL:
        pipe = load_embedded()
    elif is_embedded_dir(model):
        pipe = load_embedded(model)
    else:
        path = Path(model)
        if path.exists() and not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
        if not path.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"{model} is not a local directory and HF_HUB_OFFLINE=1 forbids the hub")
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{model}: {type(pipe).__name__} has no transformer; supported: {', '.join(ADAPTERS)}")
    get_adapter(transformer)
    if built_here and torch_dtype != torch.float32:
        pipe.to(dtype=torch_dtype)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif offload_encoders:
        offload_encoders_to_cpu(pipe, device)
    else:
        pipe.to(device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def offload_encoders_to_cpu(pipe, device: str | torch.device) -> None:
    """Put the transformer on `device` and keep every other model of `pipe` (text encoders, VAE, ...) on the CPU,
    moved to `device` for each of its forward calls and back after it.

    Training needs this rather than `enable_model_cpu_offload`: that one moves the transformer back to the CPU when
    the pipeline call ends, before backward replays its checkpointed blocks. The encoders run before the rollout
    (nothing of its graph is alive yet), so the device holds the transformer plus one encoder at a time instead of
    all of them. The pipeline's execution device is the hooks' `device` (diffusers reads it from `_hf_hook`)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class VisitDevice(ModelHook):
        def __init__(self, execution_device: torch.device) -> None:
            self.execution_device = execution_device

        def pre_forward(self, module, *args, **kwargs):
            module.to(self.execution_device)
            return args, kwargs

        def post_forward(self, module, output):
            module.to("cpu")
            return output

    device = torch.device(device)
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        if name == "transformer":
            component.to(device)
        else:
            component.to("cpu")
            add_hook_to_module(component, VisitDevice(device))


def model_label(model: str | None) -> str:
    """How a recording or predictor names its base model: a built-in name, an absolute path or a hub id."""
    from .testing import TINY_MODELS

    model = model or default_model()
    if model in TINY_MODELS or model == EMBEDDED_MODEL:
        return model
    return str(Path(model).resolve()) if Path(model).exists() else model


def call_kwargs(settings: dict[str, Any], pipe) -> dict[str, Any]:
    """The pipeline keyword arguments that reproduce a recorded run (prompt and latents aside); settings left at
    None keep the pipeline's own defaults.

    Example:
        >>> from lesa.testing import tiny_flux_pipeline
        >>> call_kwargs({"steps": 10, "height": 16, "width": 16, "guidance_scale": None}, tiny_flux_pipeline())
        {'num_inference_steps': 10, 'output_type': 'latent', 'height': 16, 'width': 16}
    """
    kwargs: dict[str, Any] = {"num_inference_steps": settings["steps"], "output_type": "latent"}
    for key in ("height", "width", "num_frames", "guidance_scale", "negative_prompt", "true_cfg_scale"):
        if settings.get(key) is not None:
            kwargs[key] = settings[key]
    accepted = inspect.signature(pipe.__call__).parameters
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} does not take {', '.join(unknown)}")
    return kwargs


def pipeline_output(result) -> torch.Tensor:
    """The images (image pipelines) or frames (video pipelines) of a pipeline call.

    Example:
        >>> from lesa.testing import tiny_flux_pipeline, tiny_wan_pipeline
        >>> settings = dict(num_inference_steps=2, height=16, width=16, output_type="latent")
        >>> image = tiny_flux_pipeline()("a red circle", **settings)
        >>> video = tiny_wan_pipeline()("a red circle", num_frames=5, max_sequence_length=16, **settings)
        >>> pipeline_output(image).shape, pipeline_output(video).shape
        (torch.Size([1, 64, 4]), torch.Size([1, 16, 2, 2, 2]))
    """
    return result.images if hasattr(result, "images") else result.frames
