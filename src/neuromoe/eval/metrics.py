"""Evaluation metrics for the three families: classification, regression, bootstrap CIs, segmentation.

Built on scikit-learn and MONAI so numbers match what reviewers compute. Small or degenerate test sets
are common in neuroimaging (one diagnosis absent at a site, a lesion-free scan), so every function
returns NaN (or a documented defined value) for an undefined metric instead of raising.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, confusion_matrix, mean_absolute_error

__all__ = [
    "balanced_accuracy",
    "binary_auc",
    "bootstrap_ci",
    "classification_metrics",
    "macro_f1",
    "r_squared",
    "regression_metrics",
    "segmentation_metrics",
]

NAN = float("nan")


# Bootstrap replicates call a metric thousands of times on a few hundred rows, where scikit-learn's input
# validation costs ~100× the arithmetic (20 s of a 29 s DenseFormer evaluate). These four compute the same
# numbers as sklearn (tests/eval check them against it, ties and absent classes included) in numpy.
def binary_auc(y_bin: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC as the Mann–Whitney statistic with mid-ranks for ties (= ``roc_auc_score``); NaN with one class."""
    from scipy.stats import rankdata

    y = np.asarray(y_bin).astype(bool).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = rankdata(np.asarray(score, dtype=float).ravel())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def r_squared(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination; a constant target scores 1 if predicted exactly, else 0 (= ``r2_score``)."""
    y_true, y_pred = np.asarray(y_true, dtype=float).ravel(), np.asarray(y_pred, dtype=float).ravel()
    ss_res = float(np.sum((y_true - y_pred) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (= ``balanced_accuracy_score``)."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    classes, idx = np.unique(y_true, return_inverse=True)
    if classes.size == 0:
        return NAN
    hits = np.bincount(idx, weights=y_true == y_pred, minlength=classes.size)
    return float(np.mean(hits / np.bincount(idx, minlength=classes.size)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray | None = None) -> float:
    """Macro F1 over ``labels`` (default: every class true or predicted), 0 for a class neither true nor
    predicted (= ``f1_score(average="macro", zero_division=0)``)."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    labels = np.union1d(y_true, y_pred) if labels is None else np.asarray(labels).ravel()
    if labels.size == 0:
        return NAN
    true = (y_true[:, None] == labels).sum(0)
    pred = (y_pred[:, None] == labels).sum(0)
    tp = ((y_true == y_pred)[:, None] & (y_true[:, None] == labels)).sum(0)
    denom = true + pred
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def _as_prob_matrix(y_prob: np.ndarray, n_classes: int | None) -> np.ndarray:
    """(n,) positive-class probabilities → (n, 2); (n, K) passes through."""
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim == 1:
        y_prob = np.stack([1.0 - y_prob, y_prob], axis=1)
    if y_prob.ndim != 2 or (n_classes is not None and y_prob.shape[1] != n_classes):
        raise ValueError(f"y_prob must be (n,) or (n, {n_classes}), got shape {y_prob.shape}")
    return y_prob


def _sens_spec(cm: np.ndarray, k: int) -> tuple[float, float]:
    """One-vs-rest sensitivity and specificity of class ``k`` from a confusion matrix (rows = truth)."""
    tp = cm[k, k]
    fn = cm[k].sum() - tp
    fp = cm[:, k].sum() - tp
    tn = cm.sum() - tp - fn - fp
    sens = tp / (tp + fn) if tp + fn else NAN
    spec = tn / (tn + fp) if tn + fp else NAN
    return float(sens), float(spec)


def classification_metrics(y_true: Sequence[Any] | np.ndarray, y_prob: np.ndarray,
                           labels: Sequence[Any] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, ROC-AUC, sensitivity/specificity and confusion matrix.

    ``y_true`` holds class indices ``0..K-1`` (or values of ``labels``); ``y_prob`` is ``(n, K)`` class
    probabilities, or ``(n,)`` positive-class probabilities for a binary task. Binary tasks report the
    sensitivity/specificity of the second label; multi-class tasks report one-vs-rest values per class
    and a macro one-vs-rest AUC over the classes present (NaN when fewer than two are present).
    """
    y_prob = np.asarray(y_prob, dtype=float)
    k = y_prob.shape[1] if y_prob.ndim == 2 else 2
    labels = list(labels) if labels is not None else list(range(k))
    if len(labels) != k:
        raise ValueError(f"{len(labels)} labels for {k} probability columns")
    y_prob = _as_prob_matrix(y_prob, k)
    y_raw = np.asarray(y_true)
    if y_raw.dtype.kind in "iub":
        y = y_raw.astype(int)
    else:
        index = {lab: i for i, lab in enumerate(labels)}
        y = np.array([index[v] for v in y_raw.tolist()], dtype=int)
    if y.shape[0] != y_prob.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {y_prob.shape[0]} predictions")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"class indices must be in 0..{k - 1}")
    out: dict[str, Any] = {"n": int(y.size), "labels": [str(lab) for lab in labels]}
    if y.size == 0:
        return {**out, "accuracy": NAN, "balanced_accuracy": NAN, "f1_macro": NAN, "auc": NAN,
                "confusion_matrix": np.zeros((k, k), int).tolist()}
    pred = y_prob.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=np.arange(k))
    present = np.unique(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UndefinedMetricWarning, UserWarning, RuntimeWarning))
        out["accuracy"] = float(accuracy_score(y, pred))
        out["balanced_accuracy"] = balanced_accuracy(y, pred)
        out["f1_macro"] = macro_f1(y, pred, labels=present)
    if k == 2:
        out["auc"] = binary_auc(y == 1, y_prob[:, 1])
        out["sensitivity"], out["specificity"] = _sens_spec(cm, 1)
    else:
        per_class = {}
        for c, lab in enumerate(labels):
            sens, spec = _sens_spec(cm, c)
            per_class[str(lab)] = {"sensitivity": sens, "specificity": spec, "auc": binary_auc(y == c, y_prob[:, c])}
        out["per_class"] = per_class
        aucs = [v["auc"] for v in per_class.values() if not math.isnan(v["auc"])]
        out["auc"] = float(np.mean(aucs)) if len(present) >= 2 and aucs else NAN
    out["confusion_matrix"] = cm.tolist()
    return out


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, Pearson r and R² over the pairs where both values are finite (NaN when undefined)."""
    y_true = np.asarray(y_true, dtype=float).ravel()
    y_pred = np.asarray(y_pred, dtype=float).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} targets but {y_pred.size} predictions")
    ok = np.isfinite(y_true) & np.isfinite(y_pred)
    t, p = y_true[ok], y_pred[ok]
    out = {"n": int(ok.sum()), "mae": NAN, "rmse": NAN, "r": NAN, "r2": NAN}
    if t.size == 0:
        return out
    out["mae"] = float(mean_absolute_error(t, p))
    out["rmse"] = float(np.sqrt(np.mean((t - p) ** 2)))
    if t.size >= 2 and np.std(t) > 0 and np.std(p) > 0:
        out["r"] = float(np.corrcoef(t, p)[0, 1])
    if t.size >= 2 and np.std(t) > 0:
        out["r2"] = r_squared(t, p)
    return out


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, stratify: np.ndarray | None = None,
                 groups: np.ndarray | None = None) -> tuple[float, float, float]:
    """``(point estimate, lower, upper)`` percentile bootstrap CI of ``metric_fn(*arrays)``.

    Resamples rows (the first axis of every array) with replacement; with ``stratify`` (e.g. the
    class labels) each stratum is resampled to its own size, so rare classes never vanish from a
    replicate and AUCs stay defined. With ``groups`` (the subject of each row) whole subjects are resampled:
    the sessions of one subject are not independent, and resampling them one by one gives too narrow a CI
    (a subject's stratum is that of its first row). Replicates giving NaN are dropped; all-NaN → NaN bounds.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError("all arrays must have the same first dimension")
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=int) if stratify is None else np.asarray(stratify)
    first, rows = np.arange(n), None  # the resampled units: rows, or subjects with all their rows
    if groups is not None and len(np.unique(np.asarray(groups))) < n:
        _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
        rows = [np.flatnonzero(inverse == g) for g in range(len(first))]
    strata = [np.flatnonzero(labels[first] == s) for s in np.unique(labels[first])]
    values = np.empty(n_boot)
    with warnings.catch_warnings():  # undefined metrics on small samples are NaN here, not console noise
        warnings.simplefilter("ignore")
        point = float(metric_fn(*arrays))
        if n == 0:
            return point, NAN, NAN
        for b in range(n_boot):
            drawn = np.concatenate([rng.choice(s, size=s.size, replace=True) for s in strata])
            idx = drawn if rows is None else np.concatenate([rows[g] for g in drawn])
            values[b] = metric_fn(*(a[idx] for a in arrays))
    values = values[np.isfinite(values)]
    if values.size == 0:
        return point, NAN, NAN
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def _lesion_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """(#gt lesions, #gt lesions hit, #pred lesions, #pred lesions hitting gt); full connectivity."""
    structure = ndimage.generate_binary_structure(gt.ndim, gt.ndim)
    gt_lab, n_gt = ndimage.label(gt, structure=structure)
    pred_lab, n_pred = ndimage.label(pred, structure=structure)
    gt_hit = np.unique(gt_lab[pred & (gt_lab > 0)]).size
    pred_hit = np.unique(pred_lab[gt & (pred_lab > 0)]).size
    return n_gt, gt_hit, n_pred, pred_hit


def segmentation_metrics(pred: np.ndarray, gt: np.ndarray,
                         spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """Dice, HD95 (mm, MONAI), lesion-wise precision/recall/F1 and volumes (mL) of binary masks.

    Lesions are connected components (full connectivity); a lesion is detected when it overlaps the
    other mask by ≥ 1 voxel. Conventions: both masks empty → Dice 1, HD95 0, lesion F1 1; exactly one
    empty → Dice 0, HD95 NaN (undefined distance), lesion F1 0.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pred = np.asarray(pred) > 0.5
    gt = np.asarray(gt) > 0.5
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != gt.ndim:
        raise ValueError(f"{len(spacing)} spacings for a {gt.ndim}-D mask")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    vol_pred, vol_gt = pred.sum() * voxel_ml, gt.sum() * voxel_ml
    out = {"volume_pred_ml": float(vol_pred), "volume_gt_ml": float(vol_gt),
           "abs_volume_diff_ml": float(abs(vol_pred - vol_gt))}
    n_gt, gt_hit, n_pred, pred_hit = _lesion_counts(pred, gt)
    out.update(n_lesions_gt=float(n_gt), n_lesions_pred=float(n_pred))
    if not pred.any() and not gt.any():
        return {**out, "dice": 1.0, "hd95": 0.0, "lesion_precision": 1.0, "lesion_recall": 1.0, "lesion_f1": 1.0}
    if not pred.any() or not gt.any():
        return {**out, "dice": 0.0, "hd95": NAN,
                "lesion_precision": NAN if n_pred == 0 else 0.0,
                "lesion_recall": NAN if n_gt == 0 else 0.0, "lesion_f1": 0.0}
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(gt[None, None].astype(np.float32))
    out["dice"] = float(compute_dice(p, g, include_background=True).item())
    with warnings.catch_warnings():  # MONAI >= 1.5 warns from inside its own HD code on every call
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        out["hd95"] = float(compute_hausdorff_distance(p, g, include_background=True, percentile=95,
                                                       spacing=list(spacing)).item())
    precision, recall = pred_hit / n_pred, gt_hit / n_gt
    out["lesion_precision"], out["lesion_recall"] = float(precision), float(recall)
    out["lesion_f1"] = float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0
    return out
