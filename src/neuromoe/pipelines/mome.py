"""MoME / MoME+ pipelines: ``pretrain`` (stage 1, one expert per modality), ``train`` (MoME / MoME+ with the
curriculum), ``evaluate`` (per case × modality metrics, tables, overlays, gate maps), ``segment`` (NIfTI in,
mask on the input grid out) and ``demo``.

Conventions shared by the steps:

* Data is a cohort folder (its ``manifests/lesion.csv`` is used), a manifest ``.csv``/``.tsv`` or a BIDS
  folder with a ``mask`` column. The ``split`` column is used when present, else a deterministic split
  stratified by lesion type.
* Every case is preprocessed once with the config's :class:`~neuromoe.data.preprocess.PreprocSpec`
  (through the on-disk cache); the spec, the modalities and the patch size are stored in the model's
  ``config.json`` so ``segment`` replays them on new scans.
* The model is chosen by validation loss of the *fused* output (the curriculum's expert term changes
  weight every epoch, so the total loss is not comparable across epochs).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from neuromoe.config import load_family_config, save_config
from neuromoe.data.lesion import LesionCase, LesionPatchDataset, load_lesion_cases
from neuromoe.engine import (
    TrainConfig,
    Trainer,
    finish_training,
    is_main_process,
    map_over_ranks,
    monitor_problems,
)
from neuromoe.engine.precision import resolve_precision
from neuromoe.engine.utils import pipeline_entry, resolve_device
from neuromoe.errors import ConfigError, InputError, ModelFormatError
from neuromoe.eval.metrics import segmentation_metrics
from neuromoe.io.atomic import (
    atomic_path,
    atomic_write_json,
    check_outputs,
    json_text,
    remove_stale,
    removes_on_error,
)
from neuromoe.io.table import case_fingerprints, file_stem, refuse_fitted, write_failures
from neuromoe.models.mome import (
    DEFAULT_MODALITIES,
    MoME,
    curriculum_weight,
    deep_supervised_loss,
    deep_supervision_weights,
    dice_ce_from_sums,
    dice_ce_sums,
    mome_loss,
)

FAMILY = "mome"
SUMMARY_METRICS = ("dice", "hd95", "lesion_f1", "abs_volume_diff_ml")
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)  # candidates for eval.tune_threshold
# what MoMETrainer.validation_end reports, and which way is better (train.monitor / monitor_mode)
VAL_METRICS = {"val_loss": "min", "val_dice": "max", "val_dice_p50": "max"}

__all__ = [
    "DataSection",
    "EvalSection",
    "MoMEConfig",
    "MoMETrainer",
    "ModelSection",
    "VolumePrediction",
    "demo",
    "evaluate",
    "evaluate_cases",
    "load_mome_config",
    "predict_volume",
    "pretrain",
    "segment",
    "train",
]


# ------------------------------------------------------------------------------------------- config


@dataclass
class ModelSection:
    """``kind: mome`` (MoME, or MoME+ with ``multimodal``; sparse with ``top_k``) or ``unet`` (the pooled
    single U-Net baseline trained on every modality's images)."""

    preset: Literal["tiny", "demo", "base"] = "demo"
    kind: Literal["mome", "unet"] = "mome"
    modalities: list[str] = field(default_factory=lambda: list(DEFAULT_MODALITIES))
    gate_norm: Literal["softmax", "raw"] = "softmax"
    multimodal: bool = False
    top_k: int = 0
    widths: list[int] | None = None
    gate_widths: list[int] | None = None
    # coarser head's upsampled logits added to each finer head's, in experts and gate (ExpertUNet); false =
    # nnU-Net's plain heads
    logit_skip: bool = True

    def problems(self) -> list[tuple[str, str, str]]:
        """Values of the right type the model cannot use, refused at load rather than after preprocessing."""
        out = []
        if not self.modalities:
            out.append(("modalities", "is empty: MoME needs one expert per modality", "[t1,flair]"))
        if self.kind == "mome" and not 0 <= self.top_k <= len(self.modalities):
            out.append(("top_k", f"{self.top_k} is not in [0, {len(self.modalities)}] (0 = dense, else experts "
                        "per input)", "0"))
        return out


@dataclass
class DataSection:
    patch_size: list[int] = field(default_factory=lambda: [48, 48, 48])
    fg_fraction: float = 0.333
    modality_dropout: float = 0.5  # MoME+ training only
    augment: bool = True
    samples_per_epoch: int = 0  # 0 = one pass over the (case, modality) pairs (MoME) or cases (MoME+)
    # Stage 1 patches per epoch for *each* expert (nnU-Net style fixed iterations); 0 = one pass over
    # that modality's images, which gives an expert with few images (DWI: 8) a handful of steps.
    expert_samples_per_epoch: int = 0
    # Stage 1 warm start (sparse upcycling): patches per epoch for one U-Net trained first on every modality's
    # images pooled, whose weights then start every expert; 0 = experts from random weights (the reference).
    shared_samples_per_epoch: int = 0

    def problems(self) -> list[tuple[str, str, str]]:
        """Values of the right type that patch sampling cannot use (a NaN probability samples silently)."""
        out = []
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            out.append(("patch_size", f"{list(self.patch_size)} is not 3 positive sizes", "[32,32,32]"))
        # probabilities; a modality dropout of 1 still keeps one modality per case
        for name, example in (("fg_fraction", "0.333"), ("modality_dropout", "0.5")):
            if not 0 <= getattr(self, name) <= 1:
                out.append((name, f"{getattr(self, name)} is not a probability in [0, 1]", example))
        for name, zero in (("samples_per_epoch", "one pass"), ("expert_samples_per_epoch", "one pass"),
                           ("shared_samples_per_epoch", "no warm start")):
            if getattr(self, name) < 0:
                out.append((name, f"must be >= 0 (0 = {zero})", "0"))
        return out


@dataclass
class EvalSection:
    tta: bool = False
    threshold: float = 0.5
    # Replace ``threshold`` by the one with the best mean Dice on the whole validation volumes, predicted
    # as ``evaluate`` predicts (stored with the model): a briefly trained U-Net ranks lesion voxels well
    # before its probabilities cross 0.5, and a longer-trained MoME+ is best above 0.5. Validation
    # *patches* (1/3 lesion-centred) gave thresholds 0.10–0.25 where whole volumes want 0.25–0.7.
    tune_threshold: bool = False
    # Sliding-window inference precision, stored with the model so that ``evaluate`` and ``segment`` score
    # the probabilities the threshold was tuned on. ``bf16`` (autocast) cuts CPU inference time by ~40 %;
    # the `demo` config trains in bf16 too.
    precision: Literal["fp32", "bf16"] = "fp32"
    n_overlays: int = 3

    def problems(self) -> list[tuple[str, str, str]]:
        """A threshold outside (0, 1) or NaN (``prob > threshold``) marks no voxel or every voxel: segment wrote
        lesion volume 0 for every case."""
        out = []
        if not 0 < self.threshold < 1:
            out.append(("threshold", f"{self.threshold} is not a probability in (0, 1)", "0.5"))
        if self.n_overlays < 0:
            out.append(("n_overlays", "must be >= 0", "3"))
        return out


@dataclass
class MoMEConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    curriculum: Literal["quadratic", "linear", "constant"] = "quadratic"
    # λ of the gate-supervision term (models.mome.gate_supervision_loss) under the curriculum weight: the
    # gate starts by routing each input to its own (MoME) / available (MoME+) experts; 0 = the reference
    gate_supervision: float = 0.0
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    cache_dir: str | None = None
    # Hold the preprocessed images in memory, or read them from the cache entries where cut (a cohort that
    # does not fit: BraTS at the paper grid); null = in memory when they fit in a quarter of the memory
    # available (data.preprocess.memory_budget).
    in_memory: bool | None = None
    seed: int = 0

    def problems(self) -> list[tuple[str, str, str]]:
        """The gate-supervision loss weight (a negative one would reward misrouting, NaN or inf spoil the loss),
        and the monitored validation metrics (both stages validate with :meth:`MoMETrainer.validation_end`)."""
        out = monitor_problems(self, {stage: VAL_METRICS for stage in ("pretrain", "train")})
        if not 0 <= self.gate_supervision < math.inf:
            out.append(("gate_supervision", f"{self.gate_supervision} is not a number >= 0", "0"))
        return out


def load_mome_config(
    preset: str | Path | None = "demo",
    overrides: list[str] | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> MoMEConfig:
    """Preset ← ``--set`` overrides ← ``--seed``/``--device`` (which also reach both train configs); the
    ``preprocessing`` keys are checked here too, so a typo is refused by every verb (``predict`` replays the model's
    own preprocessing and took ``--set preprocessing.spacng=4`` silently)."""
    cfg = load_family_config(MoMEConfig, FAMILY, preset, overrides, seed, device)
    _spec(cfg)
    return cfg


# --------------------------------------------------------------------------------------------- data


def _resolve_table(data: str | Path) -> tuple[pd.DataFrame, str]:
    from neuromoe.io.table import load_role_table

    return load_role_table(data, "lesion", "mask", "lesion masks")


def _spec(cfg: MoMEConfig) -> Any:
    from neuromoe.data.preprocess import PreprocSpec

    return PreprocSpec.from_overrides(cfg.preprocessing)


def _cache(cache_dir: str | None) -> Any:
    from neuromoe.data.preprocess import PreprocCache, default_cache_root

    return PreprocCache(default_cache_root(cache_dir))


def _unscored(data: str | Path, cfg: MoMEConfig, split: str, mods: Sequence[str]) -> dict[str, str]:
    """Rows of ``split`` that evaluate leaves out, with why: no lesion mask (rows with a ``split`` column
    only: without one, maskless rows take no part in the split) or none of the model's modalities."""
    from neuromoe.io.table import cohort_source, load_table

    out: dict[str, str] = {}
    full = load_table(cohort_source(data, "lesion"))
    if "split" in full.columns or split == "all":
        no_mask = full["mask"].isna() if "mask" in full.columns else pd.Series(True, index=full.index)
        for _, r in full[no_mask & (True if split == "all" else full["split"] == split)].iterrows():
            out[str(r.get("subject", "?"))] = "no lesion mask"
    table, _, splits = _table_and_split(data, cfg, every=split == "all")
    rows = splits == split
    have = [m for m in mods if m in table.columns]
    usable = table[have].notna().any(axis=1).to_numpy() if have else np.zeros(len(table), bool)
    for _, r in table[rows & ~usable].iterrows():
        out[str(r.get("subject", "?"))] = f"none of the model's modalities {list(mods)}"
    return out


def _whole_val(data: str | Path, cfg: MoMEConfig, spec: Any, val: list[LesionCase]) -> list[LesionCase]:
    """The validation cases over their whole field of view, as evaluate and segment see them: the threshold
    is tuned on those, not on the training shape's crop. Without a crop they are ``val``, the cases training
    already holds (loading them again held every validation image twice, outside the memory budget)."""
    if not cfg.eval.tune_threshold:
        return []
    if spec.shape is None:
        return val
    return _split_cases(data, cfg, replace(spec, shape=None), ("val",))["val"]


def _table_and_split(data: str | Path, cfg: MoMEConfig, *, every: bool = False) -> tuple[pd.DataFrame, str, np.ndarray]:
    """The cases with a lesion mask and their split (``split`` column, else stratified by lesion type);
    ``every``: all in split ``"all"`` (an external cohort, scored whole whatever its own split column says)."""
    from neuromoe.data.splits import assign_splits

    table, source = _resolve_table(data)
    if every:
        return table, source, np.full(len(table), "all")
    return table, source, assign_splits(table, seed=cfg.seed, stratify=("lesion_type",)).to_numpy()


def _case_prints(rows: pd.DataFrame, modalities: Sequence[str]) -> list[set[str]]:
    """Each case's fingerprints: its mask by path (lesion-free cases may share an empty mask byte for byte),
    its images by path and content."""
    return case_fingerprints(rows, ["mask", *modalities], path_only=["mask"])


def _fit_fingerprints(data: str | Path, cfg: MoMEConfig) -> list[str]:
    """Fingerprints of the train and val cases (fitting, checkpoint choice, threshold)."""
    table, _, split = _table_and_split(data, cfg)
    return sorted(set().union(*_case_prints(table[split != "test"], cfg.model.modalities)))


def _split_cases(
    data: str | Path, cfg: MoMEConfig, spec: Any, splits: Sequence[str]
) -> dict[str, list[LesionCase]]:
    """Preprocessed cases per split (``split`` column, else stratified by lesion type); cases with none of
    the model's modalities (e.g. DWI-only cases for a T1 expert) are left out."""
    table, source, split = _table_and_split(data, cfg, every="all" in splits)
    mods = [m for m in cfg.model.modalities if m in table.columns]
    usable = table[mods].notna().any(axis=1).to_numpy() if mods else np.zeros(len(table), bool)
    cache = _cache(cfg.cache_dir)
    n_cases = int((np.isin(split, list(splits)) & usable).sum())  # held at once: the memory budget counts them all
    return {
        s: load_lesion_cases(table[(split == s) & usable], spec, cfg.model.modalities, cache, source,
                             in_memory=cfg.in_memory, n_cases=n_cases)
        if ((split == s) & usable).any()
        else []
        for s in splits
    }


def _note_no_validation(cases: dict[str, list[LesionCase]], cfg: MoMEConfig) -> None:
    """Said, not silent: without validation cases the last epoch is kept and the threshold is not tuned."""
    if not cases["val"]:
        untuned = f" and the decision threshold stays at eval.threshold ({cfg.eval.threshold})"
        print("neuromoe: no validation cases: the last epoch's weights are kept"
              + (untuned if cfg.eval.tune_threshold else "") + " (give the table 'val' rows in its split column)",
              file=sys.stderr)


def _keep_trained_modalities(cfg: MoMEConfig, cases: dict[str, list[LesionCase]]) -> MoMEConfig:
    """Leave out of the model every configured modality without a training image (BraTS has no DWI): its
    expert could only stay at random weights and would still take a share of the gate's fusion. A copy: the
    caller's config keeps its modalities (reused for a cohort with DWI, it built a model without a DWI expert)."""
    present = [m for m in cfg.model.modalities if any(m in c["images"] for c in cases["train"])]
    for m in cfg.model.modalities:
        if m not in present:
            print(
                f"neuromoe: no training images for modality '{m}': the model leaves it out "
                "(model.modalities lists the ones to use)",
                file=sys.stderr,
            )
    return replace(cfg, model=replace(cfg.model, modalities=present)) if present else cfg


def _only(case: LesionCase, modality: str) -> LesionCase:
    return {**case, "images": {modality: case["images"][modality]}}


def _spacing(case: LesionCase) -> tuple[float, ...]:
    aff = np.asarray(case.get("affine", np.eye(4)))
    return tuple(float(v) for v in np.linalg.norm(aff[:3, :3], axis=0))


# ------------------------------------------------------------------------------------------ trainer


class MoMETrainer(Trainer):
    """Curriculum ``w(r)·L_expert + (1 − w(r))·L_fused`` with ``r = epoch / epochs`` (paper schedule).

    A plain U-Net (stage-1 expert or pooled baseline) is trained with the deep-supervised Dice+CE alone.
    Validation reports the fused loss only; ``fit_best`` keeps the best weights.
    """

    def __init__(self, *args: Any, schedule: str = "quadratic", gate_weight: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.schedule, self.expert_weight, self.gate_weight = schedule, 1.0, gate_weight

    def on_epoch_start(self, epoch: int) -> None:
        epochs = self.cfg.epochs
        if self.cfg.max_steps > 0:  # the run ends at max_steps: the curriculum must span the epochs that run
            per_epoch = math.ceil(len(self._epoch_batches(self.train_set, 0, False)) / self.cfg.accum_steps)
            epochs = min(epochs, math.ceil(self.cfg.max_steps / max(per_epoch, 1)))
        self.expert_weight = curriculum_weight(epoch, epochs, self.schedule)  # type: ignore[arg-type]
        if isinstance(self.train_set, LesionPatchDataset):
            self.train_set.set_epoch(epoch)

    def _forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float], Tensor]:
        """Loss, logs and the full-resolution (fused) logits."""
        if isinstance(self.model, MoME):
            out = self.model(batch["image"], batch.get("available"))
            mod = batch["modality"] if (batch["modality"] >= 0).all() else None
            loss, logs = mome_loss(
                out,
                batch["mask"],
                mod,
                self.expert_weight,
                gate_weight=self.gate_weight,
                available=batch.get("available") if mod is None else None,
            )
            return loss, logs, out.logits[0]
        logits = self.model(batch["image"])
        loss = deep_supervised_loss(logits, batch["mask"])
        return loss, {"loss": float(loss.detach())}, logits[0]

    def training_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return self._forward(batch)[:2]

    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        if isinstance(self.model, MoME):
            scales = self.model(batch["image"], batch.get("available")).logits  # the fused output
        else:
            scales = self.model(batch["image"])
        logits = scales[0]
        prob = logits.float().softmax(1)[:, 1].flatten(1)
        gt = batch["mask"].flatten(1) > 0.5
        pred = prob[None] > torch.as_tensor(THRESHOLDS, device=prob.device)[:, None, None]
        return {
            "loss_sums": [dice_ce_sums(lg, batch["mask"]) for lg in scales],
            "tp": (pred & gt).sum((1, 2)).cpu().numpy(),
            "n_pred": pred.sum((1, 2)).cpu().numpy(),
            "n_gt": int(gt.sum()),
        }

    def validation_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        """Fused validation loss (the deep-supervised batch Dice+CE of all validation patches as one batch, from
        additive statistics, so neither the batch size, the last short batch nor the number of DDP ranks changes
        it; a mean of per-batch batch-Dice losses moved with them), and the Dice over all validation patches
        (best candidate threshold, 0.5)."""
        tp = np.sum([o["tp"] for o in outputs], 0)
        total = np.sum([o["n_pred"] for o in outputs], 0) + sum(o["n_gt"] for o in outputs)
        dice = np.where(total > 0, 2 * tp / np.maximum(total, 1), 1.0)
        best = int(np.argmax(dice))
        return {
            "val_loss": sum(w * dice_ce_from_sums(np.sum([o["loss_sums"][i] for o in outputs], 0))
                            for i, w in enumerate(deep_supervision_weights(len(outputs[0]["loss_sums"])))),
            "val_dice": float(dice[best]),
            "val_dice_p50": float(dice[int(np.argmin(np.abs(THRESHOLDS - 0.5)))]),
        }

    def threshold(
        self,
        ev: EvalSection,
        val_cases: Sequence[LesionCase],
        modalities: Sequence[str],
        patch_size: Sequence[int],
        multimodal: bool = False,
    ) -> float:
        """The decision threshold to store with the model: ``ev.threshold``, or with ``ev.tune_threshold``
        (and validation cases) the one with the best mean Dice on the whole validation volumes (shared out
        over the DDP ranks)."""
        if not (ev.tune_threshold and val_cases):
            return ev.threshold

        def case_scores(case: LesionCase) -> list[list[float]]:
            return [
                [_dice(pred.prob > t, case["mask"] > 0) for t in THRESHOLDS]
                for pred in (
                    predict_volume(
                        self.model, image, patch_size, available=avail, device=self.device, precision=ev.precision
                    )
                    for _, image, avail in _case_runs(case, modalities, multimodal)
                )
            ]

        scores = [row for rows in map_over_ranks(case_scores, list(val_cases)) for row in rows]
        return float(THRESHOLDS[int(np.argmax(np.mean(scores, 0)))])


# ---------------------------------------------------------------------------------------- inference


@dataclass
class VolumePrediction:
    """Lesion probability ``(*S)``; for MoME also the full-resolution gate ``(E, *S)``, each expert's own
    lesion probability ``(E, *S)`` (zeros for experts a sparse router skipped) and the gate share ``(E,)``."""

    prob: np.ndarray
    gate: np.ndarray | None = None
    expert_prob: np.ndarray | None = None
    gate_share: np.ndarray | None = None


def _flips(spatial_dims: int, tta: bool) -> list[tuple[int, ...]]:
    axes = range(2, 2 + spatial_dims)
    return [c for n in range(spatial_dims + 1) for c in itertools.combinations(axes, n)] if tta else [()]


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    *,
    available: np.ndarray | None = None,
    tta: bool = False,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    sw_batch_size: int | None = None,
) -> VolumePrediction:
    """Predict one volume ``image (C, *S)``.

    MONAI sliding window (overlap 0.5, Gaussian weighting, ``sw_batch_size`` windows per forward) over
    full-resolution fused logits; with ``tta`` the outputs are averaged over all mirror flips. The gate share
    is the lesion-weighted mean of the full-resolution gate. On the CPU the 3D windows run in channels_last_3d,
    4 per forward (oneDNN's 3D convolutions: a whole volume ~25 % faster, docs/benchmarks.md; the model leaves
    in the default layout); on a GPU 2 per forward, as before (the paper's 128³ windows hold 5 experts' and the
    gate's full-resolution maps). A sparse router's choice is per forward, so which windows an expert ran on
    depends on how windows are grouped.
    """
    if precision not in ("fp32", "bf16"):
        raise ConfigError(
            f"precision must be 'fp32' or 'bf16', got {precision!r}", fix="--precision fp32|bf16"
        )
    model.eval()
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    x = torch.as_tensor(image, dtype=torch.float32, device=device)[None]
    avail = (
        torch.as_tensor(available, dtype=torch.float32, device=device)[None]
        if available is not None
        else None
    )
    is_mome = isinstance(model, MoME)
    channels_last = device.type == "cpu" and x.ndim == 5
    sw_batch_size = sw_batch_size or (4 if device.type == "cpu" else 2)

    def predictor(patch: Tensor) -> tuple[Tensor, ...]:
        if channels_last:
            patch = patch.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if not is_mome:
                return (model(patch)[0].float().softmax(1)[:, 1:],)
            out = model(patch, None if avail is None else avail.expand(patch.shape[0], -1))
            experts = torch.zeros(patch.shape[0], model.num_experts, *patch.shape[2:], device=patch.device)
            ran = torch.zeros_like(experts)  # sparse: which experts ran in this window
            for k, lg in out.expert_logits.items():
                experts[:, k] = lg[0].float().softmax(1)[:, 1]
                ran[:, k] = 1.0
            return out.logits[0].float().softmax(1)[:, 1:], out.gates[0].float(), experts, ran

    flips = _flips(x.ndim - 2, tta)
    sums: list[Tensor] = []
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    try:
        for axes in flips:
            xi = x.flip(axes) if axes else x
            outs = sliding_window_inference(xi, tuple(patch_size), sw_batch_size, predictor, overlap=0.5,
                                            mode="gaussian")
            outs = (outs,) if isinstance(outs, Tensor) else outs
            outs = [o.flip(axes) if axes else o for o in outs]
            sums = outs if not sums else [a + b for a, b in zip(sums, outs, strict=True)]
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    maps = [(s / len(flips))[0].cpu().numpy() for s in sums]
    pred = VolumePrediction(maps[0][0])
    if is_mome:
        # an expert's probability averaged over the windows where it ran; NaN where it never ran (sparse)
        pred.gate, pred.expert_prob = maps[1], np.where(maps[3] > 0, maps[2] / np.maximum(maps[3], 1e-12), np.nan)
        w = np.clip(pred.prob, 1e-3, None)
        pred.gate_share = (pred.gate * w).reshape(len(pred.gate), -1).sum(1) / w.sum()
    return pred


