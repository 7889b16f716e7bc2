"""Functional connectivity (FC) from ROI time series: Pearson, partial and tangent, batched.

Why our own code rather than ``nilearn.connectome.ConnectivityMeasure``: BrainMoE computes FC for
thousands of scans at every pretraining/fine-tuning run, and nilearn loops over scans in Python
(one scikit-learn estimator fit, one ``scipy.linalg`` call per scan). Here every kind is a handful of
stacked ``matmul``/``eigh`` calls over a batch of scans, with results equal to nilearn's:

* ``pearson`` equals ``ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance())``
  (plain sample correlation; nilearn's default estimator would shrink it), Fisher z = ``arctanh``.
* ``partial`` equals ``kind="partial correlation"`` with its default Ledoit-Wolf estimator
  (scikit-learn's ``ledoit_wolf`` shrinkage formula, vectorised over the batch).
* ``tangent`` equals ``kind="tangent"``: Ledoit-Wolf covariances whitened by the geometric mean of the
  group's covariances (same Riemannian gradient descent), then the matrix logarithm. The group mean is
  a model parameter: :func:`tangent_reference` computes it on training scans and ``reference=`` reuses it
  for new scans, so one scan can be embedded alone at predict time.

Correlation kinds have a zero diagonal (a region's link to itself carries no information and
``arctanh(1)`` is infinite). Fisher z only applies to correlation kinds; tangent values are not
correlations and are returned as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuromoe.errors import InputError
from neuromoe.io.atomic import atomic_path
from neuromoe.io.table import content_sample

KINDS = ("pearson", "partial", "tangent")
MIN_TIMEPOINTS = 10  # as for BOLD runs: fewer volumes give FC that is noise, yet scored without a word
_CLIP = 1.0 - 1e-7  # arctanh(±(1-1e-7)) ≈ ±8.4: identical ROIs stay finite
_CHUNK = 16  # scans per stacked computation: float64 temporaries of ~9 MB at M=264 stay in cache


def _name(sources: Sequence[str] | None, i: int) -> str:
    return str(sources[i]) if sources is not None else f"scan {i}"


def check_timeseries(
    x: np.ndarray, *, source: str | Path | None = None, allow_constant: bool = False
) -> np.ndarray:
    """Validate one T×M series (2D, finite, T ≥ 3, no constant ROI); floats are returned without a copy.

    Every problem is an :class:`InputError` naming ``source`` and the ROI or time point at fault, so a
    user with thousands of scans learns which file to fix.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(
            f"time series must be 2D (timepoints × ROIs), got shape {x.shape}",
            path=source,
            fix="save one scan as a T×M array (rows = volumes, columns = ROIs)",
        )
    if not np.issubdtype(x.dtype, np.number):
        raise InputError(f"time series is not numeric ({x.dtype})", path=source, fix="save numbers only")
    t, m = x.shape
    if t < MIN_TIMEPOINTS:
        raise InputError(
            f"only {t} timepoints (need ≥ {MIN_TIMEPOINTS}) for {m} ROIs",
            path=source,
            fix="check the orientation (rows = volumes) or drop this too-short scan",
        )
    if m < 2:
        raise InputError(
            f"only {m} ROI; connectivity needs ≥ 2",
            path=source,
            fix="check the orientation (columns = ROIs) or the atlas",
        )
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        ti, ri = np.argwhere(bad)[0]
        raise InputError(
            f"{int(bad.sum())} NaN/Inf values (first at timepoint {ti}, ROI {ri})",
            path=source,
            fix="clean the series (interpolate censored volumes or drop the ROI) before FC",
        )
    if not allow_constant:
        const = np.flatnonzero(np.ptp(x, axis=0) == 0)
        if const.size:
            more = f" (and {const.size - 1} more)" if const.size > 1 else ""
            raise InputError(
                f"ROI {int(const[0])}{more} is constant (zero variance)",
                path=source,
                fix="use an atlas whose ROIs lie inside the brain/field of view, or drop the scan (Python API: "
                "connectivity(..., on_constant='zero') gives such ROIs zero connectivity)",
            )
    return x


