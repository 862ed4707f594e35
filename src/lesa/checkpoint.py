"""Checkpoints of resumable jobs as one safetensors file: the tensors in its body, everything else as JSON in its
header. Loading parses JSON and raw tensor bytes only; nothing is unpickled, so a file planted in an output directory
cannot run code when a job resumes from it.

A checkpoint holds a tree of dicts, lists, tuples, str, int, float, bool, None and tensors (a model's and an
optimizer's `state_dict`, a log, random-number-generator states). Dict keys that are not strings (an optimizer's
parameter indices) and tuples are tagged, so the tree comes back with the same types; any other type is refused at
save time rather than stored in a form that would not load back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .io import save_safetensors

FORMAT = "lesa-checkpoint"
FORMAT_VERSION = 1
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS)


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        # a copy of its own: safetensors refuses tensors that share storage (views of one parameter)
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {_TENSOR: name}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {
            _ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]
        }
    raise TypeError(f"checkpoint value {where} is a {type(value).__name__}, which a checkpoint cannot hold")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_checkpoint(path: str | Path, tree: Any) -> None:
    """Write `tree` to `path` atomically (a reader sees the previous checkpoint or this one, never a mix)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_encode(tree, tensors, "checkpoint"))
    save_safetensors(tensors, path, {"format": FORMAT, "version": str(FORMAT_VERSION), "tree": meta})


def load_checkpoint(path: str | Path) -> Any:
    """The tree saved by `save_checkpoint` at `path`; a ValueError naming the file if it is not such a checkpoint."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises several types for damaged or foreign files
        raise ValueError(f"{path} is not a readable lesa checkpoint ({e}); delete it to start afresh") from e
    if meta.get("format") != FORMAT or "tree" not in meta:
        raise ValueError(f"{path} is not a lesa checkpoint (no {FORMAT!r} header); delete it to start afresh")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint version {meta['version']} is newer than this lesa reads")
    try:
        return _decode(json.loads(meta["tree"]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is a damaged lesa checkpoint ({e}); delete it to start afresh") from e


def refuse_pickles(directory: str | Path, pattern: str = "*.pt") -> None:
    """Refuse to go on beside checkpoints of the pickled format earlier lesa versions wrote: loading one can run code,
    so they are never read, and silently starting afresh beside them would hide that a run was not resumed."""
    found = sorted(Path(directory).glob(pattern)) if Path(directory).is_dir() else []
    if found:
        raise ValueError(
            f"{found[0]} is a pickled checkpoint of an earlier lesa, which this version never loads (unpickling can "
            "run code): delete it to start afresh"
        )
