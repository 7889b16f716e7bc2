"""The training engine every model family subclasses: hooks, AdamW + warmup-cosine, exact resume, DDP.

A family overrides :meth:`Trainer.training_step`, :meth:`Trainer.validation_step` and
:meth:`Trainer.validation_end` (and optionally the other hooks); the engine owns the loop, mixed
precision, accumulation, clipping, logging (``metrics.csv`` + TensorBoard), early stopping and
checkpoints. Data order is a deterministic function of ``(seed, epoch)`` and the checkpoint stores the
position inside the epoch, so an interrupted run resumed with ``fit(resume=True)`` ends with the same
weights, bit for bit, as an uninterrupted one (same device and thread count; on CUDA only where its kernels
are deterministic, which nothing here enforces: cuDNN convolution and pooling backward are not).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from neuromoe.config import save_config
from neuromoe.engine import distributed as dist_utils
from neuromoe.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from neuromoe.engine.precision import cpu_features, guard_bf16_conv3d, resolve_precision
from neuromoe.engine.schedule import WarmupCosine
from neuromoe.engine.utils import decays, no_decay_names, resolve_device, seed_everything
from neuromoe.errors import ConfigError, InputError, TrainingDiverged
from neuromoe.io.atomic import atomic_write_json, atomic_write_text


@dataclass
class TrainConfig:
    """Optimisation settings shared by every family (embedded as ``train:`` in family configs)."""

    epochs: int = 10
    max_steps: int = 0  # optimiser steps; 0 = no limit
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # max grad norm; 0 = off
    accum_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16
    # Train with 5D tensors (conv weights, volume batches) in channels_last_3d: oneDNN's 3D convolutions
    # are faster in it; with bf16 on CPU a MoME / U-Net step at 32³ is ~25 % shorter (docs/benchmarks.md).
    # The model is returned to the default layout when fit() ends.
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    val_every: int = 1  # epochs
    monitor: str = "val_loss"
    monitor_mode: str = "min"  # min | max
    patience: int = 0  # validations without improvement before stopping; 0 = off
    ckpt_every: int = 0  # optimiser steps; 0 = only at the end of each epoch
    # Write checkpoints/last.safetensors (each epoch, every ckpt_every steps) and best.safetensors so a
    # killed run can resume; off for runs nobody resumes (cross-validation folds): the writes are pure cost.
    resumable: bool = True
    num_workers: int = 0
    log_every: int = 10  # optimiser steps
    progress: bool = True

    def problems(self) -> list[tuple[str, str, str]]:
        """``(key, what is wrong, fix)`` for values of the right type that training cannot use; the config
        loader names them under their section (``pretrain.lr``), before any output is written."""
        out = []
        if self.precision not in ("fp32", "bf16"):
            out.append(("precision", f"'{self.precision}' is not fp32 or bf16", "bf16"))
        if self.monitor_mode not in ("min", "max"):
            out.append(("monitor_mode", f"'{self.monitor_mode}' is not min or max", "min"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):  # 'gpu' failed only when the trainer was built
            out.append(("device", f"'{self.device}' is not auto, cpu, cuda or cuda:N", "auto"))
        for name in ("epochs", "batch_size", "accum_steps", "val_every", "log_every"):
            if getattr(self, name) < 1:
                out.append((name, "must be >= 1", "1"))
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(("lr", f"{self.lr} is not a positive number", "1e-3"))
        for name in ("weight_decay", "grad_clip", "min_lr_ratio"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                out.append((name, f"{getattr(self, name)} is not a number >= 0", "0"))
        if not 0 <= self.warmup_frac <= 1:
            out.append(("warmup_frac", f"{self.warmup_frac} is not within [0, 1]", "0.05"))
        for name in ("max_steps", "patience", "ckpt_every", "num_workers"):
            if getattr(self, name) < 0:
                out.append((name, "must be >= 0", "0"))
        return out


def monitor_problems(cfg: Any, metrics: dict[str, dict[str, str]]) -> list[tuple[str, str, str]]:
    """``problems()`` entries for a family config: each stage's ``monitor`` must name a metric that stage's
    validation reports (``metrics[stage]``: name → "min" | "max"), in that metric's direction. A typo surfaced
    only after the first epoch, and a Dice monitored with the default mode 'min' kept the worst checkpoint."""
    out = []
    for stage, names in metrics.items():
        tc = getattr(cfg, stage)
        if tc.monitor not in names:
            out.append((f"{stage}.monitor", f"'{tc.monitor}' is not a validation metric of {stage} (one of "
                        f"{', '.join(sorted(names))})", "val_loss"))
        elif names[tc.monitor] != tc.monitor_mode:
            out.append((f"{stage}.monitor_mode", f"'{tc.monitor_mode}' would keep the worst checkpoint by "
                        f"{tc.monitor}", names[tc.monitor]))
    return out


@dataclass
class TrainResult:
    best_metric: float
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    run_dir: Path | None = None


def _check(cfg: TrainConfig) -> None:
    """For a TrainConfig built in Python (the config loader checks loaded ones, naming their section)."""
    for key, what, value in cfg.problems():
        raise ConfigError(f"training setting {key} {what}", fix=f"set {key} to a valid value, e.g. {value}")


def _holds_train_config(path: Path) -> bool:
    """Whether ``path`` holds a bare TrainConfig (as the Trainer writes), not a family config."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return True
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return not isinstance(data, dict) or set(data) <= names


