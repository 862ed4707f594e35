"""Per-model knowledge, and nothing else: where the trunk is and which tensor is tapped, the transformer's class
name (through a torch.compile wrapper), and the sigma schedule a pipeline will use (computed ahead of its call).

Adding a model is one `ModelAdapter(...)` entry in `ADAPTERS`. Torch and diffusers are imported where used: `import
lesa` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """How LESA attaches to one diffusers transformer class.

    trunk: names of the `nn.ModuleList`s whose blocks are skipped on cached steps.
    block_returns: what each trunk block returns, in order (a skipped block returns its inputs in this order).
    tap_module / tap_point: the tapped feature is the `hidden_states` input ("input") or the output ("output") of
        this submodule; on cached steps it is replaced by the forecast, and everything after it runs as usual.
    timestep_scale: sigma = timestep argument / timestep_scale (the transformer's own convention).
    modulation: the first trunk block's timestep-modulated norm, called as `norm(hidden_states, emb=temb)` with the
        block's `hidden_states` and `modulation_argument` inputs, first returned tensor (TeaCache's cheap probe);
        None where TeaCache is not supported.
    stage_thresholds: the model's default sigma thresholds between the predictor's noise stages (a trained predictor
        stores its own; `lesa train --set thresholds=...` overrides this default).
    residual_stream: the tapped feature is the trunk's residual stream itself (the first trunk block's
        `hidden_states` input plus what the blocks add), so a policy may forecast only what the blocks add
        (`CacheConfig.residual`).
    """

    model_class: str
    trunk: tuple[str, ...]
    block_returns: tuple[str, ...]
    tap_module: str
    tap_point: str
    tap: str
    timestep_argument: str = "timestep"
    timestep_scale: float = 1.0
    latent_argument: str = "hidden_states"
    modulation: str | None = None
    modulation_argument: str = "temb"
    stage_thresholds: tuple[float, ...] = (0.9, 0.5)
    residual_stream: bool = False

    def __post_init__(self) -> None:
        if self.tap_point not in ("input", "output"):
            raise ValueError(f"{self.model_class}: tap_point must be 'input' or 'output', got {self.tap_point!r}")

    def trunk_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks = []
        for name in self.trunk:
            module_list = getattr(model, name)
            blocks += [(f"{name}.{i}", block) for i, block in enumerate(module_list)]
        return blocks


FLUX = ModelAdapter(
    model_class="FluxTransformer2DModel",
    trunk=("transformer_blocks", "single_transformer_blocks"),
    block_returns=("encoder_hidden_states", "hidden_states"),
    tap_module="norm_out",
    tap_point="input",
    tap="image-token hidden state after the last single-stream block, before norm_out",
    timestep_scale=1.0,  # the pipeline passes sigma in [0, 1]; the model multiplies by 1000 itself
    modulation="norm1",
    residual_stream=True,
)

# Qwen-Image: the paper's tap, after the output norm (which applies this step's timestep modulation), before the
# output projection. True CFG runs the transformer twice per step in cache contexts "cond" and "uncond", each with
# its own history and experts. The paper moves the second stage threshold to 0.4 for this model.
QWEN_IMAGE = ModelAdapter(
    model_class="QwenImageTransformer2DModel",
    trunk=("transformer_blocks",),
    block_returns=("encoder_hidden_states", "hidden_states"),
    tap_module="proj_out",
    tap_point="input",
    tap="image-token hidden state after norm_out (the output norm), before proj_out",
    timestep_scale=1.0,  # the pipeline passes timestep / 1000
    stage_thresholds=(0.9, 0.4),
)

# HunyuanVideo: the paper's tap, the final model output. We take the output of proj_out, which is the velocity
# before unpatchify (a pure reshape/permute of the same numbers), so one token per row as for the image models.
HUNYUAN_VIDEO = ModelAdapter(
    model_class="HunyuanVideoTransformer3DModel",
    trunk=("transformer_blocks", "single_transformer_blocks"),
    block_returns=("hidden_states", "encoder_hidden_states"),
    tap_module="proj_out",
    tap_point="output",
    tap="final model output (velocity), per token, as proj_out returns it before unpatchify",
    timestep_scale=1000.0,
)

# Wan 2.x: the hidden state after the last block, entering norm_out (the FLUX choice). Wan's head is a LayerNorm,
# a per-step timestep shift/scale and a linear layer, so tapping before it lets each cached step's head apply that
# step's own modulation: the predictor forecasts only the slowly varying trunk feature, not the timestep-dependent
# shift/scale (the paper's other option, the final output, bakes them in). Cost: the history holds inner_dim-wide
# features (1536 for 1.3B, 5120 for 14B) rather than the 64-wide output. norm_out receives an fp32 copy; the runtime
# stores the history in the model's dtype.
WAN = ModelAdapter(
    model_class="WanTransformer3DModel",
    trunk=("blocks",),
    block_returns=("hidden_states",),
    tap_module="norm_out",
    tap_point="input",
    tap="image-token hidden state after the last block, before norm_out",
    timestep_scale=1000.0,  # WanPipeline also passes step_index and sigma in its cache context; those win
    residual_stream=True,
)

# SD3 (MMDiT): an adapter entry alone; same tap as FLUX.
SD3 = ModelAdapter(
    model_class="SD3Transformer2DModel",
    trunk=("transformer_blocks",),
    block_returns=("encoder_hidden_states", "hidden_states"),
    tap_module="norm_out",
    tap_point="input",
    tap="image-token hidden state after the last joint block, before norm_out",
    timestep_scale=1000.0,
    residual_stream=True,
)

ADAPTERS: dict[str, ModelAdapter] = {a.model_class: a for a in (FLUX, QWEN_IMAGE, HUNYUAN_VIDEO, WAN, SD3)}


def model_class_name(transformer: nn.Module) -> str:
    """The transformer's class name, through a `torch.compile` wrapper (`OptimizedModule`): the name of the module it
    compiles, as the adapters, predictors and recordings know it."""
    from diffusers.utils.torch_utils import unwrap_module  # the runtime's unwrapping, imported on use

    return type(unwrap_module(transformer)).__name__


def get_adapter(model: nn.Module | str) -> ModelAdapter:
    """The adapter for a transformer (compiled or not) or its class name; a clear error lists the supported
    classes."""
    name = model if isinstance(model, str) else model_class_name(model)
    if name not in ADAPTERS:
        raise ValueError(f"model class {name!r} is not supported by lesa; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]


# -- the sigma schedule, ahead of the pipeline call --------------------------------------------------------------------
# diffusers' FluxPipeline and QwenImagePipeline: 2x2 latent patches packed per token, sigmas linspace(1, 1/N, N) and,
# with `use_dynamic_shifting`, mu from the image's token count; StableDiffusion3Pipeline: mu from the latent patches
# (no sigmas passed); HunyuanVideoPipeline: sigmas linspace(1, 0, N + 1)[:-1]; any other: `set_timesteps(N)`
_MAX_SHIFT = {"StableDiffusion3Pipeline": 1.16}  # the default max_shift a pipeline passes when its config has none


def _image_size(pipe: Any, height: int | None, width: int | None) -> tuple[int, int]:
    default = getattr(pipe, "default_sample_size", None)
    if (height is None or width is None) and default is None:
        raise ValueError(f"{type(pipe).__name__}: pass height and width to compute its sigma schedule")
    size = None if default is None else default * pipe.vae_scale_factor
    return height or size, width or size


def image_seq_len(pipe: Any, height: int | None = None, width: int | None = None) -> int:
    """The image token count that diffusers' FLUX-style pipelines shift the schedule by (`use_dynamic_shifting`):
    the packed latents' sequence length at height x width pixels (the pipeline's default size when None)."""
    height, width = _image_size(pipe, height, width)
    if type(pipe).__name__ == "StableDiffusion3Pipeline":
        patch = pipe.transformer.config.patch_size
        return (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
    # prepare_latents: latent height and width rounded down to even, then packed in 2x2 patches
    return (int(height) // (pipe.vae_scale_factor * 2)) * (int(width) // (pipe.vae_scale_factor * 2))


def set_timesteps_kwargs(pipe: Any, num_steps: int, height: int | None = None, width: int | None = None) -> dict:
    """What `pipe` passes to `pipe.scheduler.set_timesteps` for `num_steps` steps at height x width, computed as
    diffusers' pipelines do it: with `use_dynamic_shifting`, `mu = calculate_shift(image_seq_len, base_image_seq_len,
    max_image_seq_len, base_shift, max_shift)` from the scheduler's config (FluxPipeline's rule). Refused for a
    dynamic-shifting pipeline whose rule is not known here."""
    import numpy as np

    config = pipe.scheduler.config
    name = type(pipe).__name__
    packed = hasattr(pipe, "_pack_latents") and hasattr(pipe, "vae_scale_factor")  # FLUX, Qwen-Image and kin
    kwargs: dict[str, Any] = {"num_inference_steps": num_steps}
    if packed and not config.get("use_flow_sigmas", False):
        kwargs = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}
    elif name == "HunyuanVideoPipeline":
        kwargs = {"sigmas": np.linspace(1.0, 0.0, num_steps + 1)[:-1]}
    if config.get("use_dynamic_shifting", False):
        if not (packed or name == "StableDiffusion3Pipeline"):
            raise ValueError(
                f"{name}'s scheduler uses dynamic shifting, and how this pipeline computes mu is not known to lesa: "
                "read the schedule from the scheduler after a pipeline call instead"
            )
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        kwargs["mu"] = calculate_shift(
            image_seq_len(pipe, height, width),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", _MAX_SHIFT.get(name, 1.15)),
        )
    return kwargs


def pipeline_sigmas(pipe: Any, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The sigma schedule (`num_steps` + 1 values, the terminal one included) `pipe` will use for a `num_steps`-step
    generation at height x width, computed ahead of the call: sets `pipe.scheduler`'s timesteps as the pipeline does
    (`set_timesteps_kwargs`; the pipeline sets them again at its call) and returns a copy of its sigmas."""
    pipe.scheduler.set_timesteps(**set_timesteps_kwargs(pipe, num_steps, height, width))
    return pipe.scheduler.sigmas.detach().float().cpu().clone()
