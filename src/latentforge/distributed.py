"""Multi-process helpers: set-up from torchrun's environment, rank queries, barrier, collectives.

torchrun sets RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and WORLD_SIZE; without them a run is one process and
every helper here is a no-op. Backend: nccl when the processes use CUDA, gloo on CPU. Used by training
(DDP) and by sharded generation (`pipelines.sharding`).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from latentforge.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global and local rank, how many there are, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # True when `setup` created the process group (and `teardown` destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' was asked for but CUDA is not available; use device = 'cpu'")
    return torch.device("cuda", local_rank)


def setup(device_preference: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (or reuse one that is already initialised)."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, local_rank, world_size, resolve_device(device_preference, local_rank), False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size == 1:
        return DistInfo(0, 0, 1, device, False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, device, True)


def teardown(info: DistInfo) -> None:
    """Destroy the process group if `setup` created it."""
    if info.owns_group and dist.is_initialized():
        # DDP's reducer holds the group and sits in reference cycles: free it now, while the interpreter is
        # whole. Left to interpreter shutdown, gloo's worker threads were once destroyed still joinable
        # (std::terminate, SIGABRT on exit in CI).
        gc.collect()
        dist.destroy_process_group()


def cpu_thread_share(environ: Mapping[str, str] = os.environ) -> int | None:
    """Intra-op threads for one of the LOCAL_WORLD_SIZE processes on this machine: its cores // processes.

    None when the user chose: OMP_NUM_THREADS is set, to anything but the "1" torchrun itself sets when it
    starts several processes per machine and OMP_NUM_THREADS was unset (torch/distributed/run.py).
    """
    processes = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    chosen = environ.get("OMP_NUM_THREADS")
    if chosen is not None and not (chosen == "1" and processes > 1):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if _active() else 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if _active():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over processes (returns a new tensor; a NaN anywhere gives NaN everywhere)."""
    values = values.detach().clone()
    if _active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def mean_metrics(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a metric dict over processes; every process must pass the same keys."""
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    reduced = all_reduce_mean(values)
    return dict(zip(keys, reduced.tolist(), strict=True))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every process (pickled; keep it small)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's `obj` in rank order on rank 0, None on the others (pickled; `[obj]` alone)."""
    if not _active():
        return [obj]
    box: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, box, dst=0)
    return box
