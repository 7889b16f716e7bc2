"""torchrun helpers: process group from env vars (gloo on CPU, nccl on CUDA), rank-0 checks, reductions."""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# A CPU group with a long timeout in which ranks > 0 wait while rank 0 finishes a command alone: a wait in the
# NCCL group would be cut by its watchdog (10 min), and post-training on a large cohort can take longer.
# ``pending``: this process trained under torchrun and rank 0 may still be finishing alone (set by
# finish_training, cleared by join_ranks), so only an entry point that trained waits.
_STATE: dict[str, Any] = {"wait": None, "pending": False}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE>1``); returns ``(rank, world_size)``.

    The backend follows the run's ``device`` (nccl for CUDA, gloo for CPU: a ``--device cpu`` run on a GPU
    machine in an nccl group failed at its first collective). A CUDA rank is bound to GPU ``LOCAL_RANK`` modulo
    the GPUs it sees (a launcher that shows each process one GPU makes that cuda:0) before the group opens,
    and also when the caller opened the group: otherwise every rank worked on cuda:0.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        if not dist.is_initialized():
            if use_cuda:
                dist.init_process_group(backend="nccl", init_method="env://",
                                        device_id=torch.device("cuda", torch.cuda.current_device()))
            else:
                dist.init_process_group(backend="gloo", init_method="env://")
            # closed at exit, not after a command: a group opened again in the same process (demo's pretrain →
            # train) found the first one's addresses in torchrun's store and failed to connect; a process
            # leaving with its group open can make gloo abort at exit
            atexit.register(_close_at_exit)
    if world_size() > 1 and _STATE["wait"] is None:  # every rank builds its Trainer here, so all reach new_group
        _STATE["wait"] = dist.new_group(backend="gloo", timeout=timedelta(days=1))
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
    return tensor.to(value.device) if isinstance(value, torch.Tensor) else float(tensor)  # back where it came from


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
    """After a command's last collective: True on the process that finishes the command (rank 0, or the only one).

    What follows training (output-layer refit, calibration, writing the model and report) needs no other rank,
    so rank 0 does it alone instead of every rank repeating it and writing the same files. The others return
    and wait in :func:`join_ranks` until rank 0 is done."""
    if world_size() == 1:
        return True
    _STATE["pending"] = True
    return is_main_process()


def join_ranks() -> None:
    """End of a command that trained under torchrun (the pipeline entry point calls it on every rank): ranks > 0
    wait here until rank 0 has finished alone, so a caller that goes on (``demo``: pretrain → train) finds every
    output written. An entry point that did not train (``evaluate``, perhaps called on rank 0 only) waits for
    nobody."""
    if _STATE["pending"] and world_size() > 1 and _STATE["wait"] is not None:
        dist.barrier(group=_STATE["wait"])
    _STATE["pending"] = False


def _close_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
        _STATE["wait"] = None


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
