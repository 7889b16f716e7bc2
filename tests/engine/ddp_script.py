"""Run by test_ddp.py under torchrun: a tiny regression trained on 2 gloo ranks; each rank dumps its weights,
then validates an odd-sized set of item ids, maps a function over 7 items on the ranks, closes the process group
with ``finish_training`` / ``join_ranks`` and writes what it saw to ``report_rank{rank}.json``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from neuromoe.engine import (
    TrainConfig,
    Trainer,
    finish_training,
    init_distributed,
    join_ranks,
    map_over_ranks,
)


class RankRouted(nn.Module):
    """An MLP plus an 'expert' that only rank 1's items reach: its gradient is None on rank 0; and one that
    no item on any rank reaches (``unused``): its gradient must stay None everywhere."""

    def __init__(self, use_expert: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        self.expert = nn.Linear(5, 1)
        self.unused = nn.Linear(5, 1)
        self.use_expert = use_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (self.expert(x) if self.use_expert else 0.0)


class MSETrainer(Trainer):
    draws: list[float]

    def training_step(self, batch):
        x, y = batch
        self.draws.append(float(torch.rand(())))  # what dropout / MAE masks / router noise would draw
        loss = nn.functional.mse_loss(self.model(x), y)
        # the same keys in a different order per rank: they must be averaged by name (a: 5.5, b: 11.0)
        return loss, ({"a": 1.0, "b": 2.0} if self.rank == 0 else {"b": 20.0, "a": 10.0})

    def validation_step(self, batch):
        x, y = batch
        return {"loss": float(nn.functional.mse_loss(self.model(x), y))}


class IdTrainer(MSETrainer):
    """Validation over item ids: records this rank's items and what validation_end is given."""

    def validation_step(self, batch):
        ids = batch[0][:, 0].tolist()
        self.local_ids += ids
        return {"ids": ids}

    def validation_end(self, outputs):
        ids = [i for o in outputs for i in o["ids"]]
        self.end_ids = sorted(ids)
        return {"val_n": len(ids), "val_max_id": max(ids), "val_mean_id": sum(ids) / len(ids)}


def main(out: Path) -> None:
    rank, world = init_distributed()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    torch.manual_seed(rank)  # different initial weights per rank: the trainer must broadcast rank 0's
    model = RankRouted(use_expert=rank == 1)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2, device="cpu", progress=False, log_every=1, ckpt_every=2)
    init = {f"init.{k}": v.clone() for k, v in model.state_dict().items()}
    trainer = MSETrainer(model, cfg, data, data, run_dir=out / "run")
    trainer.draws = []
    result = trainer.fit()
    save_file({k: v.contiguous() for k, v in {**model.state_dict(), **init}.items()}, str(out / f"weights_rank{rank}.safetensors"),
              metadata={"world": str(world), "best": repr(result.best_metric), "draws": json.dumps(trainer.draws)})
    # 7 validation items on 2 ranks: each must be validated once, and max / count be over all 7 items
    ids = TensorDataset(torch.arange(7.0)[:, None])
    probe = IdTrainer(model, cfg, data, ids, run_dir=out / "val")
    probe.local_ids, probe.end_ids, probe.draws = [], [], []
    metrics = probe.validate()
    mapped = map_over_ranks(lambda i: [i, rank], list(range(7)))
    goes_on = finish_training()
    if goes_on:  # rank 0 finishing the command alone, slowly: the others must wait for it before returning
        time.sleep(2)
        (out / "finished_by_rank0").write_text("done")
    join_ranks()
    if rank == 0:  # an entry point that did not train, called on rank 0 only (evaluate): waits for nobody
        join_ranks()
    (out / f"report_rank{rank}.json").write_text(json.dumps({
        "val": metrics, "local_ids": probe.local_ids, "end_ids": probe.end_ids, "mapped": mapped,
        "goes_on": goes_on, "saw_rank0_finish": (out / "finished_by_rank0").is_file()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
