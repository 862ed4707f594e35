"""Record feature trajectories of the unaccelerated pipeline: one safetensors shard per prompt plus a manifest.

A shard holds the initial noise (the transformer's latent input at step 0, exact dtype), every step's latent input
("latents", exact dtype; recordings made before it existed lack it), the final latent (fp32), the sigma schedule and,
per cache context, every step's tapped feature and transformer output (in the record dtype).

Shards are streamed to disk: the shard's layout is known from a one-step probe, so each step's tensors go straight
into a pre-sized temporary file at their final offsets (RAM holds one step, not a whole trajectory) and the file is
renamed to its final name only once every step is in. A file under a shard's name is therefore always complete.

Under `torchrun` the prompts still to do are split across ranks; every rank writes its own shards and rank 0 writes
the merged manifest after a barrier. A killed run (one process or many, any number of ranks) restarts where it
stopped: a shard on disk counts as done even when the manifest did not list it yet.

Each manifest entry carries its shard's size and SHA-256: a resumed run records a listed shard again when it is
missing or damaged, and `Recording.load` verifies a shard's checksum before its first use. The reader (`Recording`,
the manifest and shard checks) is `lesa.recording`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import disable, distributed, enable
from .adapters import model_class_name
from .checks import check_numbers
from .config import NoCacheConfig
from .io import atomic_path, atomic_write_text, file_sha256
from .pipelines import call_kwargs, float_dtype, pipeline_output
from .recording import FORMAT_VERSION, MANIFEST, check_finite, load_manifest, shard_problem
from .runtime import StepEvent, get_runtime

SHARD_DIR = "shards"
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
_SHARD_NAME = re.compile(r"^(\d{6})\.safetensors$")
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 prompt file; a clear error if it is missing or holds no prompt.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = Path(tmp, "prompts.txt").write_text("a red circle\\n\\n  a blue square\\n", encoding="utf-8")
        ...     read_prompts(Path(tmp, "prompts.txt"))
        ['a red circle', 'a blue square']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (one prompt per line expected)")
    return prompts


class ShardWriter:
    """Writes one safetensors file piece by piece: header and size fixed up front, each piece at its final offset.

    `layout` maps tensor names to (dtype, shape); per-step tensors are written one row (dim 0 index) at a time.
    `close()` refuses a file with any row missing, so an incomplete shard never gets past the caller's rename.
    """

    def __init__(self, path: Path, layout: Layout, metadata: dict[str, str]) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors shards are little-endian; this machine is big-endian")
        self.layout = layout
        entries: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        offset = 0
        for name, (dtype, shape) in layout.items():
            if dtype not in _ST_DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            entries[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.offsets[name] = offset
            self.rows[name] = shape[0] if shape else 1
            offset += nbytes
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        self.data_start = 8 + len(header)
        self.size = self.data_start + offset
        self.missing = {name: set(range(rows)) for name, rows in self.rows.items()}
        self.file = open(path, "r+b")  # noqa: SIM115 - closed in close()
        try:
            self._presize()
            self.file.write(len(header).to_bytes(8, "little") + header)
        except BaseException:
            self.file.close()
            raise

    def _presize(self) -> None:
        try:
            os.posix_fallocate(self.file.fileno(), 0, self.size)  # reserve the space now: a full disk fails early
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left for a {self.size / 2**20:.1f} MiB shard") from e
            self.file.truncate(self.size)  # file systems without fallocate
        except AttributeError:  # no posix_fallocate on this platform
            self.file.truncate(self.size)

    def write(self, name: str, tensor: torch.Tensor, row: int | None = None) -> None:
        """Write tensor `name` whole, or its row `row` (tensor then has the shape without the leading dim)."""
        dtype, shape = self.layout[name]
        expected = tuple(shape[1:]) if row is not None else tuple(shape)
        if tensor.dtype != dtype or tuple(tensor.shape) != expected:
            raise ValueError(
                f"tensor {name!r}{f' step {row}' if row is not None else ''} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the shard's layout expects {dtype} {expected}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.seek(self.data_start + self.offsets[name] + (row or 0) * data.nbytes)
        self.file.write(data)
        if row is None:
            self.missing[name].clear()
        else:
            self.missing[name].discard(row)

    def close(self) -> None:
        """Flush and close; a RuntimeError names the first tensor with rows never written."""
        self.file.close()
        for name, rows in self.missing.items():
            if rows:
                raise RuntimeError(f"tensor {name!r} of the shard is missing row(s) {sorted(rows)[:8]}")

    def abort(self) -> None:
        self.file.close()


def _per_prompt(tensor: torch.Tensor) -> torch.Tensor:
    """One prompt's part of a transformer call: the batch's only row, or, when the pipeline batches classifier-free
    guidance into one call (SD3, PixArt: [uncond, cond]), the whole batch."""
    return tensor[0] if tensor.shape[0] == 1 else tensor


class _StreamingRecorder:
    """Observer that writes each step's tap and output straight into a shard (nothing kept in RAM)."""

    def __init__(self, writer: ShardWriter, dtype: torch.dtype, where: str) -> None:
        self.writer = writer
        self.dtype = dtype
        self.where = where
        self.latent_steps: set[int] = set()

    def __call__(self, event: StepEvent) -> None:
        if event.step not in self.latent_steps:  # the first context's call of a step: every context gets these latents
            latents = event.latents.detach()[0]
            if not self.latent_steps:
                self.writer.write("noise", latents)
            self.writer.write("latents", latents, row=event.step)
            self.latent_steps.add(event.step)
        for kind, tensor in (("feature", event.tap), ("output", event.output)):
            name = f"{event.context}.{kind}"
            piece = _per_prompt(tensor.detach()).to("cpu", self.dtype)
            check_finite(piece, name, f"{self.where} step {event.step}")
            if name not in self.writer.layout:
                raise RuntimeError(f"{self.where}: context {event.context!r} did not appear in the probe run")
            self.writer.write(name, piece, row=event.step)