def _as_list(ts: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(ts, np.ndarray):
        if ts.ndim == 2:
            return [ts]
        if ts.ndim != 3:
            raise InputError(
                f"expected (B, T, M) or a list of (T, M) arrays, got shape {ts.shape}",
                fix="stack scans as (scans, timepoints, ROIs)",
            )
        return list(ts)
    out = list(ts)
    if not out:
        raise InputError("no scans given", fix="pass at least one T×M time series")
    return out


def _validated(
    ts: np.ndarray | Sequence[np.ndarray], sources: Sequence[str] | None, allow_constant: bool
) -> list[np.ndarray]:
    scans = _as_list(ts)
    if sources is not None and len(sources) != len(scans):
        raise InputError(f"{len(sources)} source names for {len(scans)} scans", fix="give one name per scan")
    out = [
        check_timeseries(x, source=_name(sources, i), allow_constant=allow_constant)
        for i, x in enumerate(scans)
    ]
    m0 = out[0].shape[1]
    for i, x in enumerate(out):
        if x.shape[1] != m0:
            raise InputError(
                f"{x.shape[1]} ROIs, but {_name(sources, 0)} has {m0}",
                path=_name(sources, i),
                fix="extract every scan with the same atlas",
            )
    return out


def _groups(scans: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, float64 (b, T, M)) per distinct length T, in chunks of at most ``_CHUNK`` scans.

    Small chunks keep every temporary in cache: FC is memory-bound, and 1,000 scans at once were
    slower than nilearn's scan-by-scan loop.
    """
    lengths = np.array([x.shape[0] for x in scans])
    for t in np.unique(lengths):
        idx = np.flatnonzero(lengths == t)
        for start in range(0, idx.size, _CHUNK):
            sel = idx[start : start + _CHUNK]
            buf = np.empty((sel.size, t, scans[sel[0]].shape[1]))
            for j, i in enumerate(sel):
                buf[j] = scans[i]
            yield sel, buf


def _centred_scatter(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred series and their empirical covariance X̃ᵀX̃ / T (what scikit-learn calls emp_cov)."""
    xc = x - x.mean(axis=1, keepdims=True)
    # a constant ROI must centre to exact zeros (the mean of T equal floats can be off by an ulp)
    xc *= x.max(axis=1, keepdims=True) != x.min(axis=1, keepdims=True)
    emp = np.matmul(xc.transpose(0, 2, 1), xc)
    emp /= x.shape[1]
    return xc, emp


def _ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Batched Ledoit-Wolf covariance, term for term scikit-learn's ``ledoit_wolf`` (assume_centered=False)."""
    n, p = x.shape[1], x.shape[2]
    xc, emp = _centred_scatter(x)
    x2 = xc * xc
    trace = x2.sum(axis=1) / n  # (b, p) diagonal of emp
    mu = trace.sum(axis=1) / p
    beta_ = (x2.sum(axis=2) ** 2).sum(axis=1)  # sum of all entries of X2ᵀX2 without forming it
    delta_ = np.einsum("bij,bij->b", emp, emp)
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * trace.sum(axis=1) + p * mu**2) / p
    beta = np.minimum(beta, delta)
    shrink = np.where(beta == 0, 0.0, beta / np.where(delta == 0, 1.0, delta))
    emp *= (1.0 - shrink)[:, None, None]  # in place: these stacks are the memory-bound part
    emp[:, np.arange(p), np.arange(p)] += (shrink * mu)[:, None]
    return emp


def _cov_to_corr(cov: np.ndarray) -> np.ndarray:
    """Correlation from covariance, in place (``cov`` is a temporary of the caller)."""
    d = np.sqrt(np.einsum("bii->bi", cov))
    d[d == 0] = np.inf  # a constant ROI gets zero correlation with everything
    inv = 1.0 / d
    cov *= inv[:, :, None]
    cov *= inv[:, None, :]
    return cov