def _case_runs(
    case: LesionCase, modalities: Sequence[str], multimodal: bool
) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, image (C, *S), availability) per prediction: one per modality (MoME) or one per case (MoME+)."""
    present = [m for m in modalities if m in case["images"]]
    if not multimodal:
        return [(m, case["images"][m][None], None) for m in present]
    shape = case["mask"].shape
    image = np.stack([case["images"].get(m, np.zeros(shape, np.float32)) for m in modalities])
    return [("+".join(present), image, np.array([m in case["images"] for m in modalities], np.float32))]


def evaluate_cases(
    model: nn.Module,
    cases: Sequence[LesionCase],
    modalities: Sequence[str],
    patch_size: Sequence[int],
    *,
    multimodal: bool = False,
    tta: bool = False,
    threshold: float = 0.5,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    on_prediction: Callable[[int, str, VolumePrediction], None] | None = None,
) -> pd.DataFrame:
    """One row per (case, modality) (MoME, U-Net) or per case (MoME+): metrics, the case's metadata, the
    gate share per expert and, for MoME, the Dice each expert alone reaches on that image
    (``expert_dice_<m>``, the specialisation check)."""
    rows = []
    for ci, case in enumerate(cases):
        spacing = _spacing(case)
        gt = case["mask"] > 0
        for name, image, avail in _case_runs(case, modalities, multimodal):
            pred = predict_volume(
                model, image, patch_size, available=avail, tta=tta, device=device, precision=precision
            )
            row = {
                **case["meta"],
                "modality": name,
                **segmentation_metrics(pred.prob > threshold, gt, spacing),
            }
            if pred.gate_share is not None:
                row.update({f"gate_{m}": float(s) for m, s in zip(modalities, pred.gate_share, strict=True)})
            if pred.expert_prob is not None and not multimodal:
                for m, ep in zip(modalities, pred.expert_prob, strict=True):
                    # scored only if the expert ran on the whole volume (sparse routing is per window), and only
                    # on a case with a lesion: an empty mask scores 1 for an expert that finds nothing anywhere
                    ran = np.isfinite(ep).all() and gt.any()
                    row[f"expert_dice_{m}"] = _dice(ep > threshold, gt) if ran else float("nan")
            rows.append(row)
            if on_prediction is not None:
                on_prediction(ci, name, pred)
    return pd.DataFrame(rows)


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    inter, total = np.logical_and(pred, gt).sum(), pred.sum() + gt.sum()
    return 1.0 if total == 0 else float(2 * inter / total)


# ------------------------------------------------------------------------------------- model helpers


def _model_kwargs(m: ModelSection) -> dict[str, Any]:
    kw: dict[str, Any] = {"logit_skip": m.logit_skip}
    if m.widths is not None:
        kw["widths"] = list(m.widths)
    if m.kind == "mome":
        kw.update(
            modalities=list(m.modalities), gate_norm=m.gate_norm, multimodal=m.multimodal, top_k=m.top_k
        )
        if m.gate_widths is not None:
            kw["gate_widths"] = list(m.gate_widths)
    return kw


def _load_experts(model: MoME, experts: str | Path, modalities: Sequence[str]) -> tuple[list[str], set[str]]:
    """Copy stage-1 experts (``experts/<modality>`` model folders) into ``model``; returns those loaded and
    the fingerprints of the cases they were fitted on."""
    from neuromoe.models.registry import load_model

    root = Path(experts)
    if (root / "experts").is_dir():
        root = root / "experts"
    if not root.is_dir():
        raise InputError(
            "experts folder not found", path=root, fix="pass the run folder written by 'pretrain'"
        )
    loaded, prints = [], set()
    for k, m in enumerate(modalities):
        if not (root / m).is_dir():
            print(f"neuromoe: no stage-1 expert for '{m}' in {root}: it starts from random weights",
                  file=sys.stderr)
            continue
        expert, meta = load_model(root / m)
        prints |= set(meta.get("extra", {}).get("fit_fingerprints", []))
        if expert.logit_skip != model.experts[k].logit_skip:  # same parameters, different outputs
            raise ModelFormatError(
                f"expert '{m}' was trained with logit_skip={expert.logit_skip}, this MoME uses "
                f"logit_skip={model.experts[k].logit_skip}",
                path=root / m,
                fix="set model.logit_skip as in 'pretrain' (or re-run it)",
            )
        try:
            model.experts[k].load_state_dict(expert.state_dict(), strict=True)
        except RuntimeError:
            raise ModelFormatError(
                f"expert '{m}' does not match the MoME expert architecture",
                path=root / m,
                fix="use the same --config preset (and widths) as 'pretrain'",
            ) from None
        loaded.append(m)
    if not loaded:
        raise InputError(
            f"no expert folders for {list(modalities)}",
            path=root,
            fix="pass the run folder written by 'neuromoe pretrain --family mome'",
        )
    return loaded, prints


def _load(model_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    from neuromoe.models.registry import load_model, require_meta

    model, meta = load_model(model_dir)
    if meta.get("family") != FAMILY or meta.get("extra", {}).get("kind") not in ("mome", "unet", "expert"):
        raise ModelFormatError(
            "not a MoME model directory",
            path=model_dir,
            fix="pass the 'model' folder written by 'neuromoe train --family mome'",
        )
    require_meta(meta, ("preprocessing", "extra.modalities", "extra.patch_size", "extra.multimodal"), model_dir)
    return model.eval(), meta


def _new_section(title: str) -> Any:
    from neuromoe.eval.report import Report

    return Report("MoME / MoME+").section(title)


# ------------------------------------------------------------------------------------------ pretrain


def _stage1_unet(
    cfg: MoMEConfig,
    cases: dict[str, list[LesionCase]],
    whole_val: list[LesionCase],
    mods: Sequence[str],
    samples_per_epoch: int,
    seed: int,
    run_dir: Path,
    init: dict[str, Tensor] | None,
    resume: bool,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]] | None:
    """One stage-1 U-Net trained on the ``mods`` images of the training cases (one modality: an expert; all: the
    shared warm start) → the model, its report row and its model-folder metadata; None without images."""
    from neuromoe.models.registry import create_model

    d = cfg.data
    tr = [_only(c, m) for c in cases["train"] for m in mods if m in c["images"]]
    va = [_only(c, m) for c in cases["val"] for m in mods if m in c["images"]]
    if not tr:
        return None
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"logit_skip": cfg.model.logit_skip}
    if cfg.model.widths is not None:
        kw["widths"] = list(cfg.model.widths)
    unet = create_model(f"unet_{cfg.model.preset}", **kw)
    if init is not None:
        unet.load_state_dict(init)
    train_set = LesionPatchDataset(
        tr, d.patch_size, modalities=mods, fg_fraction=d.fg_fraction, augment=d.augment,
        samples_per_epoch=samples_per_epoch or None, seed=seed,
    )
    val_set = LesionPatchDataset(va, d.patch_size, modalities=mods, seed=cfg.seed + 1000) if va else None
    trainer = MoMETrainer(unet, cfg.pretrain, train_set, val_set, run_dir=run_dir)
    best = trainer.fit_best(resume).best_metric
    whole = [_only(c, m) for c in whole_val for m in mods if m in c["images"]]
    threshold = trainer.threshold(cfg.eval, whole, mods, d.patch_size)  # on the training device, before .cpu()
    row = {"train images": len(tr), "val images": len(va), "best val loss": best}
    extra = {
        "modalities": list(mods),
        "patch_size": list(d.patch_size),
        "multimodal": False,
        "threshold": threshold,
        "precision": resolve_precision(cfg.eval.precision, trainer.device),  # what tuned the threshold
        "best_val_loss": best,
        "split_seed": cfg.seed,
        "n_train_images": len(tr),
    }
    return unet, row, extra


@pipeline_entry()
def pretrain(
    data: str | Path, out: str | Path, cfg: MoMEConfig | None = None, *, resume: bool = False
) -> Path:
    """Stage 1: each modality's expert U-Net trained alone on that modality's images → ``out/experts/<m>``;
    with ``data.shared_samples_per_epoch`` every expert starts from one U-Net first trained on all modalities'
    images (→ ``out/shared``, a pooled U-Net ``segment`` takes)."""
    from neuromoe.models.registry import save_model

    cfg = cfg or load_mome_config()
    out = Path(out)
    spec = _spec(cfg)
    cases = _split_cases(data, cfg, spec, ("train", "val"))
    whole_val = _whole_val(data, cfg, spec, cases["val"])
    fit_prints = _fit_fingerprints(data, cfg)
    _note_no_validation(cases, cfg)
    cfg = _keep_trained_modalities(cfg, cases)
    save_config(cfg, out, resume=resume)
    d, mods = cfg.data, cfg.model.modalities

    def save(model: nn.Module, folder: Path, kind: str, extra: dict[str, Any]) -> None:
        if is_main_process():
            meta = {"kind": kind, **extra, "fit_fingerprints": fit_prints}
            save_model(model.cpu(), folder, {"family": FAMILY, "preprocessing": spec.to_dict(), "extra": meta})

    rows, init = [], None
    if d.shared_samples_per_epoch:
        seed = cfg.seed + len(mods)  # the experts use cfg.seed + k
        fitted = _stage1_unet(cfg, cases, whole_val, mods, d.shared_samples_per_epoch, seed,
                              out / "stage1" / "shared", None, resume)
        if fitted is not None:
            shared, row, extra = fitted
            init = {k: v.detach().clone() for k, v in shared.state_dict().items()}
            rows.append({"expert": "shared", **row})
            save(shared, out / "shared", "unet", extra)
    for k, m in enumerate(mods):
        fitted = _stage1_unet(cfg, cases, whole_val, (m,), d.expert_samples_per_epoch or d.samples_per_epoch,
                              cfg.seed + k, out / "stage1" / m, init, resume)
        if fitted is None:
            continue
        expert, row, extra = fitted
        rows.append({"expert": m, **row})
        save(expert, out / "experts" / m, "expert", extra)  # the next expert's training is the next collective
    if not rows:
        raise InputError(
            f"no training images for any of {mods}",
            path=str(data),
            fix="check the modality columns of the lesion manifest",
        )
    if not finish_training():
        return out
    atomic_write_json(out / "experts" / "summary.json", rows, strict=True)
    _add_pretrain(out, cfg, rows)
    return out


def _add_pretrain(out: Path, cfg: MoMEConfig, rows: list[dict[str, Any]]) -> None:
    """The stage-1 report section: one row and one pair of curves per modality expert."""
    from neuromoe.eval.plots import expert_curves

    section = _new_section("MoME: stage-1 modality experts")
    section.add_text(
        f"One '{cfg.model.preset}' expert U-Net per modality, trained alone on that modality's images "
        f"({list(cfg.data.patch_size)} patches, foreground fraction {cfg.data.fg_fraction}); 'neuromoe train "
        "--family mome --experts' fuses them with the gate."
        + (" Every expert started from the 'shared' U-Net, trained first on all modalities' images pooled "
           f"({cfg.data.shared_samples_per_epoch} patches per epoch; saved as 'shared')."
           if cfg.data.shared_samples_per_epoch else "")
    )
    section.add_table(rows, "Stage-1 experts (validation loss = deep-supervised Dice+CE; NaN: no validation images).")
    curves = {r["expert"]: out / "stage1" / r["expert"] / "metrics.csv" for r in rows}
    curves = {m: pd.read_csv(p) for m, p in curves.items() if p.is_file()}
    if "shared" in curves:  # the experts' steps continue the shared U-Net's
        for m, frame in curves.items():
            if m != "shared":
                frame["step"] += curves["shared"]["step"].max()
    for metric, caption in (("loss", "Train (dashed) and validation (solid) loss per expert."),
                            ("dice", "Validation Dice per expert (best threshold on its own modality).")):
        section.add_figure(expert_curves(curves, metric, title=f"stage-1 experts: {metric}"), caption)
    section.save(out)


# --------------------------------------------------------------------------------------------- train


def _check_expert_leak(data: str | Path, cfg: MoMEConfig, expert_prints: set[str], experts: str | Path) -> None:
    """Refuse a stage 2 whose test cases trained or tuned the stage-1 experts (another seed's split, or another
    split column): its test metrics would be optimistic."""
    table, source, split = _table_and_split(data, cfg)
    test = _case_prints(table[split == "test"], cfg.model.modalities)
    leaked = sum(bool(expert_prints & prints) for prints in test)
    if leaked:
        raise InputError(
            f"{leaked} of the {len(test)} test cases were used to train or tune the stage-1 experts in {experts}",
            path=source,
            fix="train stage 2 with the --seed of 'pretrain', or give both steps the same 'split' column",
        )


@pipeline_entry()
def train(
    data: str | Path,
    out: str | Path,
    cfg: MoMEConfig | None = None,
    *,
    experts: str | Path | None = None,
    resume: bool = False,
) -> Path:
    """Stage 2: MoME (MoME+ with ``model.multimodal``, sparse with ``model.top_k``) with the curriculum, or
    the pooled U-Net baseline (``model.kind: unet``) → ``out/model``."""
    from neuromoe.models.registry import create_model, save_model

    cfg = cfg or load_mome_config()
    out = Path(out)
    m, d = cfg.model, cfg.data
    if cfg.gate_supervision and m.gate_norm != "softmax":
        raise ConfigError(
            "gate_supervision needs normalised gates", fix="set model.gate_norm=softmax or gate_supervision=0"
        )
    spec = _spec(cfg)
    cases = _split_cases(data, cfg, spec, ("train", "val"))
    if not cases["train"]:
        raise InputError("no training cases", path=str(data), fix="add 'train' rows to the split column")
    _note_no_validation(cases, cfg)
    cfg = _keep_trained_modalities(cfg, cases)
    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = create_model(f"{m.kind}_{m.preset}", **_model_kwargs(m))
    loaded: list[str] = []
    expert_prints: set[str] = set()
    if experts is not None:
        if not isinstance(model, MoME):
            raise InputError(
                "--experts only applies to MoME", path=experts, fix="drop --experts or use model.kind=mome"
            )
        loaded, expert_prints = _load_experts(model, experts, m.modalities)
        _check_expert_leak(data, cfg, expert_prints, experts)
    multimodal = m.kind == "mome" and m.multimodal
    train_set = LesionPatchDataset(
        cases["train"],
        d.patch_size,
        modalities=m.modalities,
        multimodal=multimodal,
        fg_fraction=d.fg_fraction,
        augment=d.augment,
        modality_dropout=d.modality_dropout if multimodal else 0.0,
        samples_per_epoch=d.samples_per_epoch or None,
        seed=cfg.seed,
    )
    val_set = (
        LesionPatchDataset(
            cases["val"], d.patch_size, modalities=m.modalities, multimodal=multimodal, seed=cfg.seed + 1000
        )
        if cases["val"]
        else None
    )
    save_config(cfg, out, resume=resume)
    trainer = MoMETrainer(
        model,
        cfg.train,
        train_set,
        val_set,
        run_dir=out,
        schedule=cfg.curriculum,
        gate_weight=cfg.gate_supervision,
    )
    best = trainer.fit_best(resume).best_metric
    threshold = trainer.threshold(cfg.eval, _whole_val(data, cfg, spec, cases["val"]), m.modalities, d.patch_size, multimodal)
    if not finish_training():
        return out
    save_model(
        model.cpu(),
        out / "model",
        {
            "family": FAMILY,
            "preprocessing": spec.to_dict(),
            "extra": {
                "kind": m.kind,
                "modalities": list(m.modalities),
                "patch_size": list(d.patch_size),
                "multimodal": multimodal,
                "top_k": m.top_k if m.kind == "mome" else 0,
                "gate_norm": m.gate_norm,
                "curriculum": cfg.curriculum,
                "experts_loaded": loaded,
                "threshold": threshold,
                "threshold_tuned": bool(cfg.eval.tune_threshold and cases["val"]),
                "precision": resolve_precision(cfg.eval.precision, trainer.device),  # what tuned the threshold
                "best_val_loss": best,
                "split_seed": cfg.seed,
                "n_train_cases": len(cases["train"]),
                # stage 2's train + val cases and those the stage-1 experts were fitted on
                "fit_fingerprints": sorted(set(_fit_fingerprints(data, cfg)) | expert_prints),
            },
        },
    )
    _add_train(out, cfg, loaded, len(cases["train"]), len(cases["val"]), best, threshold)
    return out


def _add_train(out: Path, cfg: MoMEConfig, loaded: list[str], n_train: int, n_val: int, best: float,
               threshold: float) -> None:
    """How stage 2 was set up and trained (Dice and gate shares on held-out cases: ``evaluate``)."""
    m = cfg.model
    if m.kind == "mome":
        title = "MoME+: stage-2 training" if m.multimodal else "MoME: stage-2 training"
        what = (f"MoME over the {', '.join(m.modalities)} experts "
                f"({'stage-1 weights: ' + ', '.join(loaded) if loaded else 'no stage-1 weights, from scratch'}); "
                f"{m.gate_norm} gate at every decoder scale"
                + (f", sparse top-{m.top_k} case router" if m.top_k else "")
                + (f", any-subset soft dispatch with modality dropout {cfg.data.modality_dropout}" if m.multimodal
                   else "") + f", {cfg.curriculum} curriculum")
    else:
        title = "Pooled U-Net baseline: training"
        what = f"U-Net on every modality's images pooled ({', '.join(m.modalities)})"
    section = _new_section(title)
    section.add_text(
        f"'{m.preset}' {what}. {n_train} training and {n_val} validation cases, {list(cfg.data.patch_size)} patches "
        f"with foreground fraction {cfg.data.fg_fraction}. Best validation loss "
        f"{f'{best:.4f}' if np.isfinite(best) else 'n/a (no validation cases)'}; lesion threshold {threshold:.2f}."
    )
    section.save(out)


# ------------------------------------------------------------------------------------------ evaluate


def _summary(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Means per group; ``n_hd95`` counts the predictions whose HD95 is defined (a missed lesion or a false
    positive on a lesion-free scan has none), since the HD95 mean leaves the others out."""
    cols = [c for c in SUMMARY_METRICS if c in frame.columns]
    g = frame.groupby(by, dropna=False)
    return g[cols].mean().round(4).assign(n=g.size(), n_hd95=g["hd95"].count()).reset_index()


