"""Seeding and device resolution shared by every training entry point."""

from __future__ import annotations

import random

import numpy as np
import torch

from neuromoe.errors import ConfigError


def decays(p: torch.nn.Parameter) -> bool:
    """Whether weight decay applies: to matrices and kernels, not to biases, norm scales or parameters marked
    ``_no_weight_decay`` (stacked per-expert biases are 2-D but still biases)."""
    return p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so a run is a function of its seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present else CPU; asking for CUDA without one is a config error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA GPU is available", fix="use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device '{name}'", fix="use auto, cpu or cuda")
