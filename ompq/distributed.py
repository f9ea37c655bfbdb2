"""Data-parallel runs on `torch.distributed`: process-group set-up and the all-reduces.

Under `torchrun` (RANK and WORLD_SIZE > 1 in the environment) `setup()` joins the process group
(NCCL when CUDA is available, gloo otherwise); QAT and the profiler then split their samples by
rank and sum their statistics with `all_reduce`. Outside torchrun everything is one process.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["launched", "setup", "rank_world", "all_reduce", "barrier"]


def launched() -> bool:
    """True when this process was started by torchrun with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group): joins the group when
    launched by torchrun and it is not joined yet; (0, 1, False) otherwise."""
    if not launched() and not dist.is_initialized():
        return 0, 1, False
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the joined process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: Tensor, op: str = "sum") -> tuple[Tensor, float]:
    """`t` reduced over all processes ("sum" or "max"), and the seconds the call took.

    On NCCL the tensor travels through the current CUDA device and comes back where it was."""
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    t0 = time.perf_counter()
    home = t.device
    work = t.clone()
    if dist.get_backend() == "nccl" and work.device.type != "cuda":
        work = work.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return work.to(home), time.perf_counter() - t0


def barrier() -> None:
    """Wait for every process (no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
