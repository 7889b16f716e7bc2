"""Training engine: :class:`Trainer` with hooks, checkpoints, exact resume and torchrun DDP."""

from neuromoe.engine.checkpoint import load_checkpoint, save_checkpoint
from neuromoe.engine.distributed import (
    all_reduce_mean,
    barrier,
    finish_training,
    init_distributed,
    is_main_process,
    join_ranks,
    map_over_ranks,
)
from neuromoe.engine.schedule import WarmupCosine, warmup_cosine
from neuromoe.engine.trainer import TrainConfig, Trainer, TrainResult, monitor_problems
from neuromoe.engine.utils import resolve_device, seed_everything

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "all_reduce_mean",
    "barrier",
    "finish_training",
    "init_distributed",
    "is_main_process",
    "join_ranks",
    "load_checkpoint",
    "map_over_ranks",
    "monitor_problems",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "warmup_cosine",
]
