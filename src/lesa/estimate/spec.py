"""A model's configuration files, without its weights: a shipped config (`configs/`), a local diffusers pipeline
directory, or a hub id (its `model_index.json` and components' `config.json` only)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).parent / "configs"
# pipeline components that hold weights (tokenizers and schedulers hold none)
WEIGHT_LIBRARIES = ("diffusers", "transformers")


@dataclass
class ModelSpec:
    """What the estimate reads: the pipeline class and each weighted component's class and config."""

    name: str
    pipeline: str
    components: dict[str, dict[str, Any]]  # name -> {"library", "class", "config", ("tokens")}
    defaults: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def transformer_class(self) -> str:
        return self.components["transformer"]["class"]

    @property
    def transformer_config(self) -> dict[str, Any]:
        return self.components["transformer"]["config"]

    @property
    def vae_class(self) -> str | None:
        return self.components.get("vae", {}).get("class")

    @property
    def vae_config(self) -> dict[str, Any]:
        return self.components.get("vae", {}).get("config", {})

    def text_encoders(self) -> list[tuple[str, dict[str, Any]]]:
        return [(n, c) for n, c in self.components.items() if n.startswith("text_encoder")]


def spec_from_pipeline(pipe, name: str | None = None) -> ModelSpec:
    """The spec of a pipeline object already built (its components' configs; e.g. a tiny test pipeline)."""
    components = {}
    for comp, module in pipe.components.items():
        config = getattr(module, "config", None)
        if config is None or not hasattr(module, "parameters"):
            continue
        library = "transformers" if hasattr(config, "to_dict") else "diffusers"
        data = config.to_dict() if library == "transformers" else {k: v for k, v in dict(config).items()}
        data = json.loads(json.dumps(data, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
        components[comp] = {"library": library, "class": type(module).__name__, "config": data}
    return ModelSpec(name=name or type(pipe).__name__, pipeline=type(pipe).__name__, components=components)


def shipped() -> dict[str, Path]:
    """Shipped configs by every name they answer to (file stem, hub id, aliases; lower case)."""
    names: dict[str, Path] = {}
    for path in sorted(CONFIGS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        for name in (path.stem, data.get("hub_id", ""), *data.get("aliases", [])):
            if name:
                names[name.lower()] = path
    return names


def _from_shipped(path: Path) -> ModelSpec:
    data = json.loads(Path(path).read_text())
    return ModelSpec(
        name=data["name"],
        pipeline=data["pipeline"],
        components=data["components"],
        defaults=data.get("defaults", {}),
        source=data.get("source", str(path)),
    )


def _from_files(name: str, read) -> ModelSpec:
    """A spec from a diffusers layout: `read(relative path)` returns a file's JSON (or raises FileNotFoundError)."""
    index = read("model_index.json")
    components = {}
    for comp, entry in index.items():
        if comp.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] not in WEIGHT_LIBRARIES:
            continue
        try:
            config = read(f"{comp}/config.json")
        except FileNotFoundError:
            continue
        components[comp] = {"library": entry[0], "class": entry[1], "config": config}
    if "transformer" not in components:
        raise ValueError(f"{name}: model_index.json names no transformer with a config.json (a DiT pipeline is needed)")
    return ModelSpec(name=name, pipeline=index.get("_class_name", "?"), components=components, source=name)


def load_spec(model: str) -> ModelSpec:
    """The spec of `model`: a shipped name or hub id (no download), a JSON file in the shipped format, a local
    diffusers pipeline directory, or another hub id (its config files are downloaded, never its weights)."""
    names = shipped()
    if model.lower() in names:
        return _from_shipped(names[model.lower()])
    path = Path(model)
    if path.is_file():
        return _from_shipped(path)
    if path.is_dir():

        def read(rel: str) -> dict:
            file = path / rel
            if not file.is_file():
                raise FileNotFoundError(file)
            return json.loads(file.read_text())

        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} has no model_index.json (a diffusers pipeline directory is needed)")
        return _from_files(str(path), read)
    if "/" not in model:
        raise ValueError(
            f"unknown model {model!r}: give a local diffusers pipeline directory, a hub id, or one of the shipped "
            f"configs: {', '.join(sorted(p.stem for p in CONFIGS_DIR.glob('*.json')))}"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def read_hub(rel: str) -> dict:
        try:
            return json.loads(Path(hf_hub_download(model, rel)).read_text())
        except EntryNotFoundError as e:
            raise FileNotFoundError(f"{model}/{rel}") from e

    try:
        return _from_files(model, read_hub)
    except FileNotFoundError:
        raise
    except Exception as e:  # offline, unknown repo, gated
        raise OSError(
            f"could not read {model}'s config files from the hub ({type(e).__name__}: {e}); give a local pipeline "
            "directory or a shipped config instead"
        ) from e