@contextlib.contextmanager
def _serial_lapack() -> Iterator[None]:
    """One BLAS thread for stacks of small LAPACK calls (eigh, Cholesky).

    A 264×264 ``eigh`` gains nothing from threads, and on a loaded machine OpenBLAS's spinning threads
    made it ~100× slower (measured 1.3 s vs 12 ms per matrix); batch-level work stays vectorised.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _spd_inverse(covs: np.ndarray) -> np.ndarray:
    """Inverse of each SPD matrix through its Cholesky factor (LAPACK potrf/potri: ~2× faster than inv)."""
    from scipy.linalg import lapack

    out = np.empty_like(covs)
    for i, c in enumerate(covs):
        chol, info = lapack.dpotrf(c, lower=False)
        if info == 0:
            inv, info = lapack.dpotri(chol, lower=False)
        if info != 0:
            raise InputError("covariance is not positive definite", fix="check the scan for duplicated ROIs")
        out[i] = inv
    lo, up = np.tril_indices(covs.shape[1], -1)
    out[:, lo, up] = out[:, up, lo]  # potri fills the upper triangle only
    return out


def _eig_map(fn: Callable[[np.ndarray], np.ndarray], mats: np.ndarray) -> np.ndarray:
    """f(A) for a stack of symmetric matrices, through their eigen-decomposition."""
    w, v = np.linalg.eigh(mats)
    return np.matmul(v * fn(w)[..., None, :], np.swapaxes(v, -1, -2))


def _geometric_mean(covs: np.ndarray, max_iter: int = 30, tol: float = 1e-7) -> np.ndarray:
    """Riemannian (Karcher) mean of SPD matrices by gradient descent: nilearn's tangent algorithm, batched."""
    gmean = covs.mean(axis=0)
    norm_old, step, norm = np.inf, 1.0, np.inf
    for _ in range(max_iter):
        w, v = np.linalg.eigh(gmean)
        inv_sqrt = (v / np.sqrt(w)) @ v.T
        logs_mean = np.zeros_like(gmean)
        for start in range(0, len(covs), _CHUNK):
            white = inv_sqrt @ covs[start : start + _CHUNK] @ inv_sqrt
            logs_mean += _eig_map(np.log, white).sum(axis=0)
        logs_mean /= len(covs)
        if np.isnan(logs_mean).any():
            raise InputError(
                "tangent reference: NaN after the matrix logarithm",
                fix="check the scans for near-constant ROIs or use kind='partial'",
            )
        norm = float(np.linalg.norm(logs_mean))
        sqrt = (v * np.sqrt(w)) @ v.T
        gmean = sqrt @ _eig_map(np.exp, logs_mean * step) @ sqrt
        if norm < norm_old:
            norm_old = norm
        elif norm > norm_old:
            step /= 2.0
            norm = norm_old
        if norm / gmean.size < tol:
            break
    else:
        warnings.warn(
            f"tangent reference: {max_iter} iterations without reaching tolerance {tol}", stacklevel=3
        )
    return gmean


def _check_reference(reference: np.ndarray, m: int) -> np.ndarray:
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != (m, m) or not np.allclose(ref, ref.T, atol=1e-8) or np.linalg.eigvalsh(ref)[0] <= 0:
        raise InputError(
            f"tangent reference must be a symmetric positive definite {m}×{m} matrix, got shape {ref.shape}",
            fix="pass the matrix from tangent_reference() on training scans",
        )
    return ref


def _lw_all(scans: list[np.ndarray]) -> np.ndarray:
    m = scans[0].shape[1]
    covs = np.empty((len(scans), m, m))
    for idx, x in _groups(scans):
        covs[idx] = _ledoit_wolf(x)
    return covs


def _warn_short(scans: list[np.ndarray], kind: str, sources: Sequence[str] | None) -> None:
    short = [i for i, x in enumerate(scans) if x.shape[0] < x.shape[1]]
    if short:
        warnings.warn(
            f"{kind} FC: {len(short)} scan(s) have fewer timepoints than ROIs (first: "
            f"{_name(sources, short[0])}, T={scans[short[0]].shape[0]}, M={scans[short[0]].shape[1]}); "
            "the covariance is only invertible thanks to Ledoit-Wolf shrinkage, so these "
            "estimates lean heavily on it",
            stacklevel=3,
        )


