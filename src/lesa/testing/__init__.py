"""Test helpers outside the library's core: tiny pipelines of the real diffusers classes with random weights, built
in code (offline), by name (`TINY_MODELS`) as `lesa.pipelines.load_pipeline` and the CLI's `--model` take them."""

from __future__ import annotations

from .tiny_pipelines import (
    TINY_MODELS,
    tiny_flux_pipeline,
    tiny_hunyuanvideo_pipeline,
    tiny_qwenimage_pipeline,
    tiny_sd3_pipeline,
    tiny_tokenizer,
    tiny_wan_pipeline,
)

__all__ = [
    "TINY_MODELS",
    "tiny_flux_pipeline",
    "tiny_hunyuanvideo_pipeline",
    "tiny_qwenimage_pipeline",
    "tiny_sd3_pipeline",
    "tiny_tokenizer",
    "tiny_wan_pipeline",
]
