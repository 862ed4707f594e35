"""Read a recording (`lesa record`'s output directory): its manifest, checked for the fields reading and training rely
on, and its shards, each checked against the manifest when loaded.

A recording is `manifest.json` (format version, settings, prompts, and one entry per recorded prompt with its shard's
file, size and SHA-256; with trajectories also the sigma schedule, the cache contexts and the tensor shapes) plus one
safetensors shard per prompt. `Recording.load` checks a shard's size, tensors, shapes and finiteness, and verifies
its checksum before its first use. The writer is `lesa.record`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .io import file_sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Refuse a floating-point tensor that holds NaN or inf (a ValueError naming it, and `where` it was found)."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{where}: tensor {name!r} holds NaN or inf; nothing was written for it")


def shard_problem(path: Path, entry: dict[str, Any], checksum: bool = True) -> str | None:
    """What is wrong with the shard of a manifest entry (missing, other size, with `checksum` other content), or
    None. Entries of recordings made before checksums were recorded are checked by size alone."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"is corrupted: {size} bytes, manifest says {entry['bytes']}"
    if checksum and "sha256" in entry and file_sha256(path) != entry["sha256"]:
        return "is corrupted: its content differs from what was recorded (SHA-256 mismatch)"
    return None


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a recording directory, checked for the fields training relies on."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {data_dir} a `lesa record` output directory?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupted (not valid JSON: {e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is corrupted: a JSON object expected, got {type(manifest).__name__}")
    _require(path, manifest, {"format_version": int, "settings": dict, "prompts": list, "entries": list})
    if manifest["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']} is newer than this lesa reads")
    _require(path, manifest["settings"], {"model": str, "model_class": str, "steps": int}, "settings.")
    if manifest["entries"]:  # a recording with trajectories: what reading and training them relies on
        _require(path, manifest, {"sigmas": list, "contexts": list, "shapes": dict})
        if not manifest["contexts"] or not all(f"{c}.feature" in manifest["shapes"] for c in manifest["contexts"]):
            raise ValueError(f"{path} is corrupted: field 'shapes' lacks the feature shape of a context it lists")
    return manifest


def _require(path: Path, data: dict, types: dict[str, type], prefix: str = "") -> None:
    """Refuse a manifest whose `data` lacks one of the fields `types` names, or holds it with another JSON type."""
    for key, kind in types.items():
        name = prefix + key
        if key not in data:
            raise ValueError(f"{path} is corrupted: field {name!r} is missing")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ValueError(f"{path} is corrupted: field {name!r} is not a JSON {kind.__name__}")


class Recording:
    """Read access to a recording directory, with every shard checked against the manifest when loaded.

    Example:
        >>> import tempfile
        >>> from lesa.record import record
        >>> from lesa.testing import tiny_flux_pipeline
        >>> settings = dict(model="tiny-random-flux", steps=4, height=16, width=16, progress=False, log=lambda *_: None)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     _ = record(tiny_flux_pipeline(), ["a red circle"], out, **settings)
        ...     data = Recording(out)
        ...     len(data), data.contexts, data.feature_dim, tuple(data.load(0)["cond.feature"].shape)
        (1, ['cond'], 32, (4, 64, 32))
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        self.manifest = load_manifest(self.dir)
        self.entries = self.manifest["entries"]
        if not self.entries:
            raise ValueError(f"{self.dir / MANIFEST} lists no recorded trajectory")
        self.settings = self.manifest["settings"]
        self.sigmas: list[float] = self.manifest["sigmas"]
        self.contexts: list[str] = self.manifest["contexts"]
        self.shapes: dict[str, list[int]] = self.manifest["shapes"]
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def feature_dim(self) -> int:
        return self.shapes[f"{self.contexts[0]}.feature"][-1]

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 naming this recording's content (settings, schedule, and each trajectory's prompt, seed and shard
        checksum): a checkpoint or saved search made on other data is never taken for one made on this."""
        keys = ("index", "prompt", "seed", "bytes", "sha256")
        content = {
            "settings": self.settings,
            "sigmas": self.sigmas,
            "entries": [{k: e.get(k) for k in keys} for e in self.entries],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def load(self, i: int) -> dict[str, torch.Tensor]:
        entry = self.entries[i]
        path = self.dir / entry["file"]
        self._check(path, entry, checksum=False)
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as e:  # safetensors raises several types for damaged files
            raise ValueError(f"shard {path} is corrupted: {e}") from e
        for key, shape in self.shapes.items():
            if key not in tensors:
                raise ValueError(f"shard {path} is corrupted: tensor {key!r} is missing")
            if list(tensors[key].shape) != shape:
                raise ValueError(f"shard {path}: tensor {key!r} has shape {list(tensors[key].shape)}, expected {shape}")
        for name, tensor in tensors.items():
            check_finite(tensor, name, f"shard {path}")
        if i not in self._verified:  # after the checks above, which name the tensor at fault when they can
            self._check(path, entry, checksum=True)  # the whole file read once per shard and Recording
            self._verified.add(i)
        return tensors

    def _check(self, path: Path, entry: dict[str, Any], checksum: bool) -> None:
        problem = shard_problem(path, entry, checksum)
        if problem == "is missing":
            raise FileNotFoundError(f"shard {path} listed in {self.dir / MANIFEST} is missing")
        if problem is not None:
            raise ValueError(f"shard {path} {problem}; record it again")
