"""DenseFormer-MoE pipelines: ``pretrain`` (MAE), ``train`` (multi-task fine-tuning), ``evaluate``,
``predict`` and ``demo``.

Conventions shared by the steps:

* Data is a cohort folder (its ``manifests/structural.csv`` is used), a manifest ``.csv``/``.tsv`` or a
  BIDS folder. The ``split`` column is used when present, else a deterministic stratified split by seed.
  MAE pretraining uses the train and val subjects only (never test), labelled or not.
* Regression targets are standardised with the training mean/std; the model directory stores them
  with the task list, the preprocessing spec, the brain-age bias correction and the conformal
  calibrators, so ``predict`` replays everything for new scans.
* Brain-age bias correction (de Lange & Cole 2020): on *validation* subjects fit
  ``pred = a·age + b``; corrected brain age = ``(pred − b) / a``; gap = corrected − chronological age.
* Conformal intervals (age, on the corrected prediction) and prediction sets (classification tasks) are
  calibrated on validation only; ``evaluate`` reports their coverage on test.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from neuromoe.config import check_values, load_family_config, save_config, to_dict
from neuromoe.data.splits import assign_splits
from neuromoe.data.structural import (
    MISSING_CLASS,
    StructuralDataset,
    TaskSpec,
    encode_labels,
    load_t1,
)
from neuromoe.engine import TrainConfig, Trainer, finish_training, monitor_problems
from neuromoe.engine.precision import resolve_precision
from neuromoe.engine.utils import pipeline_entry, resolve_device
from neuromoe.errors import ConfigError, InputError, ModelFormatError
from neuromoe.eval.conformal import (
    ConformalClassifier,
    ConformalRegressor,
    coverage_shortfall_p,
    interval_coverage,
    mean_set_size,
    one_per_group,
    set_coverage,
)
from neuromoe.eval.metrics import balanced_accuracy, binary_auc, bootstrap_ci, macro_f1, r_squared
from neuromoe.io.atomic import atomic_path, atomic_write_json, check_outputs, remove_stale, removes_on_error
from neuromoe.io.table import (
    case_fingerprints,
    failures_path,
    file_stem,
    refuse_fitted,
    scan_fingerprints,
    scan_ids,
    write_failures,
)
from neuromoe.models.denseformer import Attention, DenseFormerMAE, DenseFormerMoE, layerwise_lr_groups

FAMILY = "denseformer"
# a regression prediction this far from the training mean (in training SDs) is flagged in predict's output: no
# brain in the training range gives it, an input that is not one (noise, a mask, a wrong header) does
OUTLIER_SD = 4.0
AGE_TASK = "age"

__all__ = [
    "DenseFormerConfig",
    "EvalSection",
    "FinetuneSection",
    "ModelSection",
    "demo",
    "evaluate",
    "predict",
    "pretrain",
    "train",
]


def _default_tasks() -> list[TaskSpec]:
    return [
        TaskSpec("age", "regression", "age"),
        TaskSpec("sex", "classification", "sex", ["F", "M"]),
        TaskSpec("dx_ad", "classification", "dx_ad", ["CN", "MCI", "AD"]),
        TaskSpec("dx_pd", "classification", "dx_pd", ["HC", "PD"]),
    ]


@dataclass
class ModelSection:
    """Architecture: a registered preset plus overrides; head variant for the ablations."""

    preset: Literal["tiny", "demo", "base"] = "demo"
    backbone: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, Any] = field(default_factory=dict)
    head: Literal["moe", "shared", "separate"] = "moe"
    num_experts: int = 8
    top_k: int = 2
    task_embed_dim: int = 32
    balance_coef: float = 0.01
    z_coef: float = 0.001
    head_drop: float = 0.1
    # "backbone": the head reads the backbone's pooled feature (mean of the tokens); "task_attention": one
    # learned query per task attends over the tokens (TaskAttentionPool), starting as the mean.
    head_pool: Literal["backbone", "task_attention"] = "backbone"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def problems(self) -> list[tuple[str, str, str]]:
        """Values of the right type the model cannot use, refused before pretraining starts."""
        out = []
        if self.head == "moe" and self.num_experts < 1:  # the other heads have no experts
            out.append(("num_experts", "must be >= 1", "8"))
        elif self.head == "moe" and not 1 <= self.top_k <= self.num_experts:
            out.append(("top_k", f"{self.top_k} is not in [1, num_experts={self.num_experts}]", "2"))
        if self.task_embed_dim < 1:
            out.append(("task_embed_dim", "must be >= 1", "32"))
        for name in ("balance_coef", "z_coef"):  # a negative auxiliary loss weight is maximised
            if not 0 <= getattr(self, name) < math.inf:
                out.append((name, f"{getattr(self, name)} is not a number >= 0", "0.01"))
        for name, example in (("head_drop", "0.1"), ("mask_ratio", "0.75")):  # 1 drops / masks everything
            if not 0 <= getattr(self, name) < 1:
                out.append((name, f"{getattr(self, name)} is not in [0, 1)", example))
        return out


@dataclass
class FinetuneSection:
    tasks: list[TaskSpec] = field(default_factory=_default_tasks)
    pretrained: str | None = None
    layer_decay: float = 0.75
    freeze: bool = False
    label_fraction: float = 1.0
    augment: bool = True  # small affine + intensity scale/shift + noise
    # Scanner-style contrast augmentation (gamma, bias field, blur; docs/experiments.md "Site shifts"):
    # on its own (augment: false) it adds no spatial transform.
    contrast_augment: bool = False
    # Gaussian noise on the head's voxels, sd drawn from [0, noise_augment] z units per item (half of them)
    noise_augment: float = 0.0
    # How the tasks' gradients meet at the shared pooled feature: "sum" (plain weighted sum of the task
    # losses), "normalize" (each task's gradient scaled to the mean norm) or "pcgrad" (conflicting
    # components projected out, Yu et al. 2020). See balance_task_gradients.
    task_balance: Literal["sum", "normalize", "pcgrad"] = "sum"
    # Curriculum: train the regression tasks (brain age) alone for this many epochs before the
    # classification losses join. An easy classification task (sex from head size) otherwise reshapes
    # the shared features before age has left its mean-prediction plateau (docs/experiments.md).
    regression_only_epochs: int = 0
    # lr multiplier of the multi-task head (new, randomly initialised) over the backbone's lr. Classification
    # heads that join after the regression-only epochs start when the schedule has already decayed the lr.
    head_lr_scale: float = 1.0
    # After fine-tuning, refit each task's output layer in closed form on the frozen task representations
    # of the training subjects (L2-logistic / ridge, strength chosen on validation) and keep it where it
    # lowers the validation loss. Why: a few hundred SGD steps leave the classification layers far from
    # their optimum (sex train loss at chance while a logistic fit on the same features reaches AUC 0.8).
    refit_heads: bool = False

    def problems(self) -> list[tuple[str, str, str]]:
        """Values of the right type that fine-tuning cannot use (named under ``finetune.`` by the loader)."""
        out = []
        if not 0 < self.label_fraction <= 1:  # 0 or negative trained on one subject per cohort; NaN crashed
            out.append(("label_fraction", f"{self.label_fraction} is not in (0, 1]", "0.1"))
        if not 0 < self.layer_decay <= 1:
            out.append(("layer_decay", f"{self.layer_decay} is not in (0, 1]", "0.75"))
        if self.regression_only_epochs < 0:
            out.append(("regression_only_epochs", "must be >= 0", "0"))
        if not self.head_lr_scale > 0:
            out.append(("head_lr_scale", f"{self.head_lr_scale} is not a positive number", "1"))
        return out


@dataclass
class EvalSection:
    alpha: float = 0.1
    set_method: Literal["aps", "lac"] = "aps"
    n_bootstrap: int = 1000

    def problems(self) -> list[tuple[str, str, str]]:
        """Values of the right type calibration and the confidence intervals cannot use."""
        out = []
        if not 0 < self.alpha < 1:  # the conformal miscoverage: 1 - alpha is the nominal coverage
            out.append(("alpha", f"{self.alpha} is not in (0, 1)", "0.1"))
        if self.n_bootstrap < 0:
            out.append(("n_bootstrap", "must be >= 0 (0 = no confidence intervals)", "1000"))
        return out


@dataclass
class DenseFormerConfig:
    model: ModelSection = field(default_factory=ModelSection)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    eval: EvalSection = field(default_factory=EvalSection)
    cache_dir: str | None = None
    # Hold the preprocessed volumes in memory (float16), or read each back from the cache when it is fetched
    # (a cohort that does not fit: UK Biobank at 1 mm); null = in memory when they fit in a quarter of the
    # memory available (data.preprocess.memory_budget).
    in_memory: bool | None = None
    seed: int = 0

    def problems(self) -> list[tuple[str, str, str]]:
        """The monitored metrics: MAE validation reports its loss, fine-tuning the summed and per-task losses."""
        losses = {"val_loss": "min", **{f"val_loss_{t.name}": "min" for t in self.finetune.tasks}}
        return monitor_problems(self, {"pretrain": {"val_loss": "min"}, "train": losses})


def load_denseformer_config(preset: str | Path | None = "demo", overrides: list[str] | None = None,
                            seed: int | None = None, device: str | None = None) -> DenseFormerConfig:
    """Preset ← ``--set`` overrides ← ``--seed``/``--device`` (which also reach both train configs); the
    ``preprocessing`` keys are checked here too, so a typo is refused by every verb (``predict`` replays the model's
    own preprocessing and took ``--set preprocessing.spacng=4`` silently)."""
    cfg = load_family_config(DenseFormerConfig, FAMILY, preset, overrides, seed, device)
    _spec(cfg)
    return cfg


# --------------------------------------------------------------------------------------------- data


def _resolve_table(data: str | Path) -> tuple[pd.DataFrame, str]:
    from neuromoe.io.table import load_role_table

    return load_role_table(data, "structural", "t1", "T1 images")


def _require_labels(table: pd.DataFrame, source: str) -> None:
    """Training and evaluation need labels; a BIDS folder keeps them in participants.tsv."""
    if table.attrs.get("labels_missing"):
        raise InputError("BIDS folder has no participants.tsv, so no subject has labels",
                         path=Path(source) / "participants.tsv",
                         fix="add participants.tsv (participant_id, age, sex, dx_ad, ...) to the BIDS root")


def _spec(cfg: DenseFormerConfig) -> Any:
    from neuromoe.data.preprocess import PreprocSpec

    return PreprocSpec.from_overrides(cfg.preprocessing)


def _cache(cfg: DenseFormerConfig) -> Any:
    from neuromoe.data.preprocess import PreprocCache, default_cache_root

    return PreprocCache(default_cache_root(cfg.cache_dir))


def _backbone_kwargs(m: ModelSection) -> dict[str, Any]:
    from neuromoe.models.denseformer import PRESETS

    return {**PRESETS[m.preset], **m.backbone}


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "labels": {k: torch.stack([b["labels"][k] for b in batch]) for k in batch[0]["labels"]},
        "index": torch.tensor([b["index"] for b in batch]),
    }


def _label_subsample(table: pd.DataFrame, train_mask: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep ``fraction`` of the training subjects (stratified by cohort; all sessions of a kept subject) — the
    label-scarce regime. One row per subject: the same rows as drawing rows."""
    if fraction >= 1.0:
        return train_mask
    rng = np.random.default_rng(seed + 1)
    rows = table.reset_index(drop=True)
    subject = rows["subject"].astype(str) if "subject" in rows.columns else pd.Series(rows.index.astype(str))
    strata = rows["cohort"].astype(str) if "cohort" in rows.columns else pd.Series("all", index=rows.index)
    first = pd.DataFrame({"subject": subject, "stratum": strata})[train_mask].drop_duplicates("subject")
    kept: list[str] = []
    for _, subs in first.groupby("stratum")["subject"]:
        subs = subs.to_numpy()[rng.permutation(len(subs))]
        kept += list(subs[: max(1, math.ceil(len(subs) * fraction))])
    return train_mask & subject.isin(kept).to_numpy()


