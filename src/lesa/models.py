"""Loading pipelines: a local diffusers directory or hub id, the embedded model, or a tiny random FLUX pipeline.

The default is the embedded model when its trained weights are present in the package; otherwise a *tiny
FluxPipeline with random weights* built locally in code, which exercises the workflow offline but draws noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapters import ADAPTERS, get_adapter

TINY_MODEL = "tiny-random-flux"
EMBEDDED_MODEL = "embedded"


def shipped_predictor(interval: int) -> Path:
    """The LESA predictor shipped for the embedded model at interval N (50 steps, warm-up 3)."""
    from .embedded.loading import PREDICTORS_DIR

    path = PREDICTORS_DIR / f"n{interval}"
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in PREDICTORS_DIR.glob("n*") if (p / "config.json").is_file())
        raise FileNotFoundError(
            f"no shipped predictor for interval {interval} (shipped: {', '.join(available) or 'none'}); "
            "pass --predictor DIR or another --interval"
        )
    return path


def default_model() -> str:
    from .embedded.loading import SHIPPED_DIR

    return EMBEDDED_MODEL if (SHIPPED_DIR / "transformer").is_dir() else TINY_MODEL


def tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline of the real diffusers classes with tiny random components (~0.3 M params), built offline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            projection_dim=32,
            hidden_act="gelu",
        )
    )
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(model_max_length=77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=T5Tokenizer(model_max_length=512),
        transformer=transformer,
    )
    for component in (transformer, text_encoder, text_encoder_2, vae):
        component.eval()
    return pipe


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


def load_pipeline(model: str | None = None, device: str | None = None, dtype: str | None = None):
    """A pipeline from a local directory or hub id (`model`), or the default; moved to `device` in `dtype`."""
    from diffusers import DiffusionPipeline

    from .embedded.loading import is_embedded_dir, load_embedded

    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    model = model or default_model()
    built_here = model in (TINY_MODEL, EMBEDDED_MODEL) or is_embedded_dir(model)
    if model == TINY_MODEL:
        pipe = tiny_flux_pipeline()
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
    pipe.to(device=device)
    if built_here and torch_dtype != torch.float32:
        pipe.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_label(model: str | None) -> str:
    """How a recording or predictor names its base model: a built-in name, an absolute path or a hub id."""
    model = model or default_model()
    if model in (TINY_MODEL, EMBEDDED_MODEL):
        return model
    return str(Path(model).resolve()) if Path(model).exists() else model
