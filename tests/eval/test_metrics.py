"""Metrics agree with hand-computed values and never crash on degenerate inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, r2_score, roc_auc_score

from neuromoe.eval.metrics import (
    balanced_accuracy,
    binary_auc,
    bootstrap_ci,
    classification_metrics,
    macro_f1,
    r_squared,
    regression_metrics,
    segmentation_metrics,
)


def test_binary_classification_hand_values() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.2, 0.8, 0.4])  # predictions: 0 1 0 1 0
    m = classification_metrics(y, p, labels=["HC", "PD"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(1 / 2) and m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]
    # string labels map through ``labels``
    m2 = classification_metrics(np.array(["HC", "HC", "HC", "PD", "PD"]), p, labels=["HC", "PD"])
    assert m2["auc"] == m["auc"]


def test_multiclass_ovr_and_single_class() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    logits = rng.normal(size=(30, 3)) + 2 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, p, labels=["CN", "MCI", "AD"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert set(m["per_class"]) == {"CN", "MCI", "AD"}
    assert np.sum(m["confusion_matrix"]) == 30
    only = classification_metrics(np.zeros(5, int), p[:5], labels=["CN", "MCI", "AD"])
    assert math.isnan(only["auc"]) and math.isnan(only["per_class"]["MCI"]["sensitivity"])
    empty = classification_metrics(np.zeros(0, int), np.zeros((0, 3)))
    assert math.isnan(empty["accuracy"])


def test_regression_metrics() -> None:
    t = np.array([50.0, 60.0, 70.0, np.nan])
    p = np.array([52.0, 58.0, 73.0, 1.0])
    m = regression_metrics(t, p)
    assert m["n"] == 3
    assert m["mae"] == pytest.approx(7 / 3)
    assert m["rmse"] == pytest.approx(np.sqrt((4 + 4 + 9) / 3))
    assert m["r"] == pytest.approx(np.corrcoef(t[:3], p[:3])[0, 1])
    assert m["r2"] == pytest.approx(1 - 17 / 200)
    const = regression_metrics(np.array([1.0, 1.0]), np.array([2.0, 3.0]))
    assert math.isnan(const["r"]) and math.isnan(const["r2"]) and const["mae"] == 1.5
    assert math.isnan(regression_metrics(np.array([]), np.array([]))["mae"])


def test_bootstrap_ci_covers_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    t = rng.normal(size=200)
    p = t + rng.normal(scale=0.5, size=200)

    def mae(a, b):
        return regression_metrics(a, b)["mae"]

    point, lo, hi = bootstrap_ci(mae, t, p, n_boot=200, seed=3)
    assert lo < point < hi and 0.3 < point < 0.5
    assert bootstrap_ci(mae, t, p, n_boot=200, seed=3) == (point, lo, hi)
    # stratified resampling keeps both classes in every replicate → AUC always defined
    y = np.r_[np.zeros(48, int), np.ones(2, int)]
    s = rng.random(50) + y

    def auc(a, b):
        return classification_metrics(a, b)["auc"]

    _, lo_s, hi_s = bootstrap_ci(auc, y, s, n_boot=100, stratify=y)
    assert np.isfinite(lo_s) and lo_s <= hi_s


def test_segmentation_metrics_values_and_edge_cases() -> None:
    gt = np.zeros((16, 16, 16), bool)
    gt[2:6, 2:6, 2:6] = True  # lesion 1 (64 voxels)
    gt[10:12, 10:12, 10:12] = True  # lesion 2 (8 voxels), missed
    pred = np.zeros_like(gt)
    pred[2:6, 2:6, 3:7] = True  # overlaps lesion 1 (48 voxels shared)
    pred[12:15, 1:3, 1:3] = True  # false positive
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # MONAI's internal deprecation noise is not passed on
        m = segmentation_metrics(pred, gt, spacing=(2.0, 2.0, 2.0))
    assert m["dice"] == pytest.approx(2 * 48 / (76 + 72))
    assert m["lesion_recall"] == 0.5 and m["lesion_precision"] == 0.5 and m["lesion_f1"] == 0.5
    assert m["volume_gt_ml"] == pytest.approx(72 * 8 / 1000) and m["abs_volume_diff_ml"] == pytest.approx(4 * 8 / 1000)
    assert m["hd95"] > 0
    same = segmentation_metrics(gt, gt)
    assert same["dice"] == 1.0 and same["hd95"] == 0.0 and same["lesion_f1"] == 1.0
    empty = np.zeros_like(gt)
    both = segmentation_metrics(empty, empty)
    assert both["dice"] == 1.0 and both["lesion_f1"] == 1.0
    miss = segmentation_metrics(empty, gt)
    assert miss["dice"] == 0.0 and math.isnan(miss["hd95"]) and miss["lesion_recall"] == 0.0
    # HD95 in mm scales with the voxel spacing
    shifted = np.roll(gt, 1, axis=0)
    assert segmentation_metrics(shifted, gt, (3.0, 1.0, 1.0))["hd95"] == pytest.approx(
        3 * segmentation_metrics(shifted, gt, (1.0, 1.0, 1.0))["hd95"])


def test_bootstrap_with_groups_resamples_subjects_not_sessions() -> None:
    """Five identical sessions per subject are one subject's worth of evidence: resampling them one by one gave a
    CI ~sqrt(5) too narrow. With ``groups`` the CI matches the one-row-per-subject CI; with one row per subject
    ``groups`` changes nothing."""
    rng = np.random.default_rng(0)
    t, p = rng.normal(size=40), rng.normal(size=40)

    def mae(a, b):
        return float(np.mean(np.abs(a - b)))

    one = bootstrap_ci(mae, t, p, n_boot=400, seed=1)
    rep_t, rep_p, subj = np.repeat(t, 5), np.repeat(p, 5), np.repeat(np.arange(40), 5)
    rows = bootstrap_ci(mae, rep_t, rep_p, n_boot=400, seed=1)
    grouped = bootstrap_ci(mae, rep_t, rep_p, n_boot=400, seed=1, groups=subj)
    width = [ci[2] - ci[1] for ci in (one, rows, grouped)]
    assert width[1] < 0.6 * width[0] and abs(width[2] - width[0]) < 0.25 * width[0]
    assert bootstrap_ci(mae, t, p, n_boot=100, seed=2, groups=np.arange(40)) == bootstrap_ci(mae, t, p, n_boot=100,
                                                                                             seed=2)
    y = np.repeat(np.r_[np.zeros(20), np.ones(20)].astype(int), 3)
    auc = bootstrap_ci(lambda a, b: float(np.mean(b[a == 1]) - np.mean(b[a == 0])), y, np.repeat(p, 3), n_boot=100,
                       stratify=y, groups=np.repeat(np.arange(40), 3))
    assert np.isfinite(auc[1]) and np.isfinite(auc[2])  # every replicate keeps both classes


@pytest.mark.parametrize("seed", range(6))
def test_numpy_metrics_equal_sklearn(seed: int) -> None:
    """The bootstrap's numpy AUC / balanced accuracy / macro-F1 give sklearn's numbers: tied scores, a class
    predicted but never true, a class true but never predicted, and explicit labels."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 60)), int(rng.integers(2, 5))
    y = rng.integers(0, k, n)
    y[:2] = [0, 1]
    score = np.round(rng.random(n), 1)  # many ties
    yb = y == 1
    assert binary_auc(yb, score) == pytest.approx(roc_auc_score(yb, score), abs=1e-12)
    yhat = np.where(rng.random(n) < 0.6, y, rng.integers(0, k + 1, n))  # class k: predicted, never true
    yhat[yhat == 0] = 1 if seed % 2 else 0  # odd seeds: class 0 true but never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert balanced_accuracy(y, yhat) == pytest.approx(balanced_accuracy_score(y, yhat), abs=1e-12)
        assert macro_f1(y, yhat) == pytest.approx(f1_score(y, yhat, average="macro", zero_division=0), abs=1e-12)
        present = np.unique(y)
        assert macro_f1(y, yhat, labels=present) == pytest.approx(
            f1_score(y, yhat, labels=present, average="macro", zero_division=0), abs=1e-12)
    assert math.isnan(binary_auc(np.ones(4, bool), np.arange(4.0)))
    t, p = rng.normal(60, 8, n), rng.normal(60, 8, n)
    assert r_squared(t, p) == pytest.approx(r2_score(t, p), abs=1e-12)
    for t, p in (([3.0, 3, 3], [3.0, 3, 3]), ([3.0, 3, 3], [3.0, 4, 3])):  # constant targets
        assert r_squared(np.array(t), np.array(p)) == r2_score(t, p)
