"""Split-conformal calibrators reach nominal coverage on exchangeable data and fail loudly when misused."""

from __future__ import annotations

import numpy as np
import pytest

from neuromoe.eval.conformal import (
    ConformalClassifier,
    ConformalRegressor,
    conformal_quantile,
    coverage_shortfall_p,
    interval_coverage,
    mean_set_size,
    one_per_group,
    set_coverage,
)


def test_quantile_rank_and_small_n():
    s = np.arange(1, 10, dtype=float)  # n=9, alpha=0.1 → rank ceil(10*0.9)=9
    assert conformal_quantile(s, 0.1) == 9.0
    assert conformal_quantile(s, 0.5) == 5.0
    assert conformal_quantile(s[:5], 0.1) == float("inf")  # rank 6 > n
    with pytest.raises(ValueError):
        conformal_quantile(s, 1.0)
    # (n+1)(1-alpha) exactly an integer that floating point overshoots: 150 * 0.82 = 123.00000000000001
    assert conformal_quantile(np.arange(1, 150, dtype=float), 0.18) == 123.0  # was the 124th
    assert conformal_quantile(np.arange(1, 100, dtype=float), 0.41) == 59.0


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_prediction_sets_are_never_empty(method):
    """A confident, always-right classifier got empty sets (13 of 200 with randomised APS at alpha 0.1):
    the most probable class is always in the set."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    probs = np.eye(3)[y] * 0.98 + 0.01
    clf = ConformalClassifier(0.1, method=method, seed=0).fit(probs[:200], y[:200])
    sets = clf.predict(probs[200:])
    assert sets.sum(1).min() >= 1 and set_coverage(sets, y[200:]) >= 0.9


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_regression_coverage_heteroscedastic(alpha):
    rng = np.random.default_rng(0)
    covs = []
    for _ in range(40):
        x = rng.uniform(0, 1, 600)
        y = 3 * x + rng.normal(0, 0.2 + x, 600)
        pred = 3 * x
        cal = ConformalRegressor(alpha).fit(y[:300], pred[:300])
        lo, hi = cal.predict(pred[300:])
        covs.append(interval_coverage(lo, hi, y[300:]))
    assert abs(np.mean(covs) - (1 - alpha)) < 0.02
    # adaptive: scale by the known spread → narrower intervals where noise is small, same coverage
    cal = ConformalRegressor(alpha).fit(y[:300], pred[:300], scale=0.2 + x[:300])
    lo, hi = cal.predict(pred[300:], scale=0.2 + x[300:])
    assert abs(interval_coverage(lo, hi, y[300:]) - (1 - alpha)) < 0.08
    assert (hi - lo)[x[300:] < 0.2].mean() < (hi - lo)[x[300:] > 0.8].mean()


def _softmax_data(rng, n, k=3, temp=1.5):
    logits = rng.normal(0, 2, (n, k))
    probs = np.exp(logits / temp)
    probs /= probs.sum(1, keepdims=True)
    true_p = np.exp(logits)
    true_p /= true_p.sum(1, keepdims=True)  # miscalibrated model: conformal must still cover
    y = np.array([rng.choice(k, p=p) for p in true_p])
    return probs, y


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_classification_coverage(method):
    rng = np.random.default_rng(1)
    covs, sizes = [], []
    for _ in range(30):
        probs, y = _softmax_data(rng, 500)
        clf = ConformalClassifier(0.1, method=method, seed=3).fit(probs[:250], y[:250])
        sets = clf.predict(probs[250:])
        covs.append(set_coverage(sets, y[250:]))
        sizes.append(mean_set_size(sets))
    assert abs(np.mean(covs) - 0.9) < 0.02
    assert 1.0 <= np.mean(sizes) < 3.0  # informative: smaller than the full label set


def test_missing_labels_skipped_and_roundtrip():
    rng = np.random.default_rng(2)
    probs, y = _softmax_data(rng, 200)
    y[::4] = -1
    clf = ConformalClassifier(0.2, method="aps").fit(probs, y)
    assert clf.n_calib == 150
    clone = ConformalClassifier.from_dict(clf.to_dict())
    np.testing.assert_array_equal(clone.predict(probs), clf.predict(probs))
    reg = ConformalRegressor(0.1).fit(np.array([1.0, np.nan, 2.0] * 10), np.ones(30))
    assert reg.n_calib == 20 and ConformalRegressor.from_dict(reg.to_dict()).q == reg.q


def test_uncalibrated_raises():
    with pytest.raises(RuntimeError, match="fit"):
        ConformalRegressor().predict(np.zeros(3))
    with pytest.raises(RuntimeError, match="fit"):
        ConformalClassifier().predict(np.full((2, 2), 0.5))


def _sessions(n: int, rng: np.random.Generator, easy_sessions: int) -> tuple[np.ndarray, np.ndarray]:
    """Residuals of ``n`` subjects: half are hard (sd 5, one scan), half easy (sd 1, ``easy_sessions`` scans);
    a subject's sessions share its error, as a longitudinal subject's brain-age errors do."""
    hard = rng.random(n) < 0.5
    per_subject = rng.normal(0, np.where(hard, 5.0, 1.0))
    m = np.where(hard, 1, easy_sessions)
    return np.repeat(np.arange(n), m), np.repeat(per_subject, m) + rng.normal(0, 0.2, m.sum())


def test_one_row_per_subject_restores_coverage_for_new_subjects():
    """Pooled sessions let the many-session subjects set the quantile (coverage ~0.64 here); one row per
    subject gives the nominal 0.9 for a new subject's scan."""
    rng = np.random.default_rng(0)
    cov = {"grouped": [], "pooled": []}
    for _ in range(20):
        groups, res = _sessions(200, rng, easy_sessions=10)
        _, new = _sessions(2000, rng, easy_sessions=1)
        for how, g in (("grouped", groups), ("pooled", None)):
            lo, hi = ConformalRegressor(0.1).fit(res, np.zeros_like(res), groups=g).predict(np.zeros_like(new))
            cov[how].append(interval_coverage(lo, hi, new))
    assert abs(np.mean(cov["grouped"]) - 0.9) < 0.02 and np.mean(cov["pooled"]) < 0.8


