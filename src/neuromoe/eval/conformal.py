"""Split-conformal prediction: intervals for regression, prediction sets for classification.

Distribution-free marginal coverage ``P(y ∈ C(x)) ≥ 1 − alpha`` for exchangeable calibration and test
data (Vovk et al.; Angelopoulos & Bates 2021, "A gentle introduction"). Calibrate on the *validation*
split only — never on test — then measure coverage on test with :func:`interval_coverage` /
:func:`set_coverage`. Calibrators serialise to plain dicts (``to_dict``/``from_dict``) so a model
directory can carry them and ``predict`` can emit intervals for new scans.

* Regression: absolute-residual score ``|y − ŷ|`` (optionally divided by a per-sample ``scale``, e.g.
  a predicted spread, for adaptive widths) → interval ``ŷ ± q·scale``.
* Several rows per subject (longitudinal sessions): rows are not exchangeable with a new subject's scan, the
  subjects are. ``fit(..., groups=subject_ids)`` keeps one seeded random row per subject (the subsampling
  method of Dunn, Wasserman & Ramdas 2022), which restores the guarantee for a new subject's scans.
* Classification: ``lac`` (score ``1 − p_y``; smallest sets on average) or ``aps`` (adaptive prediction
  sets: cumulative probability mass down to the true class; randomised by default so coverage is exact
  rather than conservative, with a seeded generator so outputs are reproducible).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "ConformalClassifier",
    "ConformalRegressor",
    "conformal_quantile",
    "coverage_shortfall_p",
    "interval_coverage",
    "mean_set_size",
    "one_per_group",
    "set_coverage",
]


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``⌈(n+1)(1−alpha)⌉``-th smallest score; ``inf`` when ``n`` is too small for that level."""
    _check_alpha(alpha)
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = scores.size
    if n == 0:
        raise ValueError("no calibration scores")
    # (n+1)(1-alpha) is often an integer that floating point overshoots (150 * 0.82 = 123.00000000000001):
    # ceil would then take the next score
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    return float("inf") if rank > n else float(scores[rank - 1])


def coverage_shortfall_p(covered: np.ndarray, n_calib: int, alpha: float) -> float:
    """One-sided p-value of a coverage as low as ``covered`` (one bool per test subject) if the test subjects were
    exchangeable with the ``n_calib`` calibration subjects.

    Given the calibration draw, split-conformal coverage is Beta(k, n + 1 − k) with k = ⌈(n + 1)(1 − alpha)⌉
    (Angelopoulos & Bates 2021, §3.2), so the number covered is beta-binomial. A small value says these scans
    differ from the ones calibrated on (another site, scanner or population): the binomial test alone would
    ignore how few subjects calibrated the quantile and flag ordinary draws."""
    from scipy.stats import betabinom

    _check_alpha(alpha)
    covered = np.asarray(covered, dtype=bool).ravel()
    k = math.ceil((n_calib + 1) * (1 - alpha) - 1e-9)
    if covered.size == 0 or k > n_calib:  # nothing to test, or unbounded intervals / sets of every class
        return 1.0
    return float(betabinom.cdf(int(covered.sum()), covered.size, k, n_calib + 1 - k))


def one_per_group(groups: np.ndarray | None, keep: np.ndarray, seed: int = 0) -> np.ndarray:
    """``keep`` restricted to one random (seeded) kept row per group; ``groups=None`` returns ``keep``."""
    if groups is None:
        return keep
    rows = np.random.default_rng(seed).permutation(np.flatnonzero(keep))
    _, first = np.unique(np.asarray(groups).astype(str).ravel()[rows], return_index=True)
    out = np.zeros_like(keep)
    out[rows[first]] = True  # the first row of each group in a random order: a uniform draw per group
    return out