class _ShapeProbe:
    """Observer that notes the shapes and dtypes a run produces (for the shard layout)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.layout: Layout = {}

    def __call__(self, event: StepEvent) -> None:
        self.layout.setdefault("noise", (event.latents.dtype, tuple(event.latents.shape[1:])))
        self.layout[f"{event.context}.feature"] = (self.dtype, tuple(_per_prompt(event.tap).shape))
        self.layout[f"{event.context}.output"] = (self.dtype, tuple(_per_prompt(event.output).shape))


def _generate(pipe, prompt: str, seed: int, settings: dict, device: str, observer) -> torch.Tensor:
    runtime = get_runtime(pipe.transformer)
    runtime.observers.append(observer)
    try:
        generator = torch.Generator(device).manual_seed(seed)
        return pipeline_output(pipe(prompt=prompt, generator=generator, **call_kwargs(settings, pipe)))
    finally:
        runtime.observers.remove(observer)


def probe_layout(pipe, prompt: str, settings: dict, dtype: torch.dtype, device: str) -> Layout:
    """The shard layout of a full recording, measured from a one-step run (per-step tensors get a leading
    `steps` dimension; the sigma schedule keeps the pipeline's extra terminal value)."""
    steps = settings["steps"]
    probe = _ShapeProbe(dtype)
    final = _generate(pipe, prompt, settings["seed"], dict(settings, steps=1), device, probe)
    n_sigmas = len(pipe.scheduler.sigmas) - 1 + steps
    noise = probe.layout.pop("noise")
    layout: Layout = {"noise": noise, "final": (torch.float32, tuple(final.shape[1:]))}
    layout["sigmas"] = (torch.float32, (n_sigmas,))
    layout["latents"] = (noise[0], (steps, *noise[1]))
    for name in sorted(probe.layout):
        dt, shape = probe.layout[name]
        layout[name] = (dt, (steps, *shape))
    return layout


def layout_bytes(layout: Layout) -> int:
    return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for d, s in layout.values())


def _run_one(
    pipe,
    prompt: str,
    seed: int,
    settings: dict,
    layout: Layout,
    dtype: torch.dtype,
    device: str,
    target: Path,
    where: str,
) -> None:
    """Record one prompt into the shard `target`, streamed through a temporary file renamed only when complete."""
    with atomic_path(target) as tmp:
        writer = ShardWriter(tmp, layout, {"prompt": prompt, "seed": str(seed)})
        try:
            recorder = _StreamingRecorder(writer, dtype, where)
            final = _generate(pipe, prompt, seed, settings, device, recorder)
            final = final.detach()[0].float().cpu()
            check_finite(final, "final", where)
            writer.write("final", final)
            sigmas = torch.as_tensor(pipe.scheduler.sigmas).detach().float().cpu()
            if tuple(sigmas.shape) != layout["sigmas"][1]:
                raise RuntimeError(
                    f"{where}: the scheduler returned {sigmas.numel()} sigmas, the probe run predicted "
                    f"{layout['sigmas'][1][0]}"
                )
            writer.write("sigmas", sigmas)
        except BaseException:
            writer.abort()
            raise
        writer.close()