@removes_on_error("metrics.json", "per_case.csv", "report/section.json")
@pipeline_entry()
def evaluate(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    tta: bool = False,
    device: str = "auto",
    seed: int | None = None,
    cache_dir: str | None = None,
    n_overlays: int = 3,
    precision: str | None = None,
    section: Any = None,
) -> Path:
    """Per case × modality Dice, HD95, lesion-wise F1 and absolute volume difference → ``out/per_case.csv``,
    ``out/metrics.json`` (means per dataset / modality / lesion type, expert specialisation matrix) and a
    report section with the tables, contour overlays and gate maps (added to ``section`` when given).
    ``precision`` defaults to the one the model's threshold was tuned with. ``split="all"`` scores every case
    (an external cohort), refusing cases the model was fitted on, as for 'test'."""
    from neuromoe.data.preprocess import PreprocSpec

    out = Path(out)
    model, meta = _load(model_dir)
    extra = meta["extra"]
    mods = extra["modalities"]
    precision = precision or extra.get("precision", "fp32")
    if seed is None:  # the split seed the model was trained with (cases without a 'split' column)
        seed = int(extra.get("split_seed", 0))
    cfg = MoMEConfig(cache_dir=cache_dir, seed=seed)
    cfg.model.modalities = list(mods)
    # the whole field of view, as segment sees it: the training shape cut lesion voxels out of the ground
    # truth (a case's lesion 7.0 → 6.3 mL), and its Dice, HD95 and volume then described part of the lesion
    spec = replace(PreprocSpec.from_dict(meta["preprocessing"]), shape=None)
    table, source, splits = _table_and_split(data, cfg, every=split == "all")
    if split in ("test", "all"):  # a split drawn anew (no split column, other row order) may hold fitted cases
        rows = table[splits == split]
        refuse_fitted(extra.get("fit_fingerprints", []), _case_prints(rows, mods), source, "cases", "train or tune",
                      split=split, names=rows["subject"].astype(str).tolist())
    cases = _split_cases(data, cfg, spec, (split,))[split]
    if split == "test" and "split" not in table.columns and cases:  # said: --split all scores an external cohort
        print(f"neuromoe: {source} has no split column: scoring the {len(cases)} of {len(table)} cases that the "
              "model's seed puts in 'test' (--split all scores every case of an external cohort)", file=sys.stderr)
    if not cases:
        if split != "all" and not _unscored(data, cfg, split, mods):  # not "no case has a mask": every case may have one
            raise InputError(f"the split has no '{split}' case (train {int((splits == 'train').sum())}, val "
                             f"{int((splits == 'val').sum())}, test {int((splits == 'test').sum())})", path=source,
                             fix="choose another --split, or give the table a split column")
        raise InputError(f"no '{split}' case has a lesion mask and one of the model's modalities {list(mods)}",
                         path=str(data), fix="choose another --split, or add the masks")
    skipped = _unscored(data, cfg, split, mods)
    if skipped:  # said, not silent: the means below describe fewer cases than the split has
        print(f"neuromoe: {len(skipped)} '{split}' rows not scored: "
              + "; ".join(f"{k} ({v})" for k, v in list(skipped.items())[:5]) + (" …" if len(skipped) > 5 else ""),
              file=sys.stderr)
    dev = resolve_device(device)
    model.to(dev)
    maps: list[tuple[int, str, VolumePrediction]] = []

    plan = _overlay_plan([[m for m in mods if m in c["images"]] for c in cases], mods, n_overlays,
                         extra["multimodal"])

    def keep(ci: int, name: str, pred: VolumePrediction) -> None:
        if ci in plan and plan[ci] in (None, name):
            maps.append((ci, name, pred))

    frame = evaluate_cases(
        model,
        cases,
        mods,
        extra["patch_size"],
        multimodal=extra["multimodal"],
        tta=tta,
        threshold=extra.get("threshold", 0.5),
        precision=precision,
        device=dev,
        on_prediction=keep,
    )
    metrics: dict[str, Any] = {
        "split": split,
        "n_cases": len(cases),
        "n_subjects": len({str(c["meta"].get("subject", i)) for i, c in enumerate(cases)}),
        "skipped": skipped,
        "n_predictions": len(frame),
        "tta": tta,
        "kind": extra["kind"],
        "multimodal": extra["multimodal"],
        "threshold": extra.get("threshold", 0.5),
        "precision": precision,
        "mean": {**frame[list(SUMMARY_METRICS)].mean().round(4).to_dict(), "n_hd95": int(frame["hd95"].count())},
    }
    for by in ("modality", "lesion_type", "dataset"):
        if by in frame.columns:
            metrics[f"by_{by}"] = _summary(frame, by).set_index(by).to_dict(orient="index")
    spec_cols = [f"expert_dice_{m}" for m in mods if f"expert_dice_{m}" in frame.columns]
    if spec_cols:
        mat = (
            frame.groupby("modality")[spec_cols]
            .mean()
            .reindex([m for m in mods if m in set(frame["modality"])])
        )
        metrics["expert_dice"] = {
            e.removeprefix("expert_dice_"): mat[e].round(4).to_dict() for e in spec_cols
        }
    with atomic_path(out / "per_case.csv") as tmp:
        frame.to_csv(tmp, index=False)
    atomic_write_json(out / "metrics.json", metrics, strict=True)
    own = section is None
    section = _new_section(f"MoME: lesion segmentation ('{split}' cases)") if own else section
    _add_evaluation(section, metrics, frame, cases, maps, mods)
    if own:
        section.save(out)
    return out


