"""MoME / MoME+ pipeline core: curriculum training through the shared Trainer, sliding-window inference
with mirror TTA, and per-case evaluation tables (Dice, HD95, lesion F1, volume difference).

Works on in-memory cases (``neuromoe.data.lesion.load_lesion_cases``), so the file-level verbs
(``segment`` on NIfTI paths, CLI) only add I/O around these functions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from neuromoe.data.lesion import LesionCase, LesionPatchDataset
from neuromoe.engine import Trainer
from neuromoe.eval.metrics import segmentation_metrics
from neuromoe.models.mome import MoME, curriculum_weight, deep_supervised_loss, mome_loss

__all__ = ["MoMETrainer", "evaluate_cases", "predict_volume"]


class MoMETrainer(Trainer):
    """Curriculum ``w(r)·L_expert + (1 − w(r))·L_fused`` with ``r = epoch / epochs`` (paper schedule).

    A plain U-Net (pooled baseline) is trained with the deep-supervised Dice+CE alone.
    """

    def __init__(self, *args: Any, schedule: str = "quadratic", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.schedule, self.expert_weight = schedule, 1.0

    def on_epoch_start(self, epoch: int) -> None:
        self.expert_weight = curriculum_weight(epoch, self.cfg.epochs, self.schedule)  # type: ignore[arg-type]
        for ds in (self.train_set, self.val_set):
            if isinstance(ds, LesionPatchDataset):
                ds.set_epoch(epoch)

    def _forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if isinstance(self.model, MoME):
            out = self.model(batch["image"], batch.get("available"))
            mod = batch["modality"] if (batch["modality"] >= 0).all() else None
            return mome_loss(out, batch["mask"], mod, self.expert_weight)
        loss = deep_supervised_loss(self.model(batch["image"]), batch["mask"])
        return loss, {"loss": float(loss.detach())}

    def training_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return self._forward(batch)

    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        _, logs = self._forward(batch)
        return {"loss": logs["loss"]}

    def validation_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        return {"val_loss": float(np.mean([o["loss"] for o in outputs]))}


def _flips(spatial_dims: int, tta: bool) -> list[tuple[int, ...]]:
    axes = range(2, 2 + spatial_dims)
    return [c for n in range(spatial_dims + 1) for c in itertools.combinations(axes, n)] if tta else [()]


@torch.no_grad()
def predict_volume(model: nn.Module, image: np.ndarray, patch_size: Sequence[int], *,
                   available: np.ndarray | None = None, tta: bool = False, device: str | torch.device = "cpu",
                   bf16: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Lesion probability ``(*S)`` of one volume ``image (C, *S)`` and the per-expert gate share ``(E,)``.

    MONAI sliding window (overlap 0.5, Gaussian weighting) over full-resolution fused logits; with
    ``tta`` the prediction is averaged over all mirror flips. The gate share is the lesion-weighted
    mean of the full-resolution gate (``None`` for a plain U-Net).
    """
    model.eval()
    device = torch.device(device)
    x = torch.as_tensor(image, dtype=torch.float32, device=device)[None]
    avail = torch.as_tensor(available, dtype=torch.float32, device=device)[None] if available is not None else None
    is_mome = isinstance(model, MoME)

    def predictor(patch: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if is_mome:
                out = model(patch, None if avail is None else avail.expand(patch.shape[0], -1))
                logits, gate = out.logits[0], out.gates[0]
            else:
                logits = model(patch)[0]
                gate = logits.new_zeros(patch.shape[0], 1, *patch.shape[2:])
        return logits.float().softmax(1), gate.float()

    flips = _flips(x.ndim - 2, tta)
    prob = gate = 0.0
    for axes in flips:
        xi = x.flip(axes) if axes else x
        p, g = sliding_window_inference(xi, tuple(patch_size), 2, predictor, overlap=0.5, mode="gaussian")
        prob = prob + (p.flip(axes) if axes else p)[0, 1]
        gate = gate + (g.flip(axes) if axes else g)[0]
    prob, gate = prob / len(flips), gate / len(flips)
    share = None
    if is_mome:
        w = prob.clamp_min(1e-3)
        share = ((gate * w).flatten(1).sum(1) / w.sum()).cpu().numpy()
    return prob.cpu().numpy(), share


def evaluate_cases(model: nn.Module, cases: Sequence[LesionCase], modalities: Sequence[str],
                   patch_size: Sequence[int], *, multimodal: bool = False, tta: bool = False,
                   spacing: Sequence[float] = (1.0, 1.0, 1.0), threshold: float = 0.5) -> pd.DataFrame:
    """One row per (case, modality) (MoME) or per case (MoME+): metrics plus the case's metadata."""
    rows = []
    for case in cases:
        present = [m for m in modalities if m in case["images"]]
        if multimodal:
            shape = case["mask"].shape
            runs = [("+".join(present), np.stack([case["images"].get(m, np.zeros(shape, np.float32))
                                                  for m in modalities]),
                     np.array([m in case["images"] for m in modalities], np.float32))]
        else:
            runs = [(m, case["images"][m][None], None) for m in present]
        for name, image, avail in runs:
            prob, share = predict_volume(model, image, patch_size, available=avail, tta=tta)
            metrics = segmentation_metrics(prob > threshold, case["mask"] > 0, spacing)
            row = {**case["meta"], "modality": name, **metrics}
            if share is not None:
                row.update({f"gate_{m}": float(s) for m, s in zip(modalities, share, strict=True)})
            rows.append(row)
    return pd.DataFrame(rows)
