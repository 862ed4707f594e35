"""Record feature trajectories of the unaccelerated pipeline: one safetensors shard per prompt plus a manifest.

A shard holds the initial noise (the transformer's latent input at step 0, exact dtype), the final latent (fp32), the
sigma schedule and, per cache context, every step's tapped feature and transformer output (in the record dtype).
Shards and the manifest are written atomically and the manifest lists only finished shards, so a killed run
restarts where it stopped.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import disable, enable
from .config import NoCacheConfig
from .io import atomic_path, atomic_write_text
from .runtime import StepEvent, get_runtime

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
FORMAT_VERSION = 1
# Settings a resumed run must share with the manifest it continues.
_SETTINGS = (
    "model",
    "model_class",
    "steps",
    "height",
    "width",
    "seed",
    "dtype",
    "guidance_scale",
    "negative_prompt",
    "true_cfg_scale",
    "num_frames",
)


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 prompt file; a clear error if it is missing or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (one prompt per line expected)")
    return prompts


class _Recorder:
    """Observer that keeps one generation's per-step tensors."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.noise: torch.Tensor | None = None
        self.features: dict[str, dict[int, torch.Tensor]] = {}
        self.outputs: dict[str, dict[int, torch.Tensor]] = {}

    def __call__(self, event: StepEvent) -> None:
        if self.noise is None:
            self.noise = event.latents.detach()[0].cpu().clone()
        self.features.setdefault(event.context, {})[event.step] = event.tap.detach()[0].to("cpu", self.dtype)
        self.outputs.setdefault(event.context, {})[event.step] = event.output.detach()[0].to("cpu", self.dtype)


def call_kwargs(settings: dict[str, Any], pipe) -> dict[str, Any]:
    """The pipeline keyword arguments that reproduce a recorded run (prompt and latents aside); settings left at
    None keep the pipeline's own defaults."""
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
    """The images (image pipelines) or frames (video pipelines) of a pipeline call."""
    return result.images if hasattr(result, "images") else result.frames


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{where}: tensor {name!r} holds NaN or inf; nothing was written for it")