# ------------------------------------------------------------------------------------------ trainers


class MAETrainer(Trainer):
    """MAE pretraining: loss from the model; validation = mean masked-patch MSE."""

    def training_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        loss, _, _ = self.model(batch["image"])
        return loss, {"mae_loss": float(loss.detach())}

    def validation_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        # one mask per item, seeded by the item (it was by the batch's first item): the loss does not depend on
        # how items are grouped into batches or DDP ranks
        n = self.model.encoder.num_patches
        noise = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(1234 + int(i)))
                             for i in batch["index"]])
        loss, _, _ = self.model(batch["image"], noise=noise.to(batch["image"].device))
        return {"loss": float(loss), "n": batch["image"].shape[0]}  # the Trainer's default: mean weighted by n


def task_losses(out: Any, labels: dict[str, Tensor], tasks: Sequence[TaskSpec],
                target_stats: dict[str, tuple[float, float]]) -> dict[str, Tensor]:
    """Weight × loss per task on the subjects that have that label; tasks without labels in the batch are absent."""
    losses = {}
    for t in tasks:
        pred, y = out.outputs[t.name].float(), labels[t.name]
        if t.type == "classification":
            have = y != MISSING_CLASS
            if not have.any():
                continue
            loss = F.cross_entropy(pred[have], y[have].long())
        else:
            have = torch.isfinite(y)
            if not have.any():
                continue
            mean, std = target_stats[t.name]
            loss = F.smooth_l1_loss(pred[have, 0], ((y[have].float() - mean) / std))
        losses[t.name] = t.weight * loss
    return losses


def multitask_loss(out: Any, labels: dict[str, Tensor], tasks: Sequence[TaskSpec],
                   target_stats: dict[str, tuple[float, float]]) -> tuple[Tensor, dict[str, float]]:
    """Sum over tasks of weight × loss on the subjects that have that label (missing ones masked out)."""
    losses = task_losses(out, labels, tasks, target_stats)
    return out.aux_loss.float() + sum(losses.values()), _loss_logs(out.aux_loss, losses)


def _loss_logs(aux: Tensor, losses: dict[str, Tensor]) -> dict[str, float]:
    return {"aux": float(aux.detach()), **{f"loss_{k}": float(v.detach()) for k, v in losses.items()}}


def balance_task_gradients(grads: Sequence[Tensor], method: Literal["sum", "normalize", "pcgrad"]) -> Tensor:
    """Combine per-task gradients of one shared tensor into the gradient the shared backbone receives.

    ``sum``: plain sum (what backward of the summed loss gives). ``normalize``: every task's gradient
    rescaled to the mean of their norms before summing, so a task with large gradients (an easily
    separable classification task) cannot drown a task whose gradient is small (brain age on its
    plateau); the total scale is kept. ``pcgrad``: for each task, the component that conflicts
    (negative dot product) with another task's gradient is projected out before summing (PCGrad,
    Yu et al. 2020; fixed task order, so it is deterministic).
    """
    if method == "sum" or len(grads) < 2:
        return torch.stack(list(grads)).sum(0)
    flat = [g.reshape(-1).float() for g in grads]
    if method == "normalize":
        norms = torch.stack([f.norm() for f in flat])
        scale = norms.mean() / norms.clamp_min(1e-12)
        out = sum(f * s for f, s in zip(flat, scale))
    elif method == "pcgrad":
        out = torch.zeros_like(flat[0])
        for i, f in enumerate(flat):
            g = f.clone()
            for j, other in enumerate(flat):
                dot = torch.dot(g, other)
                if j != i and dot < 0:
                    g = g - dot / other.pow(2).sum().clamp_min(1e-12) * other
            out = out + g
    else:
        raise ValueError(f"unknown task_balance '{method}' (sum, normalize, pcgrad)")
    return out.reshape(grads[0].shape).to(grads[0].dtype)


class FinetuneTrainer(Trainer):
    """Multi-task fine-tuning with masked per-task losses, layer-wise lr decay and an optional frozen backbone."""

    def __init__(self, *args: Any, tasks: Sequence[TaskSpec], target_stats: dict[str, tuple[float, float]],
                 layer_decay: float, freeze: bool, task_balance: str = "sum", regression_only_epochs: int = 0,
                 head_lr_scale: float = 1.0, **kwargs: Any):
        self.tasks, self.target_stats = list(tasks), target_stats
        self.layer_decay, self.freeze, self.task_balance = layer_decay, freeze, task_balance
        self.regression_only_epochs, self.head_lr_scale = regression_only_epochs, head_lr_scale
        super().__init__(*args, **kwargs)

    def param_groups(self) -> list[dict[str, Any]]:
        return layerwise_lr_groups(self.model, self.cfg.lr, self.cfg.weight_decay, self.layer_decay,
                                   self.head_lr_scale)

    def on_epoch_start(self, epoch: int) -> None:
        if self.freeze:  # linear probe: BatchNorm statistics of the frozen stem stay as pretrained
            self.model.backbone.eval()

    def training_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        if self.epoch < self.regression_only_epochs:  # classification labels hidden = masked out
            hidden = {t.name for t in self.tasks if t.type == "classification"}
            batch = {**batch, "labels": {k: torch.full_like(v, MISSING_CLASS) if k in hidden else v
                                         for k, v in batch["labels"].items()}}
        if self.task_balance == "sum" or self.freeze:
            out = self.model(batch["image"])
            return multitask_loss(out, batch["labels"], self.tasks, self.target_stats)
        # The head runs on a detached copy of the pooled feature; each task's gradient with respect to
        # it is taken separately (cheap: only the head is differentiated), balanced, and sent into the
        # backbone through a surrogate term whose value is zero.
        pooled = self.model.pool_features(self.model.forward_features(batch["image"]))
        shared = pooled.detach().requires_grad_(True)
        out = self.model.head(shared)
        losses = task_losses(out, batch["labels"], self.tasks, self.target_stats)
        aux = out.aux_loss.float()
        grads = [torch.autograd.grad(v, shared, retain_graph=True)[0] for v in losses.values()]
        backbone_grad = balance_task_gradients(grads, self.task_balance) if grads else torch.zeros_like(shared)
        if aux.requires_grad:
            backbone_grad = backbone_grad + torch.autograd.grad(aux, shared, retain_graph=True)[0]
        surrogate = (pooled * backbone_grad.detach()).sum()
        total = aux + sum(losses.values()) + surrogate - surrogate.detach()
        return total, _loss_logs(aux, losses)

    def validation_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Per task: (sum of weighted losses, number of subjects with that label) in this batch."""
        out = self.model(batch["image"])
        losses = task_losses(out, batch["labels"], self.tasks, self.target_stats)
        stats = {}
        for t in self.tasks:
            if t.name in losses:
                y = batch["labels"][t.name]
                n = int((y != MISSING_CLASS).sum() if t.type == "classification" else torch.isfinite(y).sum())
                stats[t.name] = (float(losses[t.name]) * n, n)
        return {"tasks": stats}

    def validates(self, epoch: int) -> bool:
        """No validation while the classification tasks are held back: the kept checkpoint (lowest loss)
        must never be one whose classification heads were not trained."""
        return epoch >= self.regression_only_epochs

    def validation_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        """Sum over tasks of each task's mean loss over the validation subjects labelled for it (the training
        objective without the aux losses), so neither the batch size nor the row order of cohorts that carry
        different labels changes it; also each task's own ``val_loss_<task>``."""
        total: dict[str, list[float]] = {}
        for o in outputs:
            for name, (loss_sum, n) in o["tasks"].items():
                acc = total.setdefault(name, [0.0, 0])
                acc[0], acc[1] = acc[0] + loss_sum, acc[1] + n
        per_task = {f"val_loss_{name}": loss_sum / n for name, (loss_sum, n) in total.items()}
        return {"val_loss": sum(per_task.values()), **per_task}


# ------------------------------------------------------------------------------------------- pretrain


