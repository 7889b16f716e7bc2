"""torchrun helpers: process group from env vars (gloo on CPU, nccl on CUDA), rank-0 checks, reductions."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE>1``); returns ``(rank, world_size)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank(), world_size()


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_mean(value: float | torch.Tensor) -> float | torch.Tensor:
    """Mean over ranks (identity when not distributed); floats in, floats out."""
    if world_size() == 1:
        return value
    tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= world_size()
    return tensor if isinstance(value, torch.Tensor) else float(tensor)


T = TypeVar("T")


def map_over_ranks(fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[fn(x) for x in items]`` with the items shared out over the ranks (``items[rank::world]``), every rank
    getting the whole list in the original order: post-training work on whole volumes (a MoME threshold
    search) takes 1/world of the time and gives the one-process result."""
    ws, r = world_size(), rank()
    own = [fn(x) for x in items[r::ws]]
    if ws == 1:
        return own
    parts: list[Any] = [None] * ws
    dist.all_gather_object(parts, own)
    out: list[T] = [None] * len(items)  # type: ignore[list-item]
    for i, part in enumerate(parts):
        out[i::ws] = part
    return out


def finish_training() -> bool:
    """Close the torchrun process group after a command's last collective; True where the command goes on.

    What follows training (output-layer refit, calibration, writing the model and report) needs no other rank,
    so rank 0 does it alone: the other ranks return at once, freeing their devices, instead of repeating it
    and writing the same files; no rank waits in a collective while rank 0 works (NCCL would time out), and
    none exits with the group still open (gloo can abort at exit). One process: nothing to do, True."""
    if world_size() == 1:
        return True
    main = is_main_process()
    cleanup()
    return main


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
