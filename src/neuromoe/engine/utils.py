"""Seeding and device resolution shared by every training entry point."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from neuromoe.engine.distributed import join_ranks
from neuromoe.errors import ConfigError


def no_decay_names(model: torch.nn.Module) -> frozenset[str]:
    """Full names of the parameters that their module lists in ``no_weight_decay_params``: stacked per-expert
    biases are 2-D but still biases. A module attribute, not a mark on the Parameter, because ``copy.deepcopy``
    (EMA copies, model soups) drops attributes set on a Parameter."""
    return frozenset(f"{prefix}.{n}" if prefix else n for prefix, m in model.named_modules()
                     for n in getattr(m, "no_weight_decay_params", ()))


def decays(name: str, p: torch.nn.Parameter, exempt: frozenset[str] = frozenset()) -> bool:
    """Whether weight decay applies: to matrices and kernels, not to biases, norm scales or ``exempt`` names
    (:func:`no_decay_names`)."""
    return p.ndim >= 2 and name not in exempt


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so a run is a function of its seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def pipeline_entry() -> Iterator[None]:
    """What every pipeline entry point (a decorator on each) guarantees its caller:

    - Python, NumPy and torch random streams as the caller left them, also after an error. Training seeds them
      from its config: a notebook looping over configs after ``np.random.seed(s)`` drew the same numbers after
      each call. CUDA's stream is kept when CUDA was initialised before the call (saving it otherwise would
      initialise CUDA, on every torchrun rank's default device).
    - Under torchrun, every rank returns together once rank 0 has finished the command alone
      (:func:`~neuromoe.engine.distributed.join_ranks`); after an error the launcher stops the others.
    """
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
        join_ranks()
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present else CPU; asking for CUDA without one is a config error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA GPU is available", fix="use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} GPU(s) are visible",
                              fix=f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}, or check CUDA_VISIBLE_DEVICES")
        return device
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device '{name}'", fix="use auto, cpu or cuda")