@pipeline_entry()
def pretrain(data: str | Path, out: str | Path, cfg: DenseFormerConfig | None = None, *,
             resume: bool = False) -> Path:
    """MAE pretraining on the train+val scans of ``data`` → ``out/model`` and ``out/reconstruction.png``."""
    from neuromoe.models.registry import create_model, save_model

    cfg = cfg or load_denseformer_config()
    out = Path(out)
    table, source = _resolve_table(data)
    split = assign_splits(table, seed=cfg.seed).to_numpy()
    spec = _spec(cfg)
    full = StructuralDataset(table[split != "test"], [], spec, _img_size(cfg), cache=_cache(cfg), source=source,
                             in_memory=cfg.in_memory)
    pool = split[split != "test"]
    train_set = full.subset(pool == "train", augment=True, seed=cfg.seed)
    val_set = full.subset(pool == "val") if (pool == "val").any() else None
    torch.manual_seed(cfg.seed)
    model = create_model("denseformer_mae", preset=cfg.model.preset, mask_ratio=cfg.model.mask_ratio,
                         norm_pix_loss=cfg.model.norm_pix_loss, **cfg.model.backbone, **cfg.model.decoder)
    save_config(cfg, out, resume=resume)
    trainer = MAETrainer(model, cfg.pretrain, train_set, val_set, run_dir=out, collate_fn=_collate)
    result = trainer.fit_best(resume)
    if not finish_training():
        return out
    extra = {"kind": "mae", "img_size": list(_img_size(cfg)), "best_val_loss": result.best_metric,
             "n_train": len(train_set), "n_val": 0 if val_set is None else len(val_set),
             "mask_ratio": cfg.model.mask_ratio, "norm_pix_loss": cfg.model.norm_pix_loss, "split_seed": cfg.seed,
             "scan_fingerprints": sorted(scan_fingerprints(table["t1"][split != "test"]))}
    save_model(model.cpu(), out / "model", {"family": FAMILY, "preprocessing": spec.to_dict(), "tasks": [],
                                            "extra": extra})
    fig_path = out / "reconstruction.png"
    _reconstruction_figure(model, val_set if val_set is not None else train_set, fig_path, seed=cfg.seed)
    section = _new_section("DenseFormer-MoE: MAE pretraining")
    _add_pretrain(section, extra, fig_path)
    section.save(out)
    return out


def _img_size(cfg: DenseFormerConfig) -> tuple[int, ...]:
    kw = _backbone_kwargs(cfg.model)
    size = kw["img_size"]
    return tuple(size) if isinstance(size, (list, tuple)) else (int(size),) * kw.get("spatial_dims", 3)