def covariances(
    ts: np.ndarray | Sequence[np.ndarray], *, on_constant: str = "error", sources: Sequence[str] | None = None
) -> np.ndarray:
    """Ledoit-Wolf covariances (B, M, M, float64), what the tangent kind whitens: computed part by part over a
    cohort, their :func:`geometric_mean` is its tangent reference without every series in memory at once."""
    scans = _validated(ts, sources, allow_constant=on_constant == "zero")
    with _serial_lapack():
        return _lw_all(scans)


def geometric_mean(covs: np.ndarray) -> np.ndarray:
    """The tangent reference (M×M, float64) of the scans whose :func:`covariances` these are."""
    with _serial_lapack():
        return _geometric_mean(np.asarray(covs, dtype=np.float64))


def tangent_reference(
    ts: np.ndarray | Sequence[np.ndarray], *, on_constant: str = "error", sources: Sequence[str] | None = None
) -> np.ndarray:
    """Geometric mean (M×M, float64) of the scans' Ledoit-Wolf covariances: store it with a model."""
    return geometric_mean(covariances(ts, on_constant=on_constant, sources=sources))


def connectivity(
    ts: np.ndarray | Sequence[np.ndarray],
    kind: str = "pearson",
    *,
    fisher_z: bool = True,
    reference: np.ndarray | None = None,
    on_constant: str = "error",
    sources: Sequence[str] | None = None,
) -> np.ndarray:
    """FC matrices (B, M, M) float32 from a (B, T, M) array or a list of (T_i, M) arrays.

    ``reference`` (tangent only) is the stored group mean from :func:`tangent_reference`; without it the
    mean of the given scans is used (needs ≥ 2 scans, like nilearn). ``on_constant="zero"`` accepts
    constant ROIs (e.g. outside the field of view) and gives them zero connectivity instead of refusing; for
    tangent FC the scan's other ROIs get the tangent FC of that sub-block (a reference built from scans with
    constant ROIs still includes their shrunk variances).
    ``sources`` names the scans (file paths) in error messages.
    """
    if kind not in KINDS:
        raise InputError(f"unknown connectivity kind '{kind}'", fix=f"use one of {', '.join(KINDS)}")
    if on_constant not in ("error", "zero"):
        raise InputError(
            f"on_constant must be 'error' or 'zero', got '{on_constant}'", fix="use 'error' or 'zero'"
        )
    if reference is not None and kind != "tangent":
        raise InputError(f"reference= only applies to kind='tangent', not '{kind}'", fix="drop reference=")
    scans = _validated(ts, sources, allow_constant=on_constant == "zero")
    m = scans[0].shape[1]
    out = np.empty((len(scans), m, m), dtype=np.float32)
    diag = np.arange(m)

    def finish(fc: np.ndarray) -> np.ndarray:  # on the chunk while it is in cache
        if fisher_z:
            np.clip(fc, -_CLIP, _CLIP, out=fc)
            np.arctanh(fc, out=fc)
        fc[:, diag, diag] = 0.0
        return fc

    if kind == "pearson":
        for idx, x in _groups(scans):
            out[idx] = finish(_cov_to_corr(_centred_scatter(x)[1]))
    elif kind == "partial":
        _warn_short(scans, kind, sources)
        with _serial_lapack():
            for idx, x in _groups(scans):
                partial = _cov_to_corr(_spd_inverse(_ledoit_wolf(x)))
                np.negative(partial, out=partial)
                out[idx] = finish(partial)
    else:
        _warn_short(scans, kind, sources)
        if reference is None and len(scans) < 2:
            raise InputError(
                "tangent FC of a single scan needs the training group's reference",
                fix="pass reference=tangent_reference(training scans) (stored with the model)",
            )
        with _serial_lapack():
            covs = _lw_all(scans)
            ref = _geometric_mean(covs) if reference is None else _check_reference(reference, m)
            white = _eig_map(lambda w: 1.0 / np.sqrt(w), ref)
            varies = np.stack([x.max(axis=0) != x.min(axis=0) for x in scans])
            full = np.flatnonzero(varies.all(axis=1))
            for start in range(0, len(full), _CHUNK):
                idx = full[start : start + _CHUNK]
                out[idx] = _eig_map(np.log, white @ covs[idx] @ white)
            # A scan with constant ROIs: the tangent FC of its varying ROIs alone (their Ledoit-Wolf covariance
            # against the reference's sub-block), zeros for the constant ones. Whitening their shrinkage-only
            # variance by the full reference gave them large log-ratios and moved the other edges too.
            for i in np.flatnonzero(~varies.all(axis=1)):
                v = np.flatnonzero(varies[i])
                out[i] = 0.0
                if len(v):
                    w = _eig_map(lambda e: 1.0 / np.sqrt(e), ref[np.ix_(v, v)])
                    cov = _ledoit_wolf(scans[i][None, :, v])[0]
                    out[i][np.ix_(v, v)] = _eig_map(np.log, w @ cov @ w)
    return out


