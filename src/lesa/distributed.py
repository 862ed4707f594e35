"""Multi-process runs under `torchrun`: process-group set-up and the few collectives record and train need.

Everything here is a thin layer over `torch.distributed`. Without `torchrun` (no `WORLD_SIZE` in the environment,
or `WORLD_SIZE=1`) nothing is initialised and every helper is a no-op, so single-process runs are unchanged.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size and the device it should use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that `torchrun` describes in the environment (once) and return this rank's place.

    The backend follows the device: `nccl` for CUDA (each rank on `cuda:LOCAL_RANK`), `gloo` for CPU. `device`
    overrides the default (CUDA when available); a plain "cuda" becomes this rank's own GPU.
    """
    from .pipelines import resolve_device  # pipelines imports the diffusers adapters: only when a run starts

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)  # refuses a device this machine lacks, on every rank
    if world <= 1:
        return DistInfo(device=device)
    if device.startswith("cuda"):
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    if info.world_size != world:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group has {info.world_size} ranks")
    return info


def current() -> DistInfo:
    """This process's place in an already initialised process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), backend=dist.get_backend()
    )


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def _collective_device() -> torch.device:
    """Tensors handed to collectives live here: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled); returns `obj` itself when there is one process."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank; an exception it raises is raised on every rank
    (instead of leaving the others waiting in the next collective)."""
    result: Any = None
    if current().is_main:
        try:
            result = fn()
        except Exception as e:
            result = _Failure(e)
    result = broadcast_object(result)
    if isinstance(result, _Failure):
        raise result.error
    return result


@dataclass
class _Failure:
    error: Exception


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled); `[obj]` when there is one process."""
    if not current().distributed:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (float64 on the collective device), returned on the caller's device."""
    if not current().distributed:
        return values
    buf = values.detach().to(_collective_device(), torch.float64).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    # all ranks take rank 0's result bit for bit, so decisions made from it (skip an update, best epoch) agree
    dist.broadcast(buf, src=0)
    return buf.to(values.device)


def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Sum every parameter's gradient over ranks, in place.

    A parameter that no rank gave a gradient keeps `grad = None` (so AdamW skips it as it would in one process);
    one that some rank left at None counts as zero there.
    """
    if not current().distributed:
        return
    params = list(module.parameters())
    device = _collective_device()
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(used, op=dist.ReduceOp.SUM)
    active = [p for p, u in zip(params, used.tolist(), strict=True) if u > 0]
    if not active:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device) for p in active]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in active:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype).clone()
        offset += n


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters, in place (a fresh initialisation can differ in the last bits between
    processes: BLAS results depend on memory alignment)."""
    if not current().distributed:
        return
    device = _collective_device()
    with torch.no_grad():
        for p in module.parameters():
            buffer = p.detach().to(device).clone()
            dist.broadcast(buffer, src=0)
            p.copy_(buffer.to(p.device))


def replicas_differ(module: torch.nn.Module) -> float:
    """The largest absolute difference of this rank's parameters from rank 0's, maximised over ranks (0.0 when the
    replicas agree bit for bit, or with one process)."""
    if not current().distributed:
        return 0.0
    device = _collective_device()
    mine = torch.cat([p.detach().reshape(-1).to(device, torch.float64) for p in module.parameters()])
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    diff = (mine - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)
