"""The embedded text-to-image pipeline: a small FluxTransformer2DModel in pixel space, MiniLM text features,
rectified flow sampled with FlowMatchEulerDiscreteScheduler and true classifier-free guidance (separate "cond" and
"uncond" transformer calls, each in its own cache context, as in diffusers' FLUX and Qwen-Image pipelines)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

PATCH = 2
CHANNELS = 3
MAX_TOKENS = 24


def transformer_config() -> dict:
    """The shipped architecture: 2 double-stream + 4 single-stream blocks, 4 heads x 32, about 2.4 M parameters.

    Pixel space with 2x2 patches packed into 12 channels: a 32x32 image is 256 tokens, small enough to train on two
    CPU cores in about two hours, large enough that shape, colour and position are all learnable.
    """
    return dict(
        patch_size=1,
        in_channels=CHANNELS * PATCH * PATCH,
        out_channels=CHANNELS * PATCH * PATCH,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=384,
        pooled_projection_dim=384,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/2 * W/2, 12) tokens, channel-major inside each 2x2 patch."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.reshape(b, height // PATCH, width // PATCH, CHANNELS, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, CHANNELS, height, width)


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """Rotary position ids (0, row, col) of the packed tokens."""
    rows, cols = height // PATCH, width // PATCH
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def encode_text(text_encoder, tokenizer, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM token features (padding zeroed) and their masked mean, unit-normalised, as the pooled vector."""
    batch = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    batch = {k: v.to(device or text_encoder.device) for k, v in batch.items()}
    hidden = text_encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    tokens = hidden * mask
    pooled = torch.nn.functional.normalize(tokens.sum(1) / mask.sum(1), dim=-1)
    return tokens, pooled


def predict_velocity(transformer, latents, tokens, pooled, sigma, img_ids) -> torch.Tensor:
    """One transformer call: the flow velocity of packed `latents` at noise level `sigma` (in [0, 1])."""
    txt_ids = torch.zeros(tokens.shape[1], 3, device=latents.device)
    return transformer(
        hidden_states=latents,
        encoder_hidden_states=tokens,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]


class EmbeddedPipeline(DiffusionPipeline):
    """Text-to-image with the embedded model. Components: transformer, scheduler, text_encoder, tokenizer."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self, transformer: FluxTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler, text_encoder, tokenizer
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, pooled = encode_text(self.text_encoder, self.tokenizer, prompts, self._execution_device)
        dtype = self.transformer.dtype
        return tokens.to(dtype), pooled.to(dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        height: int = 32,
        width: int = 32,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images. `latents` are packed noise (B, H/2*W/2, 12); output_type "pil", "np", "pt" or
        "latent" (the packed final sample)."""
        if height % PATCH or width % PATCH:
            raise ValueError(f"height and width must be multiples of {PATCH}, got {height}x{width}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        device, dtype = self._execution_device, self.transformer.dtype
        cond, cond_pooled = self.encode_prompt(prompts)
        guided = guidance_scale > 1.0
        if guided:
            uncond, uncond_pooled = self.encode_prompt(negatives)
        shape = (len(prompts), (height // PATCH) * (width // PATCH), CHANNELS * PATCH * PATCH)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, dtype)
        img_ids = image_ids(height, width, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        conditions = {"cond": (cond, cond_pooled)}
        if guided:
            conditions["uncond"] = (uncond, uncond_pooled)
        for t in self.progress_bar(self.scheduler.timesteps):
            sigma = (t / 1000).expand(latents.shape[0]).to(dtype)
            velocity = {}
            for context, (tokens, pooled) in conditions.items():
                with self.transformer.cache_context(context):
                    velocity[context] = predict_velocity(self.transformer, latents, tokens, pooled, sigma, img_ids)
            v = velocity["cond"]
            if guided:
                v = velocity["uncond"] + guidance_scale * (v - velocity["uncond"])
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            pixels = (unpack(latents.float(), height, width) / 2 + 0.5).clamp(0, 1)
            if output_type == "pt":
                images = pixels
            else:
                array = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
                images = array if output_type == "np" else [PIL.Image.fromarray(a) for a in array]
        return ImagePipelineOutput(images=images) if return_dict else (images,)
