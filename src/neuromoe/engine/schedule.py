"""Per-step learning-rate schedule: linear warmup then cosine decay to ``min_lr_ratio``.

Kept as a pure function of the step (no closures in its state) so a checkpoint stores only the step.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimiser step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each param group's lr to ``base_lr × warmup_cosine(step)``; ``base_lr`` is kept in the group."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float, min_lr_ratio: float):
        self.optimizer = optimizer
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = round(warmup_frac * self.total_steps)
        self.min_lr_ratio = min_lr_ratio
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self._apply()

    def _apply(self) -> None:
        factor = warmup_cosine(self.step_count, self.total_steps, self.warmup_steps, self.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