def upper_triangle(fc: np.ndarray) -> np.ndarray:
    """(B, M(M-1)/2) edge vectors (strict upper triangle, row-major), e.g. for an SVM or an MLP."""
    fc = np.asarray(fc)
    if fc.ndim == 2:
        fc = fc[None]
    if fc.ndim != 3 or fc.shape[1] != fc.shape[2]:
        raise InputError(
            f"expected (B, M, M) matrices, got shape {fc.shape}", fix="pass connectivity() output"
        )
    iu = np.triu_indices(fc.shape[1], k=1)
    return fc[:, iu[0], iu[1]]


def file_digest(path: str | Path) -> str:
    """Content hash of a file (streamed sha256), the part of a cache key that survives copies."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FCCache:
    """Per-scan on-disk cache of arrays derived from one input file (ROI series, FC matrices).

    A key covers (file size, mtime_ns, content hash, what was computed and with which options): editing,
    replacing or touching the file, or changing an option, computes again. Entries are ``<key>.npy``
    written atomically, so a killed job never leaves a half-written entry that would be read back. A folder
    that cannot be written or searched is said once and then skipped (as the preprocessing cache): inference
    must not fail for want of a cache.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.usable = True
        self._digests: dict[tuple[str, int, int], str] = {}

    def key(self, path: str | Path, **options: Any) -> str:
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            raise InputError("file not found or unreadable", path=p, fix="check the path") from None
        stamp = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if stamp not in self._digests:  # once per process; a .gz by its blocks and CRC, not a full read of a 2 GB run
            try:
                self._digests[stamp] = content_sample(p, st.st_size).hex()
            except OSError as err:  # a folder, an unreadable file: the input's fault, said as such (exit 2)
                raise InputError(f"cannot read the file ({err.strerror or err})", path=p,
                                 fix="give a readable file") from None
        blob = json.dumps(
            {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": self._digests[stamp],
                "options": options,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, key: str) -> np.ndarray | None:
        if not self.usable:
            return None
        f = self.root / f"{key}.npy"
        try:
            if not f.exists():  # exists() raises on a folder it may not search
                return None
            return np.load(f, allow_pickle=False)
        except PermissionError as err:
            self._unusable("read", err)
        except (OSError, ValueError):
            pass  # a damaged entry: computed again and replaced
        return None

    def put(self, key: str, arr: np.ndarray) -> None:
        if not self.usable:
            return
        try:
            with atomic_path(self.root / f"{key}.npy") as tmp:
                np.save(tmp, np.asarray(arr), allow_pickle=False)
        except OSError as err:
            self._unusable("write", err)

    def _unusable(self, what: str, err: OSError) -> None:
        from neuromoe.data.preprocess import say_cache_skipped

        self.usable = False
        say_cache_skipped(self.root, f"cannot {what} the connectivity cache", err,
                          "give a writable folder with NEUROMOE_CACHE")

    def fetch(self, path: str | Path, compute: Callable[[], np.ndarray], **options: Any) -> np.ndarray:
        """The cached array for (``path``, ``options``), or ``compute()`` stored under that key."""
        key = self.key(path, **options)
        hit = self.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        arr = compute()
        self.put(key, arr)
        return arr