def _reconstruction_figure(model: DenseFormerMAE, dataset: StructuralDataset, path: Path, seed: int) -> None:
    """Input, masked input and reconstruction, three orthogonal mid slices, for up to two subjects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    n = min(2, len(dataset))
    imgs = torch.stack([dataset[i]["image"] for i in range(n)])
    noise = torch.rand(n, model.encoder.num_patches, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device  # callers may pass a model still on the GPU
    masked, recon = (t.cpu() for t in model.reconstruct(imgs.to(device), noise=noise.to(device)))
    fig, axes = plt.subplots(3 * n, 3, figsize=(7.5, 7.5 * n))
    for s in range(n):
        rows = (("input", imgs), (f"masked ({100 * model.mask_ratio:.0f} %)", masked), ("reconstruction", recon))
        for r, (name, vol) in enumerate(rows):
            v = vol[s, 0].float().numpy()
            c = [d // 2 for d in v.shape]
            for col, (plane, sl) in enumerate((("sagittal", v[c[0]]), ("coronal", v[:, c[1]]),
                                                ("axial", v[:, :, c[2]]))):
                ax = axes[3 * s + r, col]
                ax.imshow(np.rot90(sl), cmap="gray", vmin=float(imgs[s].min()), vmax=float(imgs[s].max()))
                ax.set_axis_off()
                ax.set_title(f"{name} · {plane}", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _new_section(title: str) -> Any:
    from neuromoe.eval.report import Report

    return Report("DenseFormer-MoE").section(title)


def _add_pretrain(section: Any, extra: dict[str, Any], fig: Path) -> None:
    loss = extra.get("best_val_loss")
    section.add_text(
        f"Masked-autoencoder pretraining of the DenseNet+ViT backbone on {extra['n_train']} training and "
        f"{extra['n_val']} validation scans (no labels used), mask ratio {extra['mask_ratio']:.2f}. "
        f"Best validation masked-patch MSE "
        f"({'per-patch normalised' if extra.get('norm_pix_loss', True) else 'raw'} voxels): "
        f"{'n/a' if loss is None else f'{loss:.4f}'}"
        # the floor on normalised patches (zero mean, unit variance): predicting each patch's mean scores 1
        + (" (predicting each masked patch's mean scores 1.0 on these targets)."
           if extra.get("norm_pix_loss", True) else ".")
    )
    which = "validation" if extra.get("n_val") else "training"
    section.add_figure(fig, f"Input, masked input and reconstruction of {which} scans (three orthogonal slices).")


# ---------------------------------------------------------------------------------------------- train


def _check_pretrain_leak(meta: dict[str, Any], test_scans: pd.Series, source: str, seed: int) -> None:
    """Refuse a fine-tune whose test scans were MAE-pretraining inputs (another seed's split, or another split
    column): its test metrics would be optimistic. Models pretrained before 2026-12-03 carry no fingerprints."""
    seen = set(meta.get("extra", {}).get("scan_fingerprints", []))
    leaked = sum(bool(seen & scan_fingerprints([p])) for p in test_scans)
    if leaked:
        pseed = meta["extra"].get("split_seed")
        raise InputError(f"{leaked} of the {len(test_scans)} test scans were used for MAE pretraining "
                         f"(pretrained with split seed {pseed}, fine-tuning with {seed})", path=source,
                         fix=f"fine-tune with --seed {pseed}, or give both steps the same 'split' column")


def _load_pretrained(model: DenseFormerMoE, model_dir: str | Path) -> dict[str, Any]:
    """Copy the MAE encoder into ``model``'s backbone; return the pretrained model's config."""
    from neuromoe.models.registry import load_model

    mae, meta = load_model(model_dir)
    if not isinstance(mae, DenseFormerMAE):
        raise ModelFormatError("not a DenseFormer MAE model directory", path=model_dir,
                               fix="pass the 'model' folder written by 'neuromoe pretrain --family denseformer'")
    # the number of attention heads changes no tensor shape: a strict load alone would take an encoder
    # pretrained with other heads and split its attention weights differently
    heads = [[m.num_heads for m in net.modules() if isinstance(m, Attention)] for net in (mae.encoder, model.backbone)]
    try:
        if heads[0] != heads[1]:
            raise RuntimeError(f"attention heads {heads[0]} vs {heads[1]}")
        model.backbone.load_state_dict(mae.encoder.state_dict(), strict=True)
    except RuntimeError:
        raise ModelFormatError("pretrained encoder does not match the fine-tuning architecture", path=model_dir,
                               fix="use the same --config preset (and model.backbone overrides) as pretraining") from None
    return meta


def _learnable_tasks(table: pd.DataFrame, tasks: Sequence[TaskSpec], train_mask: np.ndarray,
                     source: str) -> list[TaskSpec]:
    """The tasks some training subject has a label for. A preset's task whose label this cohort does not have
    at all (dx_ad on a UK Biobank manifest) is dropped with a notice: an untrained head would still answer."""
    labels = encode_labels(table, tasks, source)
    kept = []
    for t in tasks:
        y = labels[t.name][train_mask]
        known = y[y != MISSING_CLASS] if t.type == "classification" else y[np.isfinite(y)]
        if known.size == 0:
            near = [c for c in table.columns if c != t.label_column and c.strip().lower() == t.label_column.lower()]
            hint = f" (the table has '{near[0]}': column names are case-sensitive)" if near else ""
            print(f"neuromoe: task '{t.name}' dropped: no training subject has a '{t.label_column}' label{hint}",
                  file=sys.stderr)
            continue
        if t.type == "classification" and np.unique(known).size < 2:
            print(f"neuromoe: warning: task '{t.name}': every training label is '{t.classes[int(known[0])]}', "
                  "so its predictions carry no information", file=sys.stderr)
        kept.append(t)
    if not kept:
        raise InputError(f"no training subject has a label of any task ({', '.join(t.label_column for t in tasks)})",
                         path=source, fix="add label columns to the manifest (or participants.tsv)")
    return kept


@pipeline_entry()
def train(data: str | Path, out: str | Path, cfg: DenseFormerConfig | None = None, *,
          resume: bool = False) -> Path:
    """Multi-task fine-tuning → ``out/model`` (with calibration fitted on validation) and a report section."""
    from neuromoe.models.registry import create_model, save_model, weights_digest

    cfg = cfg or load_denseformer_config()
    out = Path(out)
    ft = cfg.finetune
    check_values(ft, "finetune.")  # CLI flags (--label-fraction) are set after the loader checked
    if ft.regression_only_epochs >= cfg.train.epochs and any(t.type == "classification" for t in ft.tasks):
        raise ConfigError(f"finetune.regression_only_epochs ({ft.regression_only_epochs}) leaves no epoch for the "
                          f"classification tasks (train.epochs = {cfg.train.epochs})",
                          fix="set finetune.regression_only_epochs below train.epochs")
    table, source = _resolve_table(data)
    _require_labels(table, source)
    split = assign_splits(table, seed=cfg.seed).to_numpy()
    spec = _spec(cfg)
    train_mask = _label_subsample(table, split == "train", ft.label_fraction, cfg.seed)
    if not (split == "val").any():
        raise InputError("no validation subjects", path=source, fix="add 'val' rows to the split column")
    ft = replace(ft, tasks=_learnable_tasks(table, ft.tasks, train_mask, source))
    cfg = replace(cfg, finetune=ft)  # the saved config and model list the tasks actually trained
    dataset = StructuralDataset(table, ft.tasks, spec, _img_size(cfg), cache=_cache(cfg), source=source,
                                in_memory=cfg.in_memory)
    target_stats = {}
    for t in ft.tasks:
        if t.type == "regression":
            y = dataset.labels[t.name][train_mask]
            y = y[np.isfinite(y)]
            if y.size < 2:
                raise InputError(f"task '{t.name}' has fewer than 2 training labels", path=source,
                                 fix=f"check column '{t.label_column}' or drop the task")
            target_stats[t.name] = (float(y.mean()), float(y.std() or 1.0))
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = create_model(
        f"denseformer_{m.preset}", tasks=[t.model_dict() for t in ft.tasks], head=m.head,
        num_experts=m.num_experts, top_k=m.top_k, task_embed_dim=m.task_embed_dim,
        balance_coef=m.balance_coef, z_coef=m.z_coef, head_drop=m.head_drop, head_pool=m.head_pool,
        **m.backbone,
    )
    mae_prints: list[str] = []
    if ft.pretrained:
        mae_meta = _load_pretrained(model, ft.pretrained)
        _check_pretrain_leak(mae_meta, table["t1"][split == "test"], source, cfg.seed)
        mae_prints = mae_meta.get("extra", {}).get("scan_fingerprints", [])
    if ft.freeze:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    save_config(cfg, out, resume=resume)
    train_set = dataset.subset(train_mask, augment=ft.augment, contrast=ft.contrast_augment,
                               noise=ft.noise_augment, seed=cfg.seed)
    trainer = FinetuneTrainer(
        model, cfg.train, train_set, dataset.subset(split == "val"), run_dir=out, collate_fn=_collate,
        tasks=ft.tasks, target_stats=target_stats, layer_decay=ft.layer_decay, freeze=ft.freeze,
        task_balance=ft.task_balance, regression_only_epochs=ft.regression_only_epochs,
        head_lr_scale=ft.head_lr_scale,
    )
    result = trainer.fit_best(resume)
    if not finish_training():
        return out
    model = model.cpu().eval()
    device = _device(cfg.train.device)
    refit = None
    if ft.refit_heads:
        fit_mask = train_mask | (split == "val")
        feats = _task_features(model, dataset.subset(fit_mask), device, cfg.train.precision)
        labels = {k: v[fit_mask] for k, v in dataset.labels.items()}
        refit = _refit_heads(model, feats, labels, train_mask[fit_mask], (split == "val")[fit_mask], ft.tasks,
                             target_stats)
    val_pred = _predict_dataset(model, dataset.subset(split == "val"), ft.tasks, target_stats, device,
                                cfg.train.precision)
    calibration = _calibrate(val_pred, dataset.labels, np.flatnonzero(split == "val"), ft.tasks, cfg.eval,
                             dataset.table["subject"].to_numpy())
    meta = {
        "family": FAMILY, "preprocessing": spec.to_dict(), "tasks": [to_dict(t) for t in ft.tasks],
        "extra": {"kind": "multitask", "img_size": list(_img_size(cfg)), "target_stats": target_stats,
                  "calibration": calibration, "head": m.head,
                  "pretrained": ft.pretrained and weights_digest(ft.pretrained),  # not its path: no machine paths
                  "label_fraction": ft.label_fraction, "n_train": int(train_mask.sum()),
                  "best_val_loss": result.best_metric, "head_refit": refit, "split_seed": cfg.seed,
                  # train + val scans (fitting, checkpoint choice, calibration) and the MAE's inputs: evaluate
                  # refuses to score them as test when its table's split differs from this one
                  "fit_fingerprints": sorted(scan_fingerprints(table["t1"][split != "test"]) | set(mae_prints))},
    }
    save_model(model, out / "model", meta)
    section = _new_section("DenseFormer-MoE: multi-task fine-tuning")
    _add_train(section, cfg, meta["extra"], dataset.labels, train_mask, split == "val")
    section.save(out)
    return out


def _add_train(section: Any, cfg: DenseFormerConfig, extra: dict[str, Any], labels: dict[str, np.ndarray],
               train_mask: np.ndarray, val_mask: np.ndarray) -> None:
    """What was fine-tuned on how many labels per task (the scores are in the evaluate section)."""
    m, ft = cfg.model, cfg.finetune
    head = (f"MoE head ({m.num_experts} experts, top-{m.top_k}, task-conditioned router)" if m.head == "moe"
            else f"'{m.head}' head")
    start = "from the MAE-pretrained backbone" if ft.pretrained else "from scratch"
    loss = extra["best_val_loss"]
    biased = [n for n, c in extra["calibration"].items() if isinstance(c, dict) and c.get("bias")]
    section.add_text(
        f"'{m.preset}' DenseNet+ViT backbone {start}{' (frozen: linear probe)' if ft.freeze else ''} with a {head}; "
        f"{cfg.train.epochs} epochs, layer-wise lr decay {ft.layer_decay}, {100 * ft.label_fraction:g} % of the "
        f"training labels. Best validation loss {'n/a' if loss is None else f'{loss:.4f}'}; conformal calibration "
        "fitted on the validation subjects, and a brain-age bias correction where they show a significant bias ("
        + (", ".join(biased) or "none here") + ")."
    )
    rows = []
    for t in ft.tasks:
        y = labels[t.name]
        have = np.isfinite(y) if t.type == "regression" else y >= 0
        rows.append({"task": t.name, "type": t.type, "column": t.label_column,
                     "classes": ", ".join(t.classes) if t.classes else "",
                     "labelled train": int((have & train_mask).sum()), "labelled val": int((have & val_mask).sum())})
    section.add_table(rows, "Tasks and their labelled subjects (losses are masked per task per subject).")


def _device(name: str) -> torch.device:
    """``auto``/``cpu``/``cuda``; CUDA asked for on a machine without it is one clear error (exit 2)."""
    return resolve_device(name)


def _autocast(device: torch.device, precision: str) -> Any:
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _image_batches(dataset: StructuralDataset, batch_size: int = 8) -> Iterator[Tensor]:
    for s in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i]["image"] for i in range(s, min(s + batch_size, len(dataset)))])


@torch.no_grad()
def _predict_batches(model: DenseFormerMoE, batches: Iterator[Tensor], tasks: Sequence[TaskSpec],
                     target_stats: dict[str, Any], device: torch.device, precision: str) -> dict[str, np.ndarray]:
    """Probabilities / de-standardised values and top-k experts per task, stacked over batches."""
    model.to(device).eval()
    out: dict[str, list[np.ndarray]] = {}
    for x in batches:
        with _autocast(device, precision):
            res = model(x.to(device))
        for ti, t in enumerate(tasks):
            y = res.outputs[t.name].float().cpu()
            if t.type == "classification":
                val = y.softmax(-1).numpy()
            else:
                mean, std = target_stats[t.name]
                val = y[:, 0].numpy() * std + mean
            out.setdefault(t.name, []).append(val)
            if res.topk_idx is not None:
                out.setdefault(f"{t.name}/experts", []).append(res.topk_idx[ti].cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


@torch.no_grad()
def _task_features(model: DenseFormerMoE, dataset: StructuralDataset, device: torch.device,
                   precision: str) -> dict[str, np.ndarray]:
    """Every task's output-layer input for every subject of ``dataset`` (eval mode), float64."""
    model.to(device).eval()
    out: dict[str, list[np.ndarray]] = {}
    for x in _image_batches(dataset):
        with _autocast(device, precision):
            feats = model.head.task_features(model.pool_features(model.forward_features(x.to(device))))[0]
        for name, h in feats.items():
            out.setdefault(name, []).append(h.double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


REFIT_STRENGTHS = np.logspace(-3, 3, 13)  # inverse L2 strength: logistic C, ridge alpha = 1 / C


def _layer_loss(t: TaskSpec, W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray,
                target_stats: dict[str, tuple[float, float]]) -> float:
    """Loss of an output layer ``X @ W.T + b``: multinomial log-loss, or MAE in label units."""
    from sklearn.metrics import log_loss, mean_absolute_error

    out = X @ W.T + b
    if t.type == "classification":
        p = np.exp(out - out.max(1, keepdims=True))
        return float(log_loss(y, p / p.sum(1, keepdims=True), labels=np.arange(len(t.classes))))
    mean, std = target_stats[t.name]
    return float(mean_absolute_error(y, out[:, 0] * std + mean))


def _closed_form_layer(t: TaskSpec, Z: np.ndarray, y: np.ndarray, C: float,
                       target_stats: dict[str, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` on standardised features ``Z``: L2-logistic (2-class → logits ``[0, z]``) or ridge."""
    from sklearn.linear_model import LogisticRegression, Ridge

    if t.type == "classification":
        clf = LogisticRegression(C=C, max_iter=5000).fit(Z, y.astype(int))
        if clf.coef_.shape[0] == 1:
            return np.vstack([np.zeros_like(clf.coef_), clf.coef_]), np.array([0.0, clf.intercept_[0]])
        return clf.coef_, clf.intercept_
    mean, std = target_stats[t.name]
    reg = Ridge(alpha=1.0 / C).fit(Z, (y - mean) / std)
    return reg.coef_[None], np.array([reg.intercept_])


def _refit_heads(model: DenseFormerMoE, feats: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                 train: np.ndarray, val: np.ndarray, tasks: Sequence[TaskSpec],
                 target_stats: dict[str, tuple[float, float]]) -> dict[str, dict[str, Any]]:
    """Closed-form refit of each task's output layer (see ``FinetuneSection.refit_heads``).

    ``feats``/``labels`` cover the same subjects, ``train``/``val`` are boolean masks over them. The strength
    is chosen by the validation loss, and the refit replaces the layer only where it beats the SGD-trained
    one on that loss. Returns what was done per task (stored with the model).
    """
    report: dict[str, dict[str, Any]] = {}
    for t in tasks:
        X, y, layer = feats[t.name], labels[t.name], model.head.out[t.name]
        if not np.isfinite(X).all():  # e.g. a bf16 overflow: keep the trained layer rather than fail the run
            report[t.name] = {"refit": False, "why": "non-finite task representations"}
            continue
        have = y >= 0 if t.type == "classification" else np.isfinite(y)
        tr, va = train & have, val & have
        if t.type == "classification":
            usable = np.isin(np.arange(len(t.classes)), y[tr]).all() and np.unique(y[va]).size >= 2
        else:
            usable = tr.sum() >= 3 and va.sum() >= 2
        if not usable:
            report[t.name] = {"refit": False, "why": "too few training or validation labels (or a class missing)"}
            continue
        mu, sd = X[tr].mean(0), X[tr].std(0)
        sd = np.where(sd > 1e-8, sd, 1.0)
        fits = []
        for C in REFIT_STRENGTHS:
            coef, icpt = _closed_form_layer(t, (X[tr] - mu) / sd, y[tr], float(C), target_stats)
            W, b = coef / sd, icpt - (coef / sd) @ mu  # undo the standardisation
            fits.append((_layer_loss(t, W, b, X[va], y[va], target_stats), float(C), W, b))
        best, C, W, b = min(fits, key=lambda f: f[0])
        before = _layer_loss(t, layer.weight.detach().double().cpu().numpy(),
                             layer.bias.detach().double().cpu().numpy(), X[va], y[va], target_stats)
        keep = best < before
        report[t.name] = {"refit": bool(keep), "C": C, "val_loss_sgd": before, "val_loss_refit": best,
                          "loss": "log_loss" if t.type == "classification" else "mae"}
        if keep:
            with torch.no_grad():
                layer.weight.copy_(torch.as_tensor(W, dtype=layer.weight.dtype))
                layer.bias.copy_(torch.as_tensor(b, dtype=layer.bias.dtype))
    return report


def _predict_dataset(model: DenseFormerMoE, dataset: StructuralDataset, tasks: Sequence[TaskSpec],
                     target_stats: dict[str, Any], device: torch.device, precision: str,
                     batch_size: int = 8) -> dict[str, np.ndarray]:
    return _predict_batches(model, _image_batches(dataset, batch_size), tasks, target_stats, device, precision)


def _calibrate(pred: dict[str, np.ndarray], labels: dict[str, np.ndarray], rows: np.ndarray,
               tasks: Sequence[TaskSpec], ev: EvalSection, subjects: np.ndarray) -> dict[str, Any]:
    """Fit on validation rows: brain-age linear bias correction, conformal interval and set calibrators (one
    calibration row per subject, so a longitudinal subject's sessions do not narrow the intervals)."""
    cal: dict[str, Any] = {"alpha": ev.alpha}
    groups = subjects[rows]
    for t in tasks:
        y = labels[t.name][rows]
        if t.type == "regression":
            p = pred[t.name]
            have = np.isfinite(y)
            entry: dict[str, Any] = {}
            if t.name == AGE_TASK and have.sum() >= 3 and np.std(y[have]) > 0:
                bias = _age_bias(y[have], p[have])
                if bias is not None:
                    entry["bias"] = bias
                    p = np.full_like(p, np.nan, dtype=np.float64)
                    p[have] = _loo_corrected_age(y[have], pred[t.name][have], bias, groups[have])
            if (np.isfinite(y) & np.isfinite(p)).sum() >= 2:  # as for classification: no labels, no calibrator
                entry["conformal"] = ConformalRegressor(ev.alpha).fit(y, p, groups=groups).to_dict()
            cal[t.name] = entry
        else:
            if (y >= 0).sum() >= 2:
                cal[t.name] = {"conformal": ConformalClassifier(ev.alpha, method=ev.set_method).fit(
                    pred[t.name], y, groups=groups).to_dict()}
        conf = cal.get(t.name, {}).get("conformal")
        if conf is None:  # said, not silent: predict then writes no interval / set for the task
            n_lab, what = ((int(np.isfinite(y).sum()), "intervals") if t.type == "regression"
                           else (int((y >= 0).sum()), "prediction sets"))
            print(f"neuromoe: '{t.name}' has {n_lab} labelled validation subjects (at least 2 needed): no "
                  f"conformal {what} for it; add labelled validation subjects", file=sys.stderr)
        elif math.isinf(conf["q"]):
            need = math.ceil(1 / ev.alpha - 1 - 1e-9)
            what = "interval is unbounded" if t.type == "regression" else "sets hold every class"
            print(f"neuromoe: '{t.name}' conformal {what}: {conf['n_calib']} validation subjects are too few for "
                  f"{1 - ev.alpha:.0%} coverage (at least {need} needed); add validation subjects or raise "
                  "eval.alpha", file=sys.stderr)
    return cal


MIN_BIAS_SLOPE = 0.2  # the correction divides by the slope: at most a 5x stretch of the predictions


def _age_bias(age: np.ndarray, pred: np.ndarray) -> dict[str, float] | None:
    """Linear brain-age bias (pred ≈ slope·age + intercept, fitted on validation subjects), or ``None`` when
    there is no bias to correct: the slope is not significantly positive (p ≥ 0.05), or so shallow that
    dividing by it would mostly stretch noise (a model that barely tracks age gets no correction)."""
    from scipy.stats import linregress

    if np.std(pred) == 0:
        return None
    fit = linregress(age, pred)
    if not (fit.slope >= MIN_BIAS_SLOPE and fit.pvalue < 0.05):
        return None
    return {"slope": float(fit.slope), "intercept": float(fit.intercept)}


def _loo_corrected_age(age: np.ndarray, pred: np.ndarray, bias: dict[str, float],
                       subjects: np.ndarray) -> np.ndarray:
    """Each validation subject's predictions corrected by a line fitted without that subject (jackknife; all
    of a longitudinal subject's sessions are left out together).

    Why: the conformal residuals must be exchangeable with a test subject's. Corrected by the line fitted
    on themselves, the validation residuals come out smaller than a new subject's (the fit absorbs part of
    their noise: ≈ (n−2)/n of the variance), and the intervals under-cover. A leave-one-out slope that falls
    under ``MIN_BIAS_SLOPE`` keeps the full-sample line, so the correction never stretches by more than 5×.
    """
    from scipy.stats import linregress

    out = np.empty(len(age), dtype=np.float64)
    for i in range(len(age)):
        rest = subjects != subjects[i]
        if rest.sum() < 2:
            out[i] = (pred[i] - bias["intercept"]) / bias["slope"]
            continue
        fit = linregress(age[rest], pred[rest]) if np.std(pred[rest]) > 0 else None
        line = bias if fit is None or fit.slope < MIN_BIAS_SLOPE else {"slope": fit.slope, "intercept": fit.intercept}
        out[i] = (pred[i] - line["intercept"]) / line["slope"]
    return out


def _corrected_age(values: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    bias = entry.get("bias")
    return values if bias is None else (values - bias["intercept"]) / bias["slope"]


# ------------------------------------------------------------------------------------------- evaluate


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary ROC-AUC, or the macro one-vs-rest AUC over the classes present; NaN with one class."""
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    if p.ndim == 1:
        return binary_auc(y == present[1], p)
    return float(np.mean([binary_auc(y == c, p[:, c]) for c in present]))


def _classification_metrics(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int,
                            groups: np.ndarray | None = None) -> dict[str, Any]:
    """Point estimates with class-stratified bootstrap 95 % CIs (every replicate keeps every class), resampling
    subjects (``groups``) rather than sessions."""
    pb = p[:, 1] if p.shape[1] == 2 else p
    yhat = p.argmax(1)
    kw = {"n_boot": n_boot, "seed": seed, "stratify": y, "groups": groups}
    res = {"n": len(y),
           "auc": bootstrap_ci(_auc, y, pb, **kw),
           "balanced_accuracy": bootstrap_ci(balanced_accuracy, y, yhat, **kw),
           "f1_macro": bootstrap_ci(macro_f1, y, yhat, **kw)}
    if p.shape[1] == 2:
        res["sensitivity"] = float(np.mean(yhat[y == 1] == 1)) if (y == 1).any() else float("nan")
        res["specificity"] = float(np.mean(yhat[y == 0] == 0)) if (y == 0).any() else float("nan")
    return res


def _regression_metrics(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int,
                        groups: np.ndarray | None = None) -> dict[str, Any]:
    kw = {"n_boot": n_boot, "seed": seed, "groups": groups}
    return {"n": len(y),
            "mae": bootstrap_ci(lambda a, b: np.mean(np.abs(a - b)), y, p, **kw),
            "r": bootstrap_ci(lambda a, b: np.corrcoef(a, b)[0, 1], y, p, **kw),
            "r2": bootstrap_ci(r_squared, y, p, **kw)}


def _tbv(images: Iterable[np.ndarray]) -> np.ndarray:
    """Total brain volume proxy (voxel count above half the median foreground intensity) per image."""
    out = []
    for img in images:
        v = img.astype(np.float32).ravel()
        fg = v[v > 0]
        out.append(float((v > 0.5 * np.median(fg)).sum()) if fg.size else 0.0)
    return np.asarray(out)


def _tbv_baseline(t: TaskSpec, tbv: np.ndarray, labels: np.ndarray, train: np.ndarray,
                  test: np.ndarray) -> np.ndarray | None:
    """Predictions on ``test`` rows of a linear (regression) / logistic (classification) model on TBV."""
    from sklearn.linear_model import LinearRegression, LogisticRegression

    y = labels[train]
    have = np.isfinite(y) if t.type == "regression" else y >= 0
    if have.sum() < 3 or (t.type == "classification" and len(np.unique(y[have])) < 2):
        return None
    x = (tbv - tbv[train].mean()) / (tbv[train].std() + 1e-9)
    xt = x[train][have][:, None]
    if t.type == "regression":
        return LinearRegression().fit(xt, y[have]).predict(x[test][:, None])
    clf = LogisticRegression(max_iter=1000).fit(xt, y[have].astype(int))
    proba = np.zeros((test.sum(), t.num_outputs))
    proba[:, clf.classes_] = clf.predict_proba(x[test][:, None])
    return proba


def _calibration_size(task_cal: dict[str, Any]) -> dict[str, Any]:
    """How many validation subjects calibrated a task, and whether that was too few for its level (then every
    interval is infinite / every set holds all classes, and the coverage of 1 says nothing)."""
    conf = task_cal["conformal"]
    return {"n_calib": int(conf["n_calib"]), "unbounded": math.isinf(conf["q"])}


def _shortfall(covered: np.ndarray, have: np.ndarray, subjects: np.ndarray, conf: dict[str, Any],
               seed: int) -> float:
    """How surprising the measured coverage is for scans exchangeable with the calibration subjects (one seeded
    scan per subject: a subject's sessions share their errors), :func:`coverage_shortfall_p`."""
    keep = one_per_group(subjects, have, seed)
    return coverage_shortfall_p(np.asarray(covered, bool)[keep], int(conf["n_calib"]), float(conf["alpha"]))


@removes_on_error("metrics.json", "predictions.csv", "report/section.json")
@pipeline_entry()
def evaluate(model_dir: str | Path, data: str | Path, out: str | Path, *, split: str = "test",
             device: str = "auto", n_bootstrap: int = 1000, seed: int = 0,
             cache_dir: str | None = None, section: Any = None) -> Path:
    """Metrics with bootstrap CIs, bias-corrected brain-age gap, conformal coverage, TBV baseline, figures.

    Writes ``out/metrics.json``, ``out/predictions.csv`` and ``out/report/section.json`` (+ PNGs); with
    ``section`` given, the results are added to that report section instead (the caller saves it).
    ``split="all"`` scores every row (an external cohort: without a split column only the seeded 'test'
    share would be scored), refusing any scan the model was fitted on, as for 'test'.
    """
    out = Path(out)
    model, meta = _load_multitask(model_dir)
    tasks = [TaskSpec(**t) for t in meta["tasks"]]
    extra = meta["extra"]
    table, source = _resolve_table(data)
    _require_labels(table, source)
    if split == "all":  # an external cohort, scored whole: its own split column (if any) means nothing here
        splits = np.full(len(table), "all")
    else:
        splits = assign_splits(table, seed=extra.get("split_seed", seed)).to_numpy()  # the split train() used
    rows = splits == split
    if not rows.any():
        raise InputError(f"no '{split}' subjects", path=source, fix="choose another --split")
    if split == "test" and "split" not in table.columns:  # said: an external cohort scored whole needs --split all
        print(f"neuromoe: {source} has no split column: scoring the {int(rows.sum())} of {len(table)} rows that the "
              "model's seed puts in 'test' (--split all scores every row of an external cohort)", file=sys.stderr)
    if split in ("test", "all"):  # e.g. the same manifest without its split column: a new random split
        refuse_fitted(extra.get("fit_fingerprints", []), case_fingerprints(table[rows], ["t1"]), source, "scans",
                      "train, pretrain or calibrate", split=split, names=scan_ids(table[rows])["subject"].tolist())
    from neuromoe.data.preprocess import PreprocSpec

    cfg = DenseFormerConfig(cache_dir=cache_dir)
    # the baseline learns from the labels the model learnt from (label_fraction < 1: a subset of train)
    train_rows = _label_subsample(table, splits == "train", extra.get("label_fraction", 1.0),
                                  extra.get("split_seed", seed))
    keep = rows | train_rows  # what is scored and what the TBV baseline learns from; never validation's scans
    table, rows, train_rows = table[keep].reset_index(drop=True), rows[keep], train_rows[keep]
    dataset = StructuralDataset(table, tasks, PreprocSpec.from_dict(meta["preprocessing"]), extra["img_size"],
                                cache=_cache(cfg), source=source)
    pred = _predict_dataset(model, dataset.subset(rows), tasks, extra["target_stats"], _device(device), "fp32")
    tbv = _tbv(dataset.volumes())
    cal = extra["calibration"]
    metrics: dict[str, Any] = {"split": split, "n": int(rows.sum()), "tasks": {}}
    frame = scan_ids(table.loc[rows]).assign(t1=table.loc[rows, "t1"].to_numpy())
    subjects = frame["subject"].astype(str).to_numpy()  # CIs resample subjects: their sessions are not independent
    metrics["n_subjects"] = len(set(subjects))
    skipped: dict[str, str] = {}
    no_baseline: dict[str, str] = {}
    for t in tasks:
        y_all = dataset.labels[t.name]
        y = y_all[rows]
        p = pred[t.name]
        base = _tbv_baseline(t, tbv, y_all, train_rows, rows)
        if base is None:  # e.g. a test-only table: no training rows to fit the baseline on
            no_baseline[t.name] = ("every subject is scored (--split all): none left to fit it on" if split == "all"
                                   else "fewer than 3 labelled training subjects (of both classes) in this table")
        entry: dict[str, Any] = {}
        if t.type == "regression":
            have = np.isfinite(y)
            if have.sum() < 3:
                skipped[t.name] = f"{_labelled(subjects[have], split)} (at least 3 scans needed)"
                continue
            tcal = cal.get(t.name, {})
            entry["n"] = int(have.sum())
            corrected = _corrected_age(p, tcal)
            entry["model"] = _regression_metrics(y[have], p[have], n_bootstrap, seed, subjects[have])
            entry["bias_corrected"] = tcal.get("bias") is not None  # None: validation showed no bias to correct
            if entry["bias_corrected"]:
                entry["model_bias_corrected"] = _regression_metrics(y[have], corrected[have], n_bootstrap, seed,
                                                                    subjects[have])
            mean = float(extra["target_stats"][t.name][0])  # the labels it learnt from, whatever this table holds
            entry["predict_train_mean_mae"] = float(np.mean(np.abs(y[have] - mean)))
            entry["mae_ratio_to_mean"] = entry["model"]["mae"][0] / max(entry["predict_train_mean_mae"], 1e-9)
            if base is not None:
                entry["tbv_baseline"] = _regression_metrics(y[have], base[have], n_bootstrap, seed, subjects[have])
            if "conformal" in tcal:
                lo, hi = ConformalRegressor.from_dict(tcal["conformal"]).predict(corrected)
                entry["conformal"] = {"nominal": 1 - tcal["conformal"]["alpha"],
                                      "coverage": interval_coverage(lo[have], hi[have], y[have]),
                                      "mean_width": float(np.mean(hi - lo)), **_calibration_size(tcal),
                                      "shortfall_p": _shortfall((y >= lo) & (y <= hi), have, subjects,
                                                                tcal["conformal"], seed)}
                frame[f"{t.name}_lo"], frame[f"{t.name}_hi"] = lo, hi
            if t.name == AGE_TASK:
                gap = corrected[have] - y[have]
                entry["brain_age_gap"] = {"mean": float(gap.mean()), "sd": float(gap.std()),
                                          "corr_with_age": float(np.corrcoef(gap, y[have])[0, 1])}
            frame[t.name] = y
            frame[f"{t.name}_pred"] = p
            frame[f"{t.name}_corrected"] = corrected
        else:
            have = y >= 0
            if have.sum() < 3 or len(np.unique(y[have])) < 2:
                skipped[t.name] = (f"{_labelled(subjects[have], split)} in "
                                   f"{len(np.unique(y[have]))} class(es) (at least 3 scans in 2 classes needed)")
                continue
            entry["n"] = int(have.sum())
            entry["model"] = _classification_metrics(y[have], p[have], n_bootstrap, seed, subjects[have])
            if base is not None:
                entry["tbv_baseline"] = _classification_metrics(y[have], base[have], n_bootstrap, seed,
                                                                subjects[have])
            pos = _positive_vs_reference(t)
            pos = pos if pos is not None and t.num_outputs > 2 else None  # e.g. AD vs CN on a CN/MCI/AD head
            sel = have & np.isin(y, list(pos or ()))
            if pos is not None and len(np.unique(y[sel])) == 2:  # both classes must be in the split
                ref, tgt = pos
                score = p[sel, tgt] / (p[sel, tgt] + p[sel, ref] + 1e-12)
                is_tgt = (y[sel] == tgt).astype(int)
                entry[f"n_{t.classes[tgt]}_vs_{t.classes[ref]}"] = [int(is_tgt.sum()), int((1 - is_tgt).sum())]
                entry[f"auc_{t.classes[tgt]}_vs_{t.classes[ref]}"] = bootstrap_ci(
                    _auc, is_tgt, score, n_boot=n_bootstrap, seed=seed, stratify=is_tgt, groups=subjects[sel])
                if base is not None:
                    bscore = base[sel, tgt] / (base[sel, tgt] + base[sel, ref] + 1e-12)
                    entry[f"tbv_auc_{t.classes[tgt]}_vs_{t.classes[ref]}"] = _auc(
                        (y[sel] == tgt).astype(int), bscore)
            if t.name in cal:
                sets = ConformalClassifier.from_dict(cal[t.name]["conformal"]).predict(p)
                entry["conformal"] = {"nominal": 1 - cal[t.name]["conformal"]["alpha"],
                                      "coverage": set_coverage(sets[have], y[have]),
                                      "mean_set_size": mean_set_size(sets[have]), **_calibration_size(cal[t.name]),
                                      "shortfall_p": _shortfall(sets[np.arange(len(y)), np.maximum(y, 0)], have,
                                                                subjects, cal[t.name]["conformal"], seed)}
            frame[t.name] = [t.classes[i] if i >= 0 else "" for i in y]
            for ci, c in enumerate(t.classes):
                frame[f"{t.name}_p_{c}"] = p[:, ci]
        if f"{t.name}/experts" in pred:
            entry["expert_usage"] = np.bincount(pred[f"{t.name}/experts"].ravel(),
                                                minlength=model.head.num_experts).tolist()
        metrics["tasks"][t.name] = entry
    for name, why in skipped.items():
        print(f"neuromoe: task '{name}' not scored: {why}", file=sys.stderr)
    if not metrics["tasks"]:
        raise InputError(f"no task can be scored on the '{split}' split ({metrics['n']} scans of "
                         f"{metrics['n_subjects']} subjects)",
                         path=source, fix="evaluate on a cohort with more labelled subjects, or another --split")
    metrics["skipped"] = skipped
    metrics["tbv_baseline_skipped"] = {k: v for k, v in no_baseline.items() if k in metrics["tasks"]}
    for name, why in metrics["tbv_baseline_skipped"].items():
        print(f"neuromoe: task '{name}' has no TBV baseline: {why} (it is fitted on the table's training rows)",
              file=sys.stderr)
    atomic_write_json(out / "metrics.json", metrics, strict=True)
    with atomic_path(out / "predictions.csv") as tmp:
        frame.to_csv(tmp, index=False)
    own = section is None
    section = _new_section("DenseFormer-MoE: multi-task evaluation") if own else section
    _add_evaluation(section, metrics, frame, tasks, pred, rows, dataset.labels)
    if own:
        section.save(out)
    return out


def _labelled(subjects: np.ndarray, split: str) -> str:
    """"5 labelled 'test' scans of 3 subjects" (one subject's sessions are not independent subjects), or
    "3 labelled 'test' subjects"."""
    n, k = len(subjects), len(set(subjects))
    return f"{n} labelled '{split}' " + (f"scans of {k} subjects" if n != k else "subjects")


def _positive_vs_reference(t: TaskSpec) -> tuple[int, int] | None:
    """(reference, target) class indices for the clinically central binary contrast of a task (first vs last)."""
    return (0, len(t.classes) - 1) if t.type == "classification" and len(t.classes) >= 2 else None


def _load_multitask(model_dir: str | Path) -> tuple[DenseFormerMoE, dict[str, Any]]:
    from neuromoe.models.registry import load_model, require_meta

    model, meta = load_model(model_dir)
    if not isinstance(model, DenseFormerMoE) or meta.get("extra", {}).get("kind") != "multitask":
        raise ModelFormatError("not a fine-tuned DenseFormer-MoE model directory", path=model_dir,
                               fix="pass the 'model' folder written by 'neuromoe train --family denseformer'")
    require_meta(meta, ("preprocessing", "tasks", "extra.calibration", "extra.img_size", "extra.target_stats"),
                 model_dir)
    try:  # the class names label the head's outputs: another count would name them wrongly
        heads = [{k: h[k] for k in ("name", "type", "num_outputs")} for h in model.tasks]
        same = [TaskSpec(**t).model_dict() for t in meta["tasks"]] == heads
    except (TypeError, KeyError):
        same = False
    if not same:
        raise ModelFormatError("the config's tasks (names, types, class counts) do not match the model's output "
                               "heads", path=Path(model_dir) / "config.json",
                               fix="use the model folder as training wrote it, or train it again")
    return model.eval(), meta


def _add_evaluation(section: Any, metrics: dict[str, Any], frame: pd.DataFrame, tasks: Sequence[TaskSpec],
                    pred: dict[str, np.ndarray], rows: np.ndarray, labels: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix, roc_curve

    split = metrics["split"]
    scored = ("Every subject of an external cohort" if split == "all" else
              f"Held-out '{split}' subjects" if split == "test" else
              f"'{split}' subjects — in-sample: they fitted the model"
              + (", the age correction and the conformal calibration, so coverage here is no test of it"
                 if split == "val" else ""))
    n_subj = metrics.get("n_subjects", metrics["n"])
    count = f"n={metrics['n']}" + (f" scans of {n_subj} subjects" if n_subj != metrics["n"] else "")
    tasks_scored = metrics["tasks"].values()
    corrected = [n for n, e in metrics["tasks"].items() if e.get("bias_corrected")]
    uncorrected = [n for n, e in metrics["tasks"].items() if e.get("bias_corrected") is False]
    short = [n for n, e in metrics["tasks"].items() if e.get("conformal", {}).get("shortfall_p", 1.0) < 0.05]
    section.add_text(
        f"{scored} ({count})."
        + (f" {', '.join(corrected)}: bias-corrected with a linear fit on validation subjects." if corrected else "")
        + "".join(f" {n}: not bias-corrected (validation showed no significant bias to correct)." for n in uncorrected)
        + " Conformal intervals/sets are calibrated on validation only."
        + (f" Coverage of {', '.join(short)} is below what scans exchangeable with those validation subjects give "
           "(p < 0.05 per task, beta-binomial): the intervals/sets may not carry over to these scans (another "
           "site, scanner or population?); recalibrate on labelled scans like them before relying on them."
           if short else "")
        + (" The baseline is a linear/logistic model on total brain volume (TBV) fitted on training subjects."
           if any("tbv_baseline" in e for e in tasks_scored) else "")
        + "".join(f" Task '{n}' is not scored: {why}." for n, why in metrics.get("skipped", {}).items())
        + "".join(f" Task '{n}' has no TBV baseline: {why}." for n, why in metrics.get("tbv_baseline_skipped",
                                                                                         {}).items())
    )
    table_rows = []
    for name, e in metrics["tasks"].items():
        m, b = e.get("model", {}), e.get("tbv_baseline", {})
        n = str(e.get("n", ""))  # the labelled scans of this task: far fewer than the split's for a diagnosis
        for key in ("mae", "r", "r2", "auc", "balanced_accuracy", "f1_macro"):
            if key in m:
                table_rows.append({"task": name, "n": n, "metric": key, "model": _fmt_ci(m[key]),
                                   "TBV baseline": _fmt_ci(b[key]) if key in b else ""})
        if "predict_train_mean_mae" in e:  # the floor: what knowing nothing about the scan gives
            table_rows.append({"task": name, "n": n, "metric": "mae of predicting the training mean",
                               "model": f"{e['predict_train_mean_mae']:.3f} (model / floor "
                                        f"{e['mae_ratio_to_mean']:.2f})",
                               "TBV baseline": ""})
        corrected = e.get("model_bias_corrected", {})
        if "mae" in corrected:  # the values the intervals and the brain-age gap are built on
            table_rows.append({"task": name, "n": n, "metric": "mae (bias-corrected)",
                               "model": _fmt_ci(corrected["mae"]), "TBV baseline": ""})
        if "brain_age_gap" in e:
            g = e["brain_age_gap"]
            table_rows.append({"task": name, "n": n, "metric": "brain-age gap mean ± sd (y)",
                               "model": f"{g['mean']:.2f} ± {g['sd']:.2f}", "TBV baseline": ""})
        for key, v in e.items():
            if key.startswith("auc_"):
                pos, neg = e.get("n_" + key.removeprefix("auc_"), ["?", "?"])
                base = e.get("tbv_" + key)
                table_rows.append({"task": name, "n": f"{pos} vs {neg}", "metric": key, "model": _fmt_ci(v),
                                   "TBV baseline": "" if base is None else f"{base:.3f}"})
        if "conformal" in e:
            c = e["conformal"]
            size = c.get("mean_width", c.get("mean_set_size"))
            trivial = "; too few calibration subjects: trivial" if c.get("unbounded") else ""
            if c.get("shortfall_p", 1.0) < 0.05:
                trivial += f"; below what scans like the calibration subjects give, p = {c['shortfall_p']:.2g}"
            table_rows.append({"task": name, "n": n, "metric": f"conformal coverage (nominal {c['nominal']:.2f})",
                               "model": f"{c['coverage']:.3f} (mean size {size:.2f}{trivial})", "TBV baseline": ""})
    section.add_table(table_rows, "Per-task metrics with 95 % bootstrap CIs; n = labelled scans of the task (for "
                                  "an AUC contrast: positive vs reference class). Age MAE in years.")

    cls_tasks = [t for t in tasks if t.type == "classification" and t.name in metrics["tasks"]]
    if cls_tasks:
        fig, axes = plt.subplots(2, len(cls_tasks), figsize=(3.6 * len(cls_tasks), 7), squeeze=False)
        for j, t in enumerate(cls_tasks):
            y, p = labels[t.name][rows], pred[t.name]
            have = y >= 0
            ax = axes[0, j]
            for ci, c in enumerate(t.classes if len(t.classes) > 2 else t.classes[1:]):
                k = ci if len(t.classes) > 2 else 1
                if len(np.unique(y[have] == k)) == 2:
                    fpr, tpr, _ = roc_curve(y[have] == k, p[have, k])
                    ax.plot(fpr, tpr, label=f"{c} (AUC {_auc((y[have] == k).astype(int), p[have, k]):.2f}, "
                                            f"n={int((y[have] == k).sum())} vs {int((y[have] != k).sum())})")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set(title=f"ROC · {t.name}", xlabel="1 − specificity", ylabel="sensitivity")
            ax.legend(fontsize=7)
            cm = confusion_matrix(y[have], p[have].argmax(1), labels=np.arange(len(t.classes)))
            ax = axes[1, j]
            ax.imshow(cm, cmap="Blues")
            for (a, b_), v in np.ndenumerate(cm):  # white on the dark cells: black on navy was unreadable
                ax.text(b_, a, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > cm.max() / 2 else "black")
            ax.set(xticks=range(len(t.classes)), yticks=range(len(t.classes)), xticklabels=t.classes,
                   yticklabels=t.classes, xlabel="predicted", ylabel="true", title=f"confusion · {t.name}")
        fig.tight_layout()
        section.add_figure(fig, f"ROC curves (one-vs-rest) and confusion matrices on {metrics['split']} subjects.")
        plt.close(fig)

    if AGE_TASK in metrics["tasks"]:
        y = frame[AGE_TASK].to_numpy(float)
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.scatter(y, frame[f"{AGE_TASK}_pred"], s=10, alpha=0.6, label="raw")
        ax.scatter(y, frame[f"{AGE_TASK}_corrected"], s=10, alpha=0.6, label="bias-corrected")
        lim = [np.nanmin(y), np.nanmax(y)]
        ax.plot(lim, lim, "k:", lw=0.8, label="identity")
        ax.set(xlabel="chronological age (y)", ylabel="predicted brain age (y)",
               title=f"brain age ({metrics['split']}, n={metrics['tasks'][AGE_TASK].get('n', len(y))})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        section.add_figure(fig, "Predicted vs chronological age: raw and bias-corrected predictions.")
        plt.close(fig)

    usage = {n: e["expert_usage"] for n, e in metrics["tasks"].items() if "expert_usage" in e}
    if usage:
        mat = np.asarray(list(usage.values()), float)
        mat = mat / mat.sum(1, keepdims=True)
        fig, ax = plt.subplots(figsize=(0.5 * mat.shape[1] + 2, 0.5 * mat.shape[0] + 1.5))
        im = ax.imshow(mat, cmap="viridis", vmin=0)
        ax.set(xticks=range(mat.shape[1]), yticks=range(mat.shape[0]), yticklabels=list(usage),
               xlabel="expert", title="expert usage per task (fraction of top-k slots)")
        fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the task's top-k slots")
        fig.tight_layout()
        section.add_figure(fig, f"Task × expert routing of the MoE head on {metrics['split']} subjects.")
        plt.close(fig)


def _fmt_ci(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 3:
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
    return f"{v:.3f}"


# -------------------------------------------------------------------------------------------- predict


_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _file_table(files: Sequence[Path]) -> pd.DataFrame:
    """Loose NIfTI files with the row ids a BIDS folder gives them (``neuromoe.io.table.file_ids``), so the
    rows join a participants table and match predictions made from the folder."""
    from neuromoe.io.table import file_ids

    table = file_ids(files)
    table["t1"] = [str(f) for f in files]
    return table


def _prediction_inputs(source: str | Path) -> pd.DataFrame:
    """A table with ``subject`` and ``t1`` (and ``age`` when known) from a file, folder or manifest."""
    source = Path(source)
    if source.is_file() and source.name.endswith(_NIFTI_SUFFIXES):
        return _file_table([source])
    if source.is_file() and source.suffix.lower() not in (".csv", ".tsv"):  # e.g. Analyze .img/.hdr, .mgz
        raise InputError("not a NIfTI file name, nor a manifest", path=source,
                         fix="give a .nii or .nii.gz scan (convert others, e.g. mri_convert), a folder of them, "
                             "a manifest (.csv/.tsv) or a BIDS folder")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.name.endswith(_NIFTI_SUFFIXES))
        # a BIDS root (or a synthetic cohort) is read as one, as BrainMoE reads it: one stray template at its top
        # level made predict score that file alone and skip every subject's scans
        if files and not (any(p.is_dir() for p in source.glob("sub-*")) or (source / "manifests").is_dir()):
            return _file_table(files)
        if files:
            print(f"neuromoe: warning: {len(files)} NIfTI file(s) at the top of the BIDS folder {source} are not "
                  f"read (e.g. {files[0].name}); predict reads the sub-*/ scans", file=sys.stderr)
    table, _ = _resolve_table(source)
    if "subject" not in table.columns:
        table["subject"] = [file_stem(p) for p in table["t1"]]
    return table


@pipeline_entry()
def predict(model_dir: str | Path, inputs: str | Path, output: str | Path, *, device: str = "auto",
            strict: bool = False, progress: bool = True, cache_dir: str | None = None,
            batch_size: int = 4) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Predict every scan of ``inputs``; write ``output`` CSV atomically; return ``(table, failures)``.

    Columns: per classification task the predicted class, class probabilities and conformal set; per
    regression task the value (``brain_age``, ``brain_age_corrected``, ``brain_age_gap`` when the input has
    an ``age`` column, conformal ``brain_age_lo/hi``); ``<task>_experts`` = top-k experts used. A file that
    fails is reported, skipped and listed in ``<output>_failures.csv`` (subject, t1, error); ``strict=True``
    re-raises the first failure; when every scan fails an InputError is raised and nothing is written.
    """
    from tqdm import tqdm

    from neuromoe.data.preprocess import PreprocSpec

    model, meta = _load_multitask(model_dir)
    tasks = [TaskSpec(**t) for t in meta["tasks"]]
    extra = meta["extra"]
    spec = PreprocSpec.from_dict(meta["preprocessing"])
    cache = _cache(DenseFormerConfig(cache_dir=cache_dir))
    table = _prediction_inputs(inputs)
    check_outputs([output, failures_path(output)], [inputs, *table["t1"]])
    strict = strict or len(table) == 1  # one scan: its own error, one line, nothing written
    dev = _device(device)
    rows, failures = [], []
    pending: list[tuple[dict[str, Any], np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.from_numpy(np.stack([a for _, a in pending]))
        res = _predict_batches(model, iter([x]), tasks, extra["target_stats"], dev, "fp32")
        for i, (base, _) in enumerate(pending):
            rows.append({**base, **_prediction_row(res, i, tasks, extra, base.get("age"))})
        pending.clear()

    failed_rows: list[dict[str, str]] = []
    for _, r in tqdm(table.iterrows(), total=len(table), disable=not progress, desc="predict", unit="scan",
                     file=sys.stderr):
        base = {"subject": r["subject"], **{k: r[k] for k in ("session", "run") if k in r and pd.notna(r[k])},
                "t1": r["t1"]}  # a longitudinal subject's sessions are told apart by their own column
        try:
            arr = load_t1(r["t1"], spec, extra["img_size"], cache)
            age = r.get("age")
            if age is not None and not (isinstance(age, float) and math.isnan(age)) and str(age).strip():
                try:
                    base["age"] = float(age)
                except ValueError:
                    raise InputError(f"subject {r['subject']}: age {age!r} is not a number", path=inputs,
                                     fix="write a number or leave the cell empty") from None
        except Exception as exc:
            if strict:
                remove_stale(output, failures_path(output))
                raise
            failures.append((str(r["t1"]), str(exc)))
            failed_rows.append({"subject": str(r["subject"]), "t1": str(r["t1"]), "error": str(exc)})
            print(f"neuromoe: skipped {r['subject']}: {exc}", file=sys.stderr)
            continue
        pending.append((base, arr))
        if len(pending) >= batch_size:
            flush()
    flush()
    if failures and not rows:  # nothing to predict: refuse like a single bad input; the failures say what to fix
        remove_stale(output)
        write_failures(failures_path(output), failed_rows)
        raise InputError(f"no scan could be predicted ({len(failures)} failed, listed above)", path=inputs,
                         fix="fix the listed files")
    frame = pd.DataFrame(rows)
    with atomic_path(output) as tmp:
        frame.to_csv(tmp, index=False)
    write_failures(failures_path(output), failed_rows)  # the batch finished; this says what to fix
    odd = int((frame["warning"] != "").sum()) if "warning" in frame.columns else 0
    if odd:
        print(f"neuromoe: warning: {odd} of {len(frame)} scans got a prediction "
              f"more than {OUTLIER_SD:g} SD from the training mean (column 'warning' of {output}): check that they "
              "are brain T1 scans like the training ones (noise, a mask or a wrong header come out like this)",
              file=sys.stderr)
    return frame, failures


def _prediction_row(res: dict[str, np.ndarray], i: int, tasks: Sequence[TaskSpec], extra: dict[str, Any],
                    age: float | None) -> dict[str, Any]:
    cal = extra["calibration"]
    row: dict[str, Any] = {}
    odd = []
    for t in tasks:
        v = res[t.name][i]
        name = "brain_age" if t.name == AGE_TASK else t.name
        if t.type == "regression":
            row[name] = float(v)
            mean, std = extra.get("target_stats", {}).get(t.name, (float(v), 1.0))
            if abs(float(v) - mean) > OUTLIER_SD * std:
                odd.append(f"{name} {float(v):.1f} is {(float(v) - mean) / std:+.1f} SD from the training mean")
            tcal = cal.get(t.name, {})
            if t.name == AGE_TASK:
                corrected = float(_corrected_age(np.asarray(v), tcal))
                row["brain_age_corrected"] = corrected
                if age is not None:
                    row["brain_age_gap"] = corrected - age
                v = corrected
            if "conformal" in tcal:
                lo, hi = ConformalRegressor.from_dict(tcal["conformal"]).predict(np.asarray([v]))
                row[f"{name}_lo"], row[f"{name}_hi"] = float(lo[0]), float(hi[0])
        else:
            row[t.name] = t.classes[int(np.argmax(v))]
            for ci, c in enumerate(t.classes):
                row[f"{t.name}_p_{c}"] = float(v[ci])
            if t.name in cal:
                cc = ConformalClassifier.from_dict(cal[t.name]["conformal"])
                # the APS draw is seeded by the scan's probabilities, not its name: copies of one scan under other
                # names (or moved) got other sets; rounded, so the last bits of another batching do not count
                u = np.random.default_rng([cc.seed + 1, zlib.crc32(np.round(np.asarray(v, np.float64), 6).tobytes())])
                members = cc.predict(v[None], rng=u)[0]
                row[f"{t.name}_set"] = "|".join(c for c, m in zip(t.classes, members) if m)
        if f"{t.name}/experts" in res:
            row[f"{t.name}_experts"] = " ".join(str(e) for e in res[f"{t.name}/experts"][i])
    row["warning"] = "; ".join(odd)  # always a column, empty when nothing is odd: one CSV schema for every run
    return row


# ----------------------------------------------------------------------------------------------- demo


@pipeline_entry()
def demo(cohort_dir: str | Path, out_dir: str | Path, *, device: str = "auto", seed: int = 0,
         preset: str | Path = "demo", cache_dir: str | Path | None = None) -> Path:
    """MAE pretraining → multi-task fine-tuning → test evaluation → report section (``out_dir/report``)."""
    out = Path(out_dir)
    cfg = load_denseformer_config(preset, seed=seed, device=device)
    if cfg.cache_dir is None:
        cfg.cache_dir = str(cache_dir or out / "cache")
    pretrain(cohort_dir, out / "pretrain", cfg)
    cfg.finetune.pretrained = str(out / "pretrain" / "model")
    train(cohort_dir, out / "train", cfg)
    section = _new_section("DenseFormer-MoE (T1): MAE pretraining → task-routed MoE fine-tuning")
    pretrain_result = json.loads((out / "pretrain" / "model" / "config.json").read_text())["extra"]
    _add_pretrain(section, pretrain_result, out / "pretrain" / "reconstruction.png")
    evaluate(out / "train" / "model", cohort_dir, out / "evaluate", device=device, seed=seed,
             n_bootstrap=cfg.eval.n_bootstrap, cache_dir=cfg.cache_dir, section=section)
    section.save(out)
    return out