def _add_evaluation(
    section: Any,
    metrics: dict[str, Any],
    frame: pd.DataFrame,
    cases: Sequence[LesionCase],
    maps: list[tuple[int, str, VolumePrediction]],
    mods: Sequence[str],
) -> None:
    mean, split = metrics["mean"], metrics["split"]
    scored = {"all": "Every case of an external cohort", "test": "Held-out 'test' cases",
              "val": "'val' cases — in-sample: they chose the checkpoint and the threshold",
              "train": "'train' cases — in-sample: they fitted the model"}[split]
    section.add_text(
        f"{scored} (n={metrics['n_cases']}"
        + (f" cases of {metrics['n_subjects']} subjects" if metrics.get("n_subjects", metrics["n_cases"])
           != metrics["n_cases"] else "")
        + f", {metrics['n_predictions']} predictions; "
        f"{'MoME+: all available modalities at once' if metrics['multimodal'] else 'one prediction per input modality; the modality is not given to the model, the gate sees only the image'}"
        f"{', mirror TTA' if metrics['tta'] else ''}). Mean Dice {mean['dice']:.3f}, HD95 {mean['hd95']:.1f} mm "
        f"(over the {mean['n_hd95']} predictions where it is defined: both masks non-empty or both empty), "
        f"lesion-wise F1 {mean['lesion_f1']:.3f}, |volume difference| {mean['abs_volume_diff_ml']:.2f} mL. "
        "Means are over predictions, so a case counts once per modality it was predicted from."
        + (f" Not scored: {', '.join(f'{k} ({v})' for k, v in metrics['skipped'].items())}."
           if metrics.get("skipped") else "")
    )
    for by, caption in (
        ("modality", "per input modality"),
        ("lesion_type", "per lesion type"),
        ("dataset", "per dataset"),
    ):
        if by in frame.columns:
            section.add_table(_summary(frame, by), f"Mean metrics {caption}.")
    if "expert_dice" in metrics:
        rows = [
            {"image modality": m, **{f"expert {e}": v.get(m) for e, v in metrics["expert_dice"].items()}}
            for m in next(iter(metrics["expert_dice"].values()))
        ]
        section.add_table(rows, "Expert specialisation: Dice of each expert alone (rows: image modality).")
    if maps:
        section.add_figure(
            _overlay_figure(cases, maps, mods, metrics["threshold"]),
            "One case per row (input modalities in turn), axial slice through the largest lesion area: ground "
            f"truth (green) and prediction (red, probability > {metrics['threshold']:g}, the model's threshold) "
            "contours, then the full-resolution gate weight of each expert (0–1); in brackets the expert's gate "
            "share over the volume, weighted by the predicted lesion probability.",
        )