@dataclass
class ConformalRegressor:
    """Split-conformal interval ``ŷ ± q·scale`` calibrated on held-out residuals."""

    alpha: float = 0.1
    q: float | None = None
    n_calib: int = 0

    def fit(self, y: np.ndarray, pred: np.ndarray, scale: np.ndarray | None = None,
            groups: np.ndarray | None = None) -> ConformalRegressor:
        """Calibrate on held-out targets and predictions; ``groups`` (e.g. subject ids): one row per group."""
        y, pred = np.asarray(y, float).ravel(), np.asarray(pred, float).ravel()
        keep = np.isfinite(y) & np.isfinite(pred)
        res = np.abs(y - pred)
        if scale is not None:
            s = np.asarray(scale, float).ravel()
            keep &= np.isfinite(s) & (s > 0)
            res = res / np.where(s > 0, s, 1.0)
        keep = one_per_group(groups, keep)
        self.q = conformal_quantile(res[keep], self.alpha)
        self.n_calib = int(keep.sum())
        return self

    def predict(self, pred: np.ndarray, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` bounds for predictions ``pred``."""
        if self.q is None:
            raise RuntimeError("ConformalRegressor is not calibrated; call fit() on validation data")
        pred = np.asarray(pred, float)
        half = self.q * (np.asarray(scale, float) if scale is not None else 1.0)
        return pred - half, pred + half

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalRegressor:
        return cls(**d)


@dataclass
class ConformalClassifier:
    """Split-conformal prediction sets from class probabilities (``lac`` or ``aps``)."""

    alpha: float = 0.1
    method: Literal["lac", "aps"] = "aps"
    randomized: bool = True
    seed: int = 0
    q: float | None = None
    n_calib: int = 0

    def _scores(self, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Score of every class for every sample, ``(n, K)``; the label's score is what is calibrated."""
        probs = np.asarray(probs, np.float64)
        if self.method == "lac":
            return 1.0 - probs
        if self.method != "aps":
            raise ValueError(f"unknown conformal method '{self.method}' (lac, aps)")
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=1)
        cum = np.empty_like(probs)
        np.put_along_axis(cum, order, np.cumsum(sorted_p, axis=1), axis=1)
        if self.randomized:
            cum = cum - rng.uniform(size=(probs.shape[0], 1)) * probs
        return cum

    def fit(self, probs: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> ConformalClassifier:
        """Calibrate on probabilities ``(n, K)`` and integer labels ``y`` (negative = missing, skipped);
        ``groups`` (e.g. subject ids): one row per group."""
        probs, y = np.asarray(probs, float), np.asarray(y).astype(int).ravel()
        keep = one_per_group(groups, y >= 0, self.seed)
        scores = self._scores(probs[keep], np.random.default_rng(self.seed))
        self.q = conformal_quantile(scores[np.arange(keep.sum()), y[keep]], self.alpha)
        self.n_calib = int(keep.sum())
        return self

    def predict(self, probs: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Boolean membership ``(n, K)``: class k is in the set iff its score ≤ the calibrated quantile, and
        the most probable class always (no empty sets, as in RAPS: randomised APS and LAC can leave a row
        with none, e.g. a confident top class whose score exceeds the quantile; adding it only raises coverage).

        ``rng`` draws the APS randomisation (one uniform per row); callers predicting one row at a time
        must pass a different generator per row, else every row gets the same draw."""
        if self.q is None:
            raise RuntimeError("ConformalClassifier is not calibrated; call fit() on validation data")
        rng = np.random.default_rng(self.seed + 1) if rng is None else rng
        probs = np.asarray(probs, np.float64)
        sets = self._scores(probs, rng) <= self.q + 1e-12
        sets[np.arange(len(sets)), probs.argmax(1)] = True
        return sets

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalClassifier:
        return cls(**d)


def interval_coverage(lower: np.ndarray, upper: np.ndarray, y: np.ndarray) -> float:
    """Fraction of finite targets inside ``[lower, upper]``."""
    y = np.asarray(y, float)
    keep = np.isfinite(y)
    return float(np.mean((y[keep] >= np.asarray(lower)[keep]) & (y[keep] <= np.asarray(upper)[keep])))


def set_coverage(sets: np.ndarray, y: np.ndarray) -> float:
    """Fraction of labelled samples (``y ≥ 0``) whose label is in their prediction set."""
    y = np.asarray(y).astype(int)
    keep = y >= 0
    return float(np.mean(np.asarray(sets)[keep][np.arange(keep.sum()), y[keep]]))


def mean_set_size(sets: np.ndarray) -> float:
    return float(np.asarray(sets).sum(axis=1).mean())