@dataclass
class RecordResult:
    manifest: Path
    recorded: int
    skipped: int


def _shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:06d}.safetensors"


def _entry(out_dir: Path, index: int, prompt: str, seed: int) -> dict[str, Any]:
    name = _shard_name(index)
    path = out_dir / name
    return {
        "index": index,
        "prompt": prompt,
        "seed": seed,
        "file": name,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def _drop_damaged_entries(out_dir: Path, manifest: dict, log) -> None:
    """Take listed shards that are missing or damaged out of the manifest (removing the damaged file), so a resumed
    run records them again instead of counting them as done."""
    kept = []
    for entry in manifest["entries"]:
        path = out_dir / entry["file"]
        problem = shard_problem(path, entry)
        if problem is None:
            kept.append(entry)
            continue
        log(f"lesa record: shard {path} {problem}; recording prompt {entry['index']} again")
        path.unlink(missing_ok=True)
    manifest["entries"] = kept


def _adopt_finished_shards(out_dir: Path, manifest: dict, seed: int, log) -> None:
    """Add shards that are on disk but not in the manifest (a killed multi-process run), after checking their
    prompt and seed; remove temporary files of shards that were being written when a process died."""
    shard_dir = out_dir / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for stale in shard_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    listed = {e["index"] for e in manifest["entries"]}
    prompts = manifest["prompts"]
    adopted = 0
    for path in sorted(shard_dir.iterdir()):
        match = _SHARD_NAME.match(path.name)
        if not match or int(match.group(1)) in listed:
            continue
        index = int(match.group(1))
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises several types for damaged files
            raise ValueError(f"{path} is not a readable shard ({e}); remove it to record it again") from e
        if index >= len(prompts) or meta.get("prompt") != prompts[index] or meta.get("seed") != str(seed + index):
            raise ValueError(f"{path} belongs to another recording (prompt or seed differ); use another --out")
        manifest["entries"].append(_entry(out_dir, index, prompts[index], seed + index))
        adopted += 1
    manifest["entries"].sort(key=lambda e: e["index"])
    if adopted:
        log(f"lesa record: {adopted} finished shard(s) found on disk that the manifest did not list yet")


def _plan(
    pipe, prompts: list[str], out_dir: Path, settings: dict, record_dtype: torch.dtype, device: str, log
) -> tuple[dict, Layout | None]:
    """Rank 0's part: check or start the manifest, find what is done, probe the shard layout and the disk."""
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
    _drop_damaged_entries(out_dir, manifest, log)
    _adopt_finished_shards(out_dir, manifest, settings["seed"], log)
    _fill_sigmas(out_dir, manifest)
    done = {e["index"] for e in manifest["entries"]}
    todo = [i for i in range(len(prompts)) if i not in done]
    layout = None
    if todo:
        layout = probe_layout(pipe, prompts[todo[0]], settings, record_dtype, device)
        shard_bytes = layout_bytes(layout)
        total = shard_bytes * len(todo)
        out_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out_dir).free
        log(
            f"lesa record: {len(todo)} prompt(s) to record ({len(done)} already done), about "
            f"{shard_bytes / 2**20:.1f} MiB per prompt in {settings['dtype']}, {total / 2**30:.2f} GiB in all; "
            f"{free / 2**30:.1f} GiB free in {out_dir}"
        )
        if total > free:
            raise OSError(
                f"not enough disk in {out_dir}: need about {total / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free"
            )
        manifest.setdefault("contexts", sorted(k.split(".")[0] for k in layout if k.endswith(".feature")))
        manifest.setdefault("shapes", {k: list(s) for k, (_, s) in layout.items() if k != "sigmas"})
    # written before any shard, so a resumed run can always check its settings against it
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest, layout