def _overlay_plan(present: Sequence[Sequence[str]], mods: Sequence[str], n: int,
                  multimodal: bool) -> dict[int, str | None]:
    """Which prediction of which case the report's overlays show, chosen before inference from each case's
    modalities (``present``): one case per row, the model's modalities in turn, each from the first case not yet
    shown that has it (else the next modality in turn). Each case's first prediction was shown, always its T1 —
    the modality the demo model segments worst, and the only one of the T1-only (stroke) cases that come first.
    ``{case: modality}``; ``None`` = the case's one MoME+ prediction."""
    plan: dict[int, str | None] = {}
    for j in range(min(n, len(present))):
        order = [*mods[j % len(mods):], *mods[:j % len(mods)]]
        free = [ci for ci in range(len(present)) if ci not in plan and present[ci]]
        if not free:
            break
        ci, m = next(((ci, m) for m in order for ci in free if m in present[ci]), (free[0], present[free[0]][0]))
        plan[ci] = None if multimodal else m
    return plan


def _overlay_figure(
    cases: Sequence[LesionCase],
    maps: list[tuple[int, str, VolumePrediction]],
    mods: Sequence[str],
    threshold: float = 0.5,
) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_gate = len(mods) if maps[0][2].gate is not None else 0
    fig, axes = plt.subplots(
        len(maps), 1 + n_gate, figsize=(2.4 * (1 + n_gate), 2.6 * len(maps)), squeeze=False
    )
    for r, (ci, name, pred) in enumerate(maps):
        case = cases[ci]
        gt = case["mask"] > 0
        z = int(gt.sum((0, 1)).argmax()) if gt.any() else gt.shape[2] // 2
        first = name.split("+")[0]
        img = case["images"][first][:, :, z]
        ax = axes[r, 0]
        ax.imshow(np.rot90(img), cmap="gray")
        for mask, colour in ((gt[:, :, z], "lime"), (pred.prob[:, :, z] > threshold, "red")):
            if mask.any():
                ax.contour(np.rot90(mask.astype(float)), levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"{case['meta'].get('subject', ci)} · {name}", fontsize=8)
        for k in range(n_gate):
            ax = axes[r, 1 + k]
            ax.imshow(np.rot90(pred.gate[k][:, :, z]), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"gate {mods[k]} ({pred.gate_share[k]:.2f})", fontsize=8)
        for ax in axes[r]:
            ax.set_axis_off()
    fig.tight_layout()
    if n_gate:  # one 0–1 scale for every gate panel, beside the figure (a bar per row shrank the last panel)
        from matplotlib.cm import ScalarMappable

        fig.colorbar(ScalarMappable(cmap="viridis"), ax=axes[:, 1:].ravel().tolist(), fraction=0.02,
                     label="gate weight")
    return fig


