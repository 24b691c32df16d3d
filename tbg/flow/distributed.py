"""Process-group helpers so that the same training/sampling command runs on 1 or N processes.

Under ``torchrun`` (WORLD_SIZE > 1 in the environment) the default process group is created on first
use: NCCL when CUDA is available, gloo otherwise, and destroyed at interpreter exit. Without it everything
behaves as rank 0 of 1.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "rank", "world_size", "barrier", "all_gather_object", "default_device",
           "enter_on_rank0"]


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment; returns whether one is active."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    # A group still alive when the interpreter finalizes can abort the process from gloo's worker
    # threads ("terminate called without an active exception"): destroy it while Python is intact.
    atexit.register(_destroy_if_active)
    return True


def _destroy_if_active() -> None:
    if _active():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] without a process group)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def enter_on_rank0(stack: ExitStack, context: Callable[[], AbstractContextManager[Any]]) -> None:
    """Enter ``context()`` into ``stack`` on rank 0 only (e.g. the lock of an output folder that all ranks
    write to); when it fails there, every rank raises (rank 0 its own exception), so none waits forever."""
    error: Exception | None = None
    if rank() == 0:
        try:
            stack.enter_context(context())
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
            error = err
    messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if messages[0] is not None:
        raise RuntimeError(f"rank 0 could not start: {messages[0]}")


def default_device() -> torch.device:
    """This rank's GPU under torchrun when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")