def check_record_arguments(
    *,
    steps: int,
    height: int | None,
    width: int | None,
    num_frames: int | None,
    guidance_scale: float | None,
    true_cfg_scale: float | None,
    dtype: str,
) -> torch.dtype:
    """Refuse settings no recording can be made with (a ValueError naming the option); the record dtype."""
    check_numbers([("steps", steps), ("height", height), ("width", width), ("num_frames", num_frames)], 1)
    check_numbers([("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)])
    return float_dtype(dtype, "--record-dtype")


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
    """Record every prompt's trajectory into `out_dir` (resuming a previous run of the same settings).

    Under `torchrun` (process group initialised, e.g. by `lesa.distributed.init_distributed`) every rank calls this
    with the same arguments: each records its share of the prompts still to do and rank 0 writes the manifest.

    Example (a second call finds both prompts done):
        >>> import tempfile
        >>> from lesa.testing import tiny_flux_pipeline
        >>> pipe, prompts = tiny_flux_pipeline(), ["a red circle", "a blue square"]
        >>> settings = dict(model="tiny-random-flux", steps=4, height=16, width=16, progress=False, log=lambda *_: None)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     first, again = record(pipe, prompts, out, **settings), record(pipe, prompts, out, **settings)
        >>> (first.recorded, first.skipped), (again.recorded, again.skipped)
        ((2, 0), (0, 2))
    """
    if not prompts:
        raise ValueError("no prompts to record")
    # refused before anything is written: a manifest of bad settings would block the corrected rerun
    record_dtype = check_record_arguments(
        steps=steps,
        height=height,
        width=width,
        num_frames=num_frames,
        guidance_scale=guidance_scale,
        true_cfg_scale=true_cfg_scale,
        dtype=dtype,
    )
    out_dir = Path(out_dir)
    device = str(pipe.transformer.device)
    dist = distributed.current()
    if not dist.is_main:
        log = _quiet
    settings = {
        "model": model,
        "model_class": model_class_name(pipe.transformer),
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
    enable(pipe, NoCacheConfig(count_flops=False))
    try:
        plan = distributed.on_main(lambda: _plan(pipe, prompts, out_dir, settings, record_dtype, device, log))
        manifest, layout = plan
        done = {e["index"] for e in manifest["entries"]}
        todo = [i for i in range(len(prompts)) if i not in done]
        mine = todo[dist.rank :: dist.world_size]
        for index in tqdm(mine, desc="record", unit="prompt", disable=not (progress and dist.is_main)):
            prompt_seed = seed + index
            where = f"prompt {index} ({prompts[index]!r})"
            _run_one(
                pipe,
                prompts[index],
                prompt_seed,
                settings,
                layout,
                record_dtype,
                device,
                out_dir / _shard_name(index),
                where,
            )
            if dist.world_size == 1:  # one process: the manifest follows every shard
                manifest["entries"].append(_entry(out_dir, index, prompts[index], prompt_seed))
                manifest["entries"].sort(key=lambda e: e["index"])
                _fill_sigmas(out_dir, manifest)
                atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
        if dist.distributed:
            # every rank's shards are in; rank 0 lists what the ranks report (each stats its own files)
            mine_entries = [_entry(out_dir, i, prompts[i], seed + i) for i in mine]
            sigmas = torch.as_tensor(pipe.scheduler.sigmas).float().tolist() if mine else None
            reports = distributed.all_gather_objects((mine_entries, sigmas))
            if dist.is_main:
                for entries, rank_sigmas in reports:
                    manifest["entries"].extend(entries)
                    if rank_sigmas is not None and not manifest.get("sigmas"):
                        manifest["sigmas"] = rank_sigmas
                manifest["entries"].sort(key=lambda e: e["index"])
                _fill_sigmas(out_dir, manifest)
                atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
            distributed.barrier()  # no rank returns before the merged manifest is on disk
    finally:
        disable(pipe)
    return RecordResult(manifest_path, len(todo), len(done))


def _quiet(*_args, **_kwargs) -> None:
    pass


def _fill_sigmas(out_dir: Path, manifest: dict) -> None:
    """The manifest's copy of the sigma schedule, read from the first shard once there is one."""
    if manifest.get("sigmas") or not manifest["entries"]:
        return
    with safe_open(str(out_dir / manifest["entries"][0]["file"]), framework="pt") as f:
        manifest["sigmas"] = f.get_tensor("sigmas").tolist()