# ------------------------------------------------------------------------------------------- segment


def _segment_case(
    model: nn.Module,
    meta: dict[str, Any],
    paths: dict[str, str | Path],
    output: Path,
    *,
    probabilities: bool,
    tta: bool,
    precision: str,
    device: torch.device,
    cache: Any = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Segment one case; nothing is written unless every input is valid."""
    import nibabel as nib
    from scipy import ndimage

    from neuromoe.data.preprocess import PreprocSpec, preprocess_case
    from neuromoe.io.nifti import load_role, nifti_image, resample_to_grid

    extra = meta["extra"]
    mods = list(extra["modalities"])
    if not paths:
        raise InputError("no input images", path=output, fix=f"give at least one of --{' --'.join(mods)}")
    unknown = [m for m in paths if m not in mods]
    if unknown:
        raise InputError(
            f"model has no expert for {unknown}", path=paths[unknown[0]], fix=f"give images of {mods}"
        )
    ordered = [m for m in mods if m in paths]
    if reference is not None:
        if reference not in paths:
            raise InputError(f"reference modality {reference} is not among the inputs {ordered}", path=output,
                             fix=f"give --{reference}, or a --reference among {ordered}")
        ordered = [reference, *(m for m in ordered if m != reference)]  # the first is the mask's grid
    sidecar_path, prob_path = _with_suffix(output, ".json"), _with_suffix(output, "_prob.nii.gz")
    check_outputs([output, sidecar_path, *([prob_path] if probabilities else [])], paths.values())
    # the reference grid is always read (the mask is written on it); other grids are resampled, or refused if
    # not co-registered, inside preprocess_case (or were, when the case was cached)
    ref = load_role(paths[ordered[0]], ordered[0])
    # the whole field of view: the training crop (spec.shape) cuts off lesions outside it; the sliding
    # window takes any size
    spec = replace(PreprocSpec.from_dict(meta["preprocessing"]), shape=None)
    pre = preprocess_case({m: str(paths[m]) for m in ordered}, spec, cache, loaded={ordered[0]: ref})
    arrays = {m: pre[m] for m in ordered}
    patch = extra["patch_size"]
    if extra["multimodal"]:
        shape = arrays[ordered[0]].shape
        x = np.stack([arrays.get(m, np.zeros(shape, np.float32)) for m in mods])
        preds = [
            predict_volume(
                model,
                x,
                patch,
                available=np.array([m in arrays for m in mods], np.float32),
                tta=tta,
                device=device,
                precision=precision,
            )
        ]
    else:  # MoME segments one modality at a time; several inputs are averaged
        preds = [
            predict_volume(model, arrays[m][None], patch, tta=tta, device=device, precision=precision)
            for m in ordered
        ]
    prob = np.mean([p.prob for p in preds], axis=0)
    mask_pre = (prob > extra.get("threshold", 0.5)).astype(np.float32)
    # back onto the input grid, in the world pre.affine lives in (MNI when preprocessing.register)
    ref_world = pre.ref_affine if pre.ref_affine is not None else ref.affine
    mask = resample_to_grid(mask_pre, pre.affine, ref.data.shape, ref_world, order=0) > 0.5
    voxel_ml = abs(float(np.linalg.det(ref.affine[:3, :3]))) / 1000.0
    _, n_comp = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    sidecar: dict[str, Any] = {
        "inputs": {
            m: Path(paths[m]).name for m in ordered
        },  # names only: outputs never leak directory layout
        "mask": output.name,
        "shape": list(ref.orig_shape[:3]),
        "lesion_volume_ml": round(float(mask.sum()) * voxel_ml, 4),
        "n_components": int(n_comp),
        "tta": tta,
        "precision": resolve_precision(precision, device),  # what ran: bf16 falls back to fp32 without native bf16
        "model_kind": extra["kind"],
        "multimodal": bool(extra["multimodal"]),
    }
    shares = [p.gate_share for p in preds if p.gate_share is not None]
    if shares:
        sidecar["gate_share"] = {
            m: round(float(s), 4) for m, s in zip(mods, np.mean(shares, axis=0), strict=True)
        }
    if extra["multimodal"] and len(ordered) < len(mods):
        # MoME+: the expert of a modality not given sees a learned mix of the given images; saying which
        # keeps its gate share from being read as that modality's image having been used
        avail = torch.tensor([[m in arrays for m in mods]], dtype=torch.float32, device=device)
        with torch.no_grad():
            mix = model.dispatch_matrix(avail)[0].cpu().numpy()
        sidecar["expert_inputs"] = {
            mods[e]: {mods[j]: round(float(mix[e, j]), 4) for j in range(len(mods)) if mods[j] in arrays}
            for e in range(len(mods)) if mods[e] not in arrays
        }
    files = {output: nifti_image(mask.astype(np.uint8), output, like=ref, dtype=np.uint8)}
    if probabilities:
        prob_in = np.clip(resample_to_grid(prob, pre.affine, ref.data.shape, ref_world, order=1), 0.0, 1.0)
        files[prob_path] = nifti_image(prob_in.astype(np.float32), prob_path, like=ref, dtype=np.float32)
        sidecar["probabilities"] = prob_path.name
    # the set is written to temporary files and only then renamed: a failure leaves no partial set
    with contextlib.ExitStack() as stack:
        for path, img in files.items():
            nib.save(img, str(stack.enter_context(atomic_path(path))))
        stack.enter_context(atomic_path(sidecar_path)).write_text(json_text(sidecar, strict=True))
    return sidecar


def _with_suffix(path: Path, suffix: str) -> Path:
    return path.with_name(file_stem(path) + suffix)


@pipeline_entry()
def segment(
    model_dir: str | Path,
    inputs: dict[str, str | Path] | str | Path,
    output: str | Path,
    *,
    probabilities: bool = False,
    tta: bool = False,
    precision: str | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    reference: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Segment new scans; returns ``(sidecars, failures)``.

    ``inputs`` is ``{modality: NIfTI path}`` for one case (``output`` = mask file; a bad input raises
    :class:`InputError` and writes nothing), or a manifest / cohort / BIDS folder (``output`` = folder with
    ``<subject>_mask.nii.gz`` + JSON sidecar per case; failed cases are listed in ``failures.csv`` and the
    others still finish). The mask has exactly the shape and affine of the ``reference`` modality's input
    (default: the first given in the model's modality order; nearest resampling).
    ``precision`` defaults to the one the model's threshold was tuned with. ``cache_dir``: keep the
    preprocessed inputs there (no cache by default: segment usually sees each scan once).
    """
    model, meta = _load(model_dir)
    precision = precision or meta["extra"].get("precision", "fp32")
    dev = resolve_device(device)
    model.to(dev)
    cache = None if cache_dir is None else _cache(str(cache_dir))
    if isinstance(inputs, dict):
        output = Path(output)
        if not output.name.endswith((".nii", ".nii.gz")):
            raise InputError(
                "output must be a .nii or .nii.gz file", path=output, fix="e.g. --output mask.nii.gz"
            )
        return [
            _segment_case(
                model,
                meta,
                inputs,
                output,
                probabilities=probabilities,
                tta=tta,
                precision=precision,
                device=dev,
                cache=cache,
                reference=reference,
            )
        ], []
    from neuromoe.data.preprocess import fmri_only_rows
    from neuromoe.io.table import load_table

    source = Path(inputs)
    if source.is_dir() and (source / "manifests" / "lesion.csv").is_file():
        source = source / "manifests" / "lesion.csv"
    table = load_table(source)
    mods = meta["extra"]["modalities"]
    table = table[~fmri_only_rows(table, (*mods, "mask"))]  # a BIDS root's func/ scans are not cases
    out_dir = Path(output)
    if out_dir.name.endswith((".nii", ".nii.gz")):
        raise InputError("a manifest or folder of cases writes one mask per case into a folder, not one file",
                         path=out_dir, fix="give a folder as --output (or --t1/--flair/... for one case)")
    check_outputs([out_dir / "segment.csv", out_dir / "failures.csv"], [source])
    sidecars, failures = [], []
    unforeseen: Exception | None = None
    for _, row in table.iterrows():
        subject = str(row.get("subject", len(sidecars) + len(failures)))
        # one output per table row: the sessions / runs of a subject must not overwrite each other, and the
        # tables say which one each row is
        ids = {"subject": subject, **{k: str(row[k]) for k in ("session", "state", "run")
                                      if k in row and pd.notna(row[k]) and str(row[k])}}
        name = "_".join(ids.values())
        paths = {m: row[m] for m in mods if m in row and isinstance(row[m], str) and row[m]}
        try:
            if any(sep in name for sep in ("/", "\\")):
                raise InputError(f"id {name!r} holds a path separator: its mask would be written outside the "
                                 "output folder", path=source, fix="use ids without '/' or '\\'")
            if not paths:
                raise InputError(f"row of {name} has no image", path=source,
                                 fix=f"fill at least one of the columns {', '.join(mods)}")
            sidecars.append(
                {
                    **ids,
                    **_segment_case(
                        model,
                        meta,
                        paths,
                        out_dir / f"{name}_mask.nii.gz",
                        probabilities=probabilities,
                        tta=tta,
                        precision=precision,
                        device=dev,
                        cache=cache,
                        reference=reference,
                    ),
                }
            )
        except Exception as exc:  # one bad case (also an unforeseen one) must not stop the batch
            msg = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            failures.append({**ids, "error": msg})
            if not isinstance(exc, InputError):
                unforeseen = unforeseen or exc
            print(f"neuromoe: skipped {name}: {msg}", file=sys.stderr)
    if not sidecars:  # nothing segmented: refuse like a single bad case; the failures say what to fix
        remove_stale(out_dir / "segment.csv")
        write_failures(out_dir / "failures.csv", failures)
        if unforeseen is not None:  # e.g. out of memory: not the files' fault, and the CLI says it as such
            raise unforeseen
        raise InputError(f"no case could be segmented ({len(failures)} failed, listed above)" if failures else
                         "no lesion case in it (rows without any of the model's modalities are not cases)",
                         path=source, fix="fix the listed files" if failures else
                         f"give cases with one of the model's modalities {list(mods)}")
    summary = pd.DataFrame([{k: v for k, v in s.items() if not isinstance(v, dict)} for s in sidecars])
    with atomic_path(out_dir / "segment.csv") as tmp:
        summary.to_csv(tmp, index=False)
    write_failures(out_dir / "failures.csv", failures)
    return sidecars, failures


# ----------------------------------------------------------------------------------------------- demo


@pipeline_entry()
def demo(
    cohort_dir: str | Path,
    out_dir: str | Path,
    *,
    device: str = "auto",
    seed: int = 0,
    preset: str = "demo",
    cache_dir: str | Path | None = None,
) -> Path:
    """Stage-1 experts → MoME with the curriculum → test evaluation → report section (``out_dir/report``)."""
    out = Path(out_dir)
    cfg = load_mome_config(preset, seed=seed, device=device)
    if cfg.cache_dir is None:
        cfg.cache_dir = str(cache_dir or out / "cache")
    pretrain(cohort_dir, out / "experts", cfg)
    train(cohort_dir, out / "train", cfg, experts=out / "experts")
    section = _new_section("MoME (lesions): modality experts → hierarchical gate with curriculum")
    stage1 = pd.read_json(out / "experts" / "experts" / "summary.json")
    extra = json.loads((out / "train" / "model" / "config.json").read_text())["extra"]
    section.add_text(
        f"Stage 1: one '{preset}' expert U-Net per modality trained alone on its modality's images"
        + (" (each started from one U-Net first trained on every modality's images pooled)"
           if cfg.data.shared_samples_per_epoch else "")
        + "; stage 2: "
        f"MoME ({cfg.model.gate_norm} gate at every decoder scale, {cfg.curriculum} curriculum) fine-tunes the "
        f"experts and the gate jointly on {list(cfg.data.patch_size)} patches ({cfg.data.fg_fraction:.0%} "
        f"centred on lesion voxels) from {extra['n_train_cases']} training cases. Decision threshold "
        f"{extra['threshold']:g}"
        + (", the best mean Dice on the whole validation volumes." if extra.get("threshold_tuned") else
           " (eval.threshold: not tuned on validation volumes).")
    )
    section.add_table(stage1, "Stage-1 experts (validation loss = deep-supervised Dice+CE).")
    evaluate(
        out / "train" / "model",
        cohort_dir,
        out / "evaluate",
        device=device,
        seed=seed,
        cache_dir=cfg.cache_dir,
        tta=cfg.eval.tta,
        n_overlays=cfg.eval.n_overlays,
        section=section,
    )
    section.save(out)
    return out
