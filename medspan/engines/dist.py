"""Process-group facts for ``torchrun`` runs (PyTorch DDP); single-process runs are rank 0."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["destroy_process_group", "init_process_group", "is_main_rank", "rank", "world_size"]


def rank() -> int:
    """Global rank: from the process group when initialised, else ``$RANK`` (torchrun), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes (1 without a process group); checkpoints keep one random state per rank."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    """True on the process that writes files, validates and tracks (rank 0)."""
    return rank() == 0


def init_process_group(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (NCCL on CUDA, else gloo).

    Returns False (and does nothing) when not launched by torchrun.
    """
    if "RANK" not in os.environ or (dist.is_available() and dist.is_initialized()):
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def destroy_process_group() -> None:
    """Tear the default process group down if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
