"""A tiny training run for the crash-safety test: ``python crash_child.py RUN_DIR [--resume]``.

The real :class:`neuromoe.engine.Trainer` (AdamW, warmup-cosine, dropout, mid-epoch checkpoints every
``CKPT_EVERY`` steps) on an in-memory regression set, CPU, one thread; the final model goes through
:func:`neuromoe.models.registry.save_model`. Every optimiser step is announced as ``step N`` on the
given stream so the parent can SIGKILL it at a chosen step; the test also runs :func:`train` in a
forked process (same code, no interpreter start-up).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

import torch
from torch import nn
from torch.utils.data import TensorDataset

from neuromoe.engine import TrainConfig, Trainer
from neuromoe.models.registry import create_model, register_model, save_model

CKPT_EVERY = 2
CFG = dict(
    epochs=2,
    batch_size=4,
    lr=1e-2,
    device="cpu",
    progress=False,
    log_every=2,
    ckpt_every=CKPT_EVERY,
    warmup_frac=0.2,
    seed=7,
)
N_SAMPLES = 32  # 8 steps per epoch, 16 in all


@register_model("reliability_crash_mlp", family="reliability")
def crash_mlp(hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(6, hidden), nn.GELU(), nn.Dropout(0.2), nn.Linear(hidden, 1))


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 6, generator=g)
    return TensorDataset(
        x, x @ torch.randn(6, 1, generator=g) + 0.05 * torch.randn(N_SAMPLES, 1, generator=g)
    )


def total_steps() -> int:
    return CFG["epochs"] * (N_SAMPLES // CFG["batch_size"])


class AnnouncingTrainer(Trainer):
    stream: IO[str] | None = None

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.stream is not None:
            print(f"step {self.global_step}", file=self.stream, flush=True)
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        return loss, {"mse": float(loss.detach())}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        x, y = batch
        return {"loss": float(nn.functional.mse_loss(self.model(x), y))}


def train(run_dir: Path, resume: bool, stream: IO[str] | None) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("reliability_crash_mlp")
    trainer = AnnouncingTrainer(model, TrainConfig(**CFG), dataset(), dataset(), run_dir=run_dir)
    trainer.stream = stream
    trainer.fit(resume=resume)
    save_model(model, run_dir / "model", {"extra": {"steps": trainer.global_step}})
    if stream is not None:
        print("done", file=stream, flush=True)


if __name__ == "__main__":
    train(Path(sys.argv[1]), "--resume" in sys.argv[2:], sys.stdout)