class _SeededSamples(Dataset):
    """Fetches item ``i`` under CPU RNG seeds derived from ``(base, i)`` and restores the caller's RNG after.

    Random augmentation then depends on the item and the epoch only, not on which DataLoader worker fetched
    it or how many items that worker fetched before (exact resume with ``num_workers > 0``), and ranks no
    longer draw identical augmentation noise."""

    def __init__(self, dataset: Dataset, base: int):
        self.dataset, self.base = dataset, base

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        s = (self.base * 1_000_003 + int(i)) % 2**63
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.default_generator.manual_seed(s)  # CPU generator only; CUDA streams untouched
        try:
            return self.dataset[i]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class Trainer:
    """Generic supervised/self-supervised loop; subclass and override the hooks."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_set: Dataset, val_set: Dataset | None = None,
                 run_dir: str | Path = "runs/train", collate_fn: Callable[[list[Any]], Any] | None = None):
        _check(cfg)
        self.cfg, self.train_set, self.val_set, self.collate_fn = cfg, train_set, val_set, collate_fn
        self.run_dir = Path(run_dir)
        device = resolve_device(cfg.device)  # first: it chooses the process group's backend
        self.rank, self.world_size = dist_utils.init_distributed(device)
        if device.type == "cuda":  # fixed patch / volume shapes: cuDNN times its kernels once and keeps the fastest
            torch.backends.cudnn.benchmark = True
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.model = model.to(device)
        self.precision = resolve_precision(cfg.precision, device)
        if self.precision == "bf16" and device.type == "cpu":
            guard_bf16_conv3d(self.model)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        self.history: list[dict[str, float]] = []
        # Weights of the best validation so far (CPU copies), on every rank; also in checkpoints/best.safetensors
        # so that a resumed run still ends with the best weights of the whole run, not of its resumed part.
        self.best_state: dict[str, Tensor] | None = None
        self.global_step = 0
        self.epoch = 0
        self._writer: Any = None

    # ------------------------------------------------------------------------------------- hooks
    def training_step(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError("a Trainer subclass must implement training_step(batch) -> (loss, logs)")

    def validation_step(self, batch: Any) -> dict[str, Any]:
        raise NotImplementedError("a Trainer subclass with a val_set must implement validation_step")

    def validation_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        """Default: mean of every numeric key over batches, weighted by the batch size ``n`` when
        ``validation_step`` returns one (then the last short batch, or how DDP ranks split the items, does not
        change it)."""
        n = [float(o.get("n", 1)) for o in outputs]
        keys = [k for k in (outputs[0] if outputs else {}) if k != "n"]
        return {f"val_{k}": sum(float(o[k]) * w for o, w in zip(outputs, n, strict=True)) / max(sum(n), 1.0)
                for k in keys}

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (after ``model.train()``), e.g. for curricula."""

    def on_optimizer_step(self) -> None:
        """Called after every optimiser step (once per ``accum_steps`` micro-batches, before a checkpoint is
        written), e.g. for a moving-average target network."""

    def on_best(self, metrics: dict[str, float]) -> None:
        """Called on rank 0 when the monitored metric improves (after :attr:`best_state` is updated)."""

    def validates(self, epoch: int) -> bool:
        """Whether ``epoch`` may end with a validation pass; False skips it (e.g. a curriculum phase whose
        validation loss could not pick a checkpoint) without counting towards early stopping."""
        return True

    def param_groups(self) -> list[dict[str, Any]]:
        """Default: weight decay on matrices, none on biases and norm/scale vectors."""
        decay, no_decay = [], []
        exempt = no_decay_names(self.model)
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if decays(name, p, exempt) else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def to_device(self, batch: Any) -> Any:
        if isinstance(batch, Tensor):
            if self.cfg.channels_last and batch.ndim == 5:
                return batch.to(self.device, non_blocking=True, memory_format=torch.channels_last_3d)
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, list | tuple):
            return type(batch)(self.to_device(v) for v in batch) if not hasattr(batch, "_fields") else \
                type(batch)(*(self.to_device(v) for v in batch))
        return batch

    # ------------------------------------------------------------------------------------- helpers
    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.safetensors"

    def load_best(self) -> bool:
        """Load the best validation weights into the model (the last epoch is rarely the best); False if none."""
        if self.best_state is None:
            return False
        self.model.load_state_dict(self.best_state)
        return True

    def _keep_best(self, metric: float) -> None:
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.rank == 0 and self.cfg.resumable:  # on disk only for a resumed run to end with them
            save_checkpoint(self.best_path, {"model": self.best_state, "metric": metric, "step": self.global_step})

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _epoch_batches(self, dataset: Dataset, epoch: int, shuffle: bool) -> list[list[int]]:
        """Index batches of one epoch: a function of (seed, epoch, rank) only, so resume can skip ahead."""
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                     seed=self.cfg.seed, drop_last=False)
        sampler.set_epoch(epoch)
        order = list(sampler)
        bs = self.cfg.batch_size
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    def _loader(self, dataset: Dataset, batches: list[list[int]], epoch: int) -> DataLoader:
        # An explicit generator keeps the DataLoader from drawing on the global RNG (exact resume).
        gen = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        if getattr(dataset, "random_items", True):  # a dataset whose items draw no random numbers says so
            dataset = _SeededSamples(dataset, self.cfg.seed * 100003 + epoch)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                          num_workers=self.cfg.num_workers, generator=gen,
                          pin_memory=self.device.type == "cuda")

    def _better(self, value: float, best: float) -> bool:
        return value < best if self.cfg.monitor_mode == "min" else value > best

    def _log(self, row: dict[str, float]) -> None:
        """Append a row to the history; rank 0 rewrites metrics.csv atomically and writes TensorBoard."""
        self.history.append(row)
        if self.rank != 0:
            return
        keys: list[str] = []
        for r in self.history:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        for k, v in row.items():
            if k not in ("step", "epoch"):
                self._writer.add_scalar(k, v, int(row["step"]))
        self._writer.flush()

    def _sync_grads(self) -> None:
        """Average gradients over ranks in one flat all-reduce (DistributedDataParallel's reduction).

        Done here rather than by wrapping the model so family hooks keep calling ``self.model`` and its
        attributes, and state-dict keys stay free of ``module.``. A parameter without a gradient on this
        rank (an expert no local item was routed to) contributes zeros: every rank must reduce the same
        tensors, or the collective would hang.
        """
        if self.world_size == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        used = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [used])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        used_anywhere = (flat[-len(params):] > 0).tolist()
        flat = flat[:-len(params)] / self.world_size
        offset = 0
        for p, u in zip(params, used_anywhere, strict=True):
            n = p.numel()
            # a parameter no rank touched keeps grad None, so AdamW skips it as in a 1-process run
            p.grad = flat[offset:offset + n].view_as(p) if u else None  # views into one buffer, like DDP's
            offset += n

    def _reduce_logs(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Per-key mean over the micro-batches (of all ranks) that logged the key; keys matched by name."""
        keys = set(sums)
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, sorted(keys))
            keys = set().union(*gathered)
        order = sorted(keys)
        t = torch.tensor([[sums.get(k, 0.0), float(counts.get(k, 0))] for k in order], dtype=torch.float64)
        if self.world_size > 1:
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return {f"train_{k}": s / c for k, (s, c) in zip(order, t.tolist(), strict=True) if c > 0}

    def _broadcast(self, tensors: list[Tensor]) -> None:
        """Copy rank 0's values: parameters at the start, buffers (BatchNorm stats) after every step, like DDP.
        One collective per dtype and device, not per tensor (a DenseFormer has 100+ buffers)."""
        if self.world_size == 1:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t.data)
        for group in groups.values():
            flat = _flatten_dense_tensors(group)
            torch.distributed.broadcast(flat, src=0)
            for t, value in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
                t.copy_(value)

    def runtime_info(self) -> dict[str, Any]:
        """What actually ran, next to the config that was asked for: ``precision: bf16`` runs as fp32 on a
        CPU without native bf16, and speed and bf16 results depend on the CPU's ISA and the thread count."""
        info: dict[str, Any] = {
            "device": str(self.device), "precision_requested": self.cfg.precision, "precision": self.precision,
            "channels_last": self.cfg.channels_last, "world_size": self.world_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
        if self.device.type == "cpu":
            info["cpu"] = cpu_features()
        else:
            info["cuda_device"] = torch.cuda.get_device_name(self.device)
        return info

    # ------------------------------------------------------------------------------------- fit
    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self._broadcast(list(self.model.parameters()) + list(self.model.buffers()))
        if self.world_size > 1:  # after the broadcast: each rank its own dropout, MAE masks, router noise
            seed_everything(cfg.seed + 1_000_003 * self.rank)
        if self.rank == 0:
            saved = self.run_dir / "config.yaml"
            # a family saves its full config first and keeps it; a TrainConfig left by an earlier run of a
            # per-expert or per-fold folder is replaced (it described the first run forever)
            if not saved.exists() or (not resume and _holds_train_config(saved)):
                save_config(cfg, self.run_dir)
            atomic_write_json(self.run_dir / "runtime.json", self.runtime_info())
        steps_per_epoch = math.ceil(len(self._epoch_batches(self.train_set, 0, False)) / cfg.accum_steps)
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps > 0:
            total = min(total, cfg.max_steps)
        optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = WarmupCosine(optimizer, total, cfg.warmup_frac, cfg.min_lr_ratio)
        sign = 1.0 if cfg.monitor_mode == "min" else -1.0
        best, best_step, bad, start_epoch, skip = sign * math.inf, -1, 0, 0, 0
        resumed_logs: dict[str, Any] | None = None
        if resume and not self.ckpt_path.is_file() and self.rank == 0:
            print(f"neuromoe: no checkpoint at {self.ckpt_path}: --resume starts from the beginning", file=sys.stderr)
        if resume and self.ckpt_path.is_file():
            state = load_checkpoint(self.ckpt_path)
            try:
                self.model.load_state_dict(state["model"])
            except RuntimeError:
                raise InputError("the checkpoint was made with another architecture than this run's config",
                                 path=self.ckpt_path, fix="resume with the run's own config, or drop --resume "
                                 "and use a new --out") from None
            pos = state["position"]
            rng = state["rng"]  # one state per rank under DDP (a list), else one
            # the schedule length and the batch position count per-rank steps, so the world size must not change;
            # checkpoints before 2026-12-06 carry no world_size: per-rank RNG states (a list) still tell it; a
            # single state may be one process or older DDP, so it is not checked
            made_with = pos.get("world_size", len(rng) if isinstance(rng, list) else None)
            if made_with is not None and made_with != self.world_size:
                raise InputError(f"the checkpoint was made with {made_with} process(es), this run has "
                                 f"{self.world_size}: resuming would change the learning-rate schedule and skip "
                                 "or repeat items", path=self.ckpt_path,
                                 fix=f"resume with torchrun --nproc_per_node={made_with}"
                                 if made_with > 1 else "resume without torchrun (one process)")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.global_step, start_epoch, skip = int(pos["global_step"]), int(pos["epoch"]), int(pos["batch"])
            best, best_step, bad = float(pos["best"]), int(pos["best_step"]), int(pos["bad"])
            self.history = list(state["history"])
            logs = pos.get("logs")  # the partial log window of a mid-epoch checkpoint (per rank under DDP)
            resumed_logs = (logs[min(self.rank, len(logs) - 1)] if isinstance(logs, list) else logs) or None
            set_rng_state(rng[min(self.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
            if self.best_path.is_file():
                self.best_state = load_checkpoint(self.best_path)["model"]
        elif self.rank == 0:
            # a fresh run never ends with an earlier run's weights, nor lets a later --resume continue that run
            self.best_path.unlink(missing_ok=True)
            self.ckpt_path.unlink(missing_ok=True)

        def checkpoint(epoch: int, batch: int, logs: dict[str, Any] | None = None) -> None:
            if not cfg.resumable:
                return
            rng: Any = rng_state()
            if self.world_size > 1:  # every rank draws its own stream: keep each one for an exact resume
                rng, own_logs = [None] * self.world_size, logs
                torch.distributed.all_gather_object(rng, rng_state())
                logs = [None] * self.world_size
                torch.distributed.all_gather_object(logs, own_logs)
            if self.rank == 0:
                save_checkpoint(self.ckpt_path, {
                    "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng, "history": self.history,
                    "position": {"epoch": epoch, "batch": batch, "global_step": self.global_step, "best": best,
                                 "best_step": best_step, "bad": bad, "logs": logs,
                                 "world_size": self.world_size}})
            dist_utils.barrier()

        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.global_step, desc="train", dynamic_ncols=True)
        # A run killed after its last optimiser step but before that epoch's validation and final
        # checkpoint resumes at (epoch, batch=end): it must still validate, not stop at once.
        stop = skip == 0 and (self.global_step >= total or bool(cfg.patience and bad >= cfg.patience))
        for epoch in range(start_epoch, cfg.epochs):
            if stop:
                break
            self.epoch = epoch
            self.model.train()
            self.on_epoch_start(epoch)
            batches = self._epoch_batches(self.train_set, epoch, True)
            first = skip if epoch == start_epoch else 0
            if self.global_step >= total:  # resumed after the last step, before its validation: validate only
                first = len(batches)
            loader = self._loader(self.train_set, batches[first:], epoch)
            optimizer.zero_grad(set_to_none=True)
            running: dict[str, float] = {}
            seen: dict[str, int] = {}
            n_micro = 0
            if epoch == start_epoch and first and resumed_logs:  # the log row then equals an uninterrupted run's
                running, seen = dict(resumed_logs["running"]), dict(resumed_logs["seen"])
                n_micro = int(resumed_logs["n_micro"])
            for i, batch in enumerate(loader, start=first):
                # the last group of an epoch may be shorter than accum_steps; scale by its real size
                group_start = (i // cfg.accum_steps) * cfg.accum_steps
                group_size = min(cfg.accum_steps, len(batches) - group_start)
                with self._autocast():
                    loss, logs = self.training_step(self.to_device(batch))
                if not torch.isfinite(loss.detach()):
                    raise TrainingDiverged(f"training diverged: non-finite loss {float(loss)} at step "
                                           f"{self.global_step}", path=self.run_dir,
                                           fix="lower lr, keep grad_clip > 0, or use precision fp32")
                (loss.float() / group_size).backward()
                for k, v in {"loss": float(loss.detach()), **logs}.items():
                    running[k] = running.get(k, 0.0) + float(v)
                    seen[k] = seen.get(k, 0) + 1
                n_micro += 1
                if i + 1 - group_start < group_size:
                    continue
                self._sync_grads()
                if cfg.grad_clip > 0:
                    running["grad_norm"] = running.get("grad_norm", 0.0) + group_size * float(
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                    seen["grad_norm"] = seen.get("grad_norm", 0) + group_size
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self._broadcast([b for b in self.model.buffers() if b.is_floating_point()])  # BatchNorm stats
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                self.global_step += 1
                self.on_optimizer_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running['loss'] / n_micro:.4g}", lr=f"{lr:.2e}")
                if self.global_step % cfg.log_every == 0 or self.global_step == total:
                    row = {"step": self.global_step, "epoch": epoch, "lr": lr}
                    row.update(self._reduce_logs(running, seen))
                    self._log(row)
                    running, seen, n_micro = {}, {}, 0
                if cfg.ckpt_every and self.global_step % cfg.ckpt_every == 0:
                    checkpoint(epoch, i + 1, {"running": running, "seen": seen, "n_micro": n_micro})
                if self.global_step >= total:
                    stop = True
                    break
            stop = stop or self.global_step >= total
            due = (epoch + 1) % cfg.val_every == 0 or stop or epoch + 1 == cfg.epochs
            if self.val_set is not None and due and self.validates(epoch):
                metrics = self.validate()
                if cfg.monitor not in metrics:
                    raise ConfigError(f"train.monitor '{cfg.monitor}' is not a validation metric",
                                      fix=f"set train.monitor to one of {sorted(metrics)}")
                value = metrics[cfg.monitor]
                self._log({"step": self.global_step, "epoch": epoch, **metrics})
                if self._better(value, best):
                    best, best_step, bad = value, self.global_step, 0
                    self._keep_best(value)
                    if self.rank == 0:
                        self.on_best(metrics)
                else:
                    bad += 1
                    if cfg.patience and bad >= cfg.patience:
                        stop = True
            checkpoint(epoch + 1, 0)
        if bar is not None:
            bar.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.val_set is None:
            best = math.nan
        if cfg.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
        return TrainResult(best_metric=best, best_step=best_step, history=self.history, run_dir=self.run_dir)

    def fit_best(self, resume: bool = False) -> TrainResult:
        """:meth:`fit`, then load the best validation weights of the whole run (also across a resume)."""
        result = self.fit(resume=resume)
        self.load_best()
        return result

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Run validation_step over this rank's share of val_set; metrics averaged over ranks."""
        assert self.val_set is not None
        self.model.eval()
        # every item exactly once (DistributedSampler would pad with duplicates), and validation_end sees
        # all ranks' outputs, so non-decomposable metrics (Dice, AUC, max) are computed on the whole set
        order = list(range(self.rank, len(self.val_set), self.world_size))  # type: ignore[arg-type]
        bs = self.cfg.batch_size
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        outputs = []
        for batch in self._loader(self.val_set, batches, 0):
            with self._autocast():
                outputs.append(self.validation_step(self.to_device(batch)))
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        metrics = {k: float(v) for k, v in self.validation_end(outputs).items()}
        self.model.train()
        return metrics
