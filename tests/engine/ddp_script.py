"""Run by test_ddp.py under torchrun: a tiny regression trained on 2 gloo ranks; each rank dumps its weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from neuromoe.engine import TrainConfig, Trainer, cleanup, init_distributed


class RankRouted(nn.Module):
    """An MLP plus an 'expert' that only rank 1's items reach: its gradient is None on rank 0."""

    def __init__(self, use_expert: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        self.expert = nn.Linear(5, 1)
        self.use_expert = use_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (self.expert(x) if self.use_expert else 0.0)


class MSETrainer(Trainer):
    def training_step(self, batch):
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        return loss, {}

    def validation_step(self, batch):
        x, y = batch
        return {"loss": float(nn.functional.mse_loss(self.model(x), y))}


def main(out: Path) -> None:
    rank, world = init_distributed()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    torch.manual_seed(rank)  # different initial weights per rank: the trainer must broadcast rank 0's
    model = RankRouted(use_expert=rank == 1)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2, device="cpu", progress=False, log_every=1, ckpt_every=2)
    init = {f"init.{k}": v.clone() for k, v in model.state_dict().items()}
    result = MSETrainer(model, cfg, data, data, run_dir=out / "run").fit()
    save_file({k: v.contiguous() for k, v in {**model.state_dict(), **init}.items()}, str(out / f"weights_rank{rank}.safetensors"),
              metadata={"world": str(world), "best": repr(result.best_metric)})
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