def _run_one(pipe, prompt: str, seed: int, settings: dict, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    runtime = get_runtime(pipe.transformer)
    recorder = _Recorder(dtype)
    runtime.observers.append(recorder)
    try:
        generator = torch.Generator(device).manual_seed(seed)
        final = pipeline_output(pipe(prompt=prompt, generator=generator, **call_kwargs(settings, pipe)))
    finally:
        runtime.observers.remove(recorder)
    steps = settings["steps"]
    tensors = {
        "noise": recorder.noise.contiguous(),
        "final": final.detach()[0].float().cpu().contiguous(),
        "sigmas": torch.as_tensor(pipe.scheduler.sigmas).detach().float().cpu().contiguous(),
    }
    for ctx, per_step in recorder.features.items():
        if sorted(per_step) != list(range(steps)):
            raise RuntimeError(f"context {ctx!r} recorded steps {sorted(per_step)}, expected 0..{steps - 1}")
        tensors[f"{ctx}.feature"] = torch.stack([per_step[s] for s in range(steps)]).contiguous()
        tensors[f"{ctx}.output"] = torch.stack([recorder.outputs[ctx][s] for s in range(steps)]).contiguous()
    return tensors


def _probe_bytes(pipe, prompt: str, settings: dict, dtype: torch.dtype, device: str) -> int:
    """Bytes of one shard, measured from a one-step run's shapes (scaled to the full step count)."""
    probe = dict(settings, steps=1)
    tensors = _run_one(pipe, prompt, settings["seed"], probe, dtype, device)
    per_step = sum(t.numel() * t.element_size() for k, t in tensors.items() if "." in k)
    fixed = sum(t.numel() * t.element_size() for k, t in tensors.items() if "." not in k)
    return per_step * settings["steps"] + fixed + 4 * settings["steps"]


@dataclass
class RecordResult:
    manifest: Path
    recorded: int
    skipped: int


def record(
    pipe,
    prompts: list[str],
    out_dir: str | Path,
    *,
    model: str,
    steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    true_cfg_scale: float | None = None,
    num_frames: int | None = None,
    progress: bool = True,
    log=print,
) -> RecordResult:
    """Record every prompt's trajectory into `out_dir` (resuming a previous run of the same settings)."""
    if not prompts:
        raise ValueError("no prompts to record")
    record_dtype = getattr(torch, dtype, None)
    if not isinstance(record_dtype, torch.dtype) or not record_dtype.is_floating_point:
        raise ValueError(f"--dtype {dtype!r} is not a floating-point torch dtype (e.g. bfloat16, float16, float32)")
    out_dir = Path(out_dir)
    device = str(pipe.transformer.device)
    settings = {
        "model": model,
        "model_class": type(pipe.transformer).__name__,
        "steps": steps,
        "height": height,
        "width": width,
        "seed": seed,
        "dtype": dtype,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
        "true_cfg_scale": true_cfg_scale,
        "num_frames": num_frames,
    }
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = load_manifest(out_dir)
        for key in _SETTINGS:
            if manifest["settings"].get(key) != settings[key]:
                raise ValueError(
                    f"{manifest_path} was recorded with {key}={manifest['settings'].get(key)!r}, this run asks for "
                    f"{settings[key]!r}; record into another --out directory"
                )
        if manifest["prompts"] != prompts:
            raise ValueError(f"{manifest_path} was recorded for a different prompt list; use another --out directory")
    else:
        manifest = {"format_version": FORMAT_VERSION, "settings": settings, "prompts": prompts, "entries": []}
    done = {e["index"] for e in manifest["entries"]}
    todo = [i for i in range(len(prompts)) if i not in done]

    enable(pipe, NoCacheConfig(count_flops=False))
    try:
        if todo:
            shard_bytes = _probe_bytes(pipe, prompts[todo[0]], settings, record_dtype, device)
            total = shard_bytes * len(todo)
            out_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(out_dir).free
            log(
                f"lesa record: {len(todo)} prompt(s) to record ({len(done)} already done), about "
                f"{shard_bytes / 2**20:.1f} MiB per prompt in {dtype}, {total / 2**30:.2f} GiB in all; "
                f"{free / 2**30:.1f} GiB free in {out_dir}"
            )
            if total > free:
                raise OSError(
                    f"not enough disk in {out_dir}: need about {total / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free"
                )
        for index in tqdm(todo, desc="record", unit="prompt", disable=not progress):
            prompt_seed = seed + index
            tensors = _run_one(pipe, prompts[index], prompt_seed, settings, record_dtype, device)
            _check_finite(tensors, f"prompt {index} ({prompts[index]!r})")
            manifest.setdefault("sigmas", tensors["sigmas"].tolist())
            manifest.setdefault("contexts", sorted(k.split(".")[0] for k in tensors if k.endswith(".feature")))
            manifest.setdefault("shapes", {k: list(t.shape) for k, t in tensors.items() if k != "sigmas"})
            name = f"{SHARD_DIR}/{index:06d}.safetensors"
            with atomic_path(out_dir / name) as tmp:
                save_file(tensors, str(tmp), metadata={"prompt": prompts[index], "seed": str(prompt_seed)})
            manifest["entries"].append(
                {
                    "index": index,
                    "prompt": prompts[index],
                    "seed": prompt_seed,
                    "file": name,
                    "bytes": (out_dir / name).stat().st_size,
                }
            )
            manifest["entries"].sort(key=lambda e: e["index"])
            atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    finally:
        disable(pipe)
    return RecordResult(manifest_path, len(todo), len(done))


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a recording directory, checked for the fields training relies on."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {data_dir} a `lesa record` output directory?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupted (not valid JSON: {e})") from e
    for key in ("format_version", "settings", "prompts", "entries"):
        if key not in manifest:
            raise ValueError(f"{path} is corrupted: field {key!r} is missing")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']} is newer than this lesa reads")
    return manifest


class Recording:
    """Read access to a recording directory, with every shard checked against the manifest when loaded."""

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

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def feature_dim(self) -> int:
        return self.shapes[f"{self.contexts[0]}.feature"][-1]

    def load(self, i: int) -> dict[str, torch.Tensor]:
        entry = self.entries[i]
        path = self.dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {self.dir / MANIFEST} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise ValueError(f"shard {path} is corrupted: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
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
        _check_finite(tensors, f"shard {path}")
        return tensors