def test_groups_pick_one_kept_row_each_and_unique_groups_change_nothing():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.array(["a", "b", "c", "d"]), [3, 1, 4, 2])
    keep = np.ones(10, bool)
    keep[3] = False  # subject b's only row is unlabelled: b drops out
    sel = one_per_group(groups, keep, seed=3)
    assert sorted(groups[sel]) == ["a", "c", "d"] and not sel[3]
    assert (one_per_group(groups, keep, seed=3) == sel).all()  # seeded
    probs = rng.dirichlet(np.ones(3), 30)
    y = rng.integers(-1, 3, 30)
    res, pred = rng.normal(size=30), np.zeros(30)
    ids = np.arange(30).astype(str)
    assert ConformalClassifier(0.2).fit(probs, y, groups=ids).q == ConformalClassifier(0.2).fit(probs, y).q
    assert ConformalRegressor(0.2).fit(res, pred, groups=ids).q == ConformalRegressor(0.2).fit(res, pred).q
    assert ConformalRegressor(0.2).fit(res, pred, groups=np.zeros(30)).n_calib == 1


def test_coverage_shortfall_flags_shifted_scans_and_few_exchangeable_ones() -> None:
    """The beta-binomial p-value of a low coverage: at most 5 % of exchangeable cohorts are flagged at p < 0.05 (a
    binomial test against the nominal level flags more, as it ignores the calibration draw), while test scans with
    twice the calibration residuals are flagged almost always; unbounded intervals are never flagged."""
    rng = np.random.default_rng(0)
    n_cal, n_test, alpha = 20, 30, 0.1

    def p_value(shift: float) -> float:
        reg = ConformalRegressor(alpha).fit(rng.normal(size=n_cal), np.zeros(n_cal))
        y = shift * rng.normal(size=n_test)
        lo, hi = reg.predict(np.zeros(n_test))
        return coverage_shortfall_p((y >= lo) & (y <= hi), reg.n_calib, alpha)

    same = np.array([p_value(1.0) for _ in range(2000)])
    shifted = np.array([p_value(2.0) for _ in range(300)])
    assert (same < 0.05).mean() <= 0.055 and (shifted < 0.05).mean() > 0.7  # measured 0.032 and 0.81
    from scipy.stats import binom

    covered = np.arange(n_test) < 22  # 22 of 30 at nominal 0.90: less surprising once the calibration draw counts
    assert coverage_shortfall_p(covered, n_cal, alpha) > binom.cdf(22, n_test, 1 - alpha)
    assert coverage_shortfall_p(np.zeros(10, bool), 5, alpha) == 1.0  # 5 subjects: k > n, unbounded
