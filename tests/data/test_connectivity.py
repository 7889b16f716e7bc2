"""Connectivity: equality with nilearn's ConnectivityMeasure per kind, validation errors, cache keys."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from nilearn.connectome import ConnectivityMeasure
from sklearn.covariance import EmpiricalCovariance

from neuromoe.data.connectivity import KINDS, FCCache, connectivity, tangent_reference, upper_triangle
from neuromoe.errors import InputError

B, T, M = 12, 50, 16
OFF = ~np.eye(M, dtype=bool)


def _series(n: int = B, t: int = T, m: int = M, seed: int = 0) -> np.ndarray:
    """AR(1) series with shared factors, so correlations are far from zero and Ledoit-Wolf shrinks little."""
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n, t, 3))
    for i in range(1, t):
        lat[:, i] = 0.6 * lat[:, i - 1] + 0.8 * lat[:, i]
    return lat @ rng.standard_normal((3, m)) + rng.standard_normal((n, t, m)) + 5.0


def test_pearson_equals_nilearn_correlation_and_fisher_z() -> None:
    x = _series()
    ref = ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance()).fit_transform(list(x))
    r = connectivity(x, "pearson", fisher_z=False)
    assert r.dtype == np.float32 and r.shape == (B, M, M)
    np.testing.assert_allclose(r[:, OFF], ref[:, OFF], atol=1e-6)
    z = connectivity(x, "pearson")
    np.testing.assert_allclose(z[:, OFF], np.arctanh(ref[:, OFF]), atol=1e-5)
    assert np.all(z[:, ~OFF] == 0) and np.abs(z).max() > 0.5


def test_partial_equals_nilearn_partial_correlation_with_ledoit_wolf() -> None:
    x = _series()
    ref = ConnectivityMeasure(kind="partial correlation").fit_transform(list(x))  # LedoitWolf by default
    p = connectivity(x, "partial", fisher_z=False)
    np.testing.assert_allclose(p[:, OFF], ref[:, OFF], atol=1e-6)
    np.testing.assert_allclose(connectivity(x, "partial")[:, OFF], np.arctanh(ref[:, OFF]), atol=1e-5)


def test_tangent_equals_nilearn_fit_and_reused_reference() -> None:
    x, new = _series(), _series(4, 70, seed=1)
    cm = ConnectivityMeasure(kind="tangent")
    ref_train = cm.fit_transform(list(x))
    np.testing.assert_allclose(connectivity(x, "tangent"), ref_train, atol=1e-6)
    mean = tangent_reference(x)
    np.testing.assert_allclose(mean, cm.mean_, rtol=1e-10, atol=1e-10)
    # a single new scan embedded around the stored training mean = nilearn's transform
    one = connectivity(new[:1], "tangent", reference=mean)
    np.testing.assert_allclose(one, cm.transform(list(new))[:1], atol=1e-6)


def test_different_lengths_equal_per_scan_results() -> None:
    scans = [_series(1, t, seed=t)[0] for t in (30, 45, 30, 60)]
    for kind in ("pearson", "partial"):
        together = connectivity(scans, kind)
        alone = np.concatenate([connectivity([s], kind) for s in scans])
        np.testing.assert_allclose(together, alone, atol=1e-6)
    ref = ConnectivityMeasure(kind="tangent").fit_transform(scans)
    np.testing.assert_allclose(connectivity(scans, "tangent"), ref, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_series_are_refused_with_a_named_source(kind: str) -> None:
    x = _series(2)
    with pytest.raises(InputError, match=r"a\.npy: only 2 timepoints"):
        connectivity([x[0, :2]], kind, sources=["a.npy"])
    bad = x.copy()
    bad[1, 7, 3] = np.nan
    with pytest.raises(InputError, match=r"b\.npy: 1 NaN/Inf values \(first at timepoint 7, ROI 3\)"):
        connectivity(bad, kind, sources=["a.npy", "b.npy"])
    bad[1, 7, 3] = np.inf
    with pytest.raises(InputError, match="NaN/Inf"):
        connectivity(bad, kind)
    const = x.copy()
    const[0, :, 5] = 2.0
    with pytest.raises(InputError, match=r"scan0\.tsv: ROI 5 is constant \(zero variance\)"):
        connectivity(const, kind, sources=["scan0.tsv", "scan1.tsv"])
    with pytest.raises(InputError, match=r"s1: 15 ROIs, but s0 has 16"):
        connectivity([x[0], x[1, :, :15]], kind, sources=["s0", "s1"])


def test_constant_roi_can_be_given_zero_connectivity() -> None:
    x = _series(3)
    x[:, :, 2] = 0.1  # e.g. a sphere outside the field of view (0.1: its mean is not exact in binary)
    for kind in ("pearson", "partial"):
        fc = connectivity(x, kind, on_constant="zero")
        assert np.isfinite(fc).all() and np.all(fc[:, 2] == 0) and np.all(fc[:, :, 2] == 0)
        keep = np.delete(np.arange(M), 2)
        assert np.abs(fc[:, keep][:, :, keep]).max() > 0.1
    # tangent: the constant ROI's row and column are zero, the other edges are the tangent of the varying
    # sub-block (whitening the constant ROI by the full reference gave it large values and moved the others)
    ref = tangent_reference(_series(6))
    fc = connectivity(x, "tangent", on_constant="zero", reference=ref)
    keep = np.delete(np.arange(M), 2)
    assert np.isfinite(fc).all() and np.all(fc[:, 2] == 0) and np.all(fc[:, :, 2] == 0)
    sub = connectivity(x[:, :, keep], "tangent", reference=ref[np.ix_(keep, keep)])
    np.testing.assert_allclose(fc[:, keep][:, :, keep], sub, atol=1e-6)


def test_other_refusals_and_short_scan_warning() -> None:
    x = _series(2)
    with pytest.raises(InputError, match="unknown connectivity kind 'covariance'"):
        connectivity(x, "covariance")
    with pytest.raises(InputError, match="single scan needs the training group's reference"):
        connectivity(x[:1], "tangent")
    with pytest.raises(InputError, match="symmetric positive definite 16×16"):
        connectivity(x, "tangent", reference=-np.eye(M))
    with pytest.raises(InputError, match="only applies to kind='tangent'"):
        connectivity(x, "pearson", reference=np.eye(M))
    with pytest.raises(InputError, match="must be 2D"):
        connectivity([x[0, :, 0]])
    short = _series(2, t=10, m=20)  # T < M: only Ledoit-Wolf shrinkage makes the covariance invertible
    with pytest.warns(UserWarning, match="fewer timepoints than ROIs"):
        fc = connectivity(short, "partial")
    assert np.isfinite(fc).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        connectivity(short, "pearson")  # plain correlation is defined for any T ≥ 3: no warning


def test_upper_triangle_vectorises_edges_in_row_major_order() -> None:
    fc = connectivity(_series(3), "pearson")
    v = upper_triangle(fc)
    assert v.shape == (3, M * (M - 1) // 2)
    assert v[1, 0] == fc[1, 0, 1] and v[1, M - 1] == fc[1, 1, 2] and v[2, -1] == fc[2, M - 2, M - 1]
    assert upper_triangle(fc[0]).shape == (1, M * (M - 1) // 2)
    with pytest.raises(InputError, match=r"expected \(B, M, M\)"):
        upper_triangle(np.zeros((2, 3, 4)))


def test_cache_key_follows_content_mtime_and_options(tmp_path) -> None:
    f = tmp_path / "s.npy"
    np.save(f, _series(1)[0])
    cache = FCCache(tmp_path / "cache")
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return connectivity([np.load(f)])[0]

    a = cache.fetch(f, compute, kind="pearson")
    b = cache.fetch(f, compute, kind="pearson")
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(a, b)
    cache.fetch(f, compute, kind="partial")  # other options: other entry
    assert len(calls) == 2
    st = f.stat()
    x = np.load(f)
    x[0, 0] += 1.0
    np.save(f, x)  # same size; force the old mtime so only the content hash can tell
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    fresh = FCCache(tmp_path / "cache")  # a new process: content hashes are memoised per instance
    c = fresh.fetch(f, compute, kind="pearson")
    assert len(calls) == 3 and not np.array_equal(a, c)
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # atomic writes leave no temporaries


def test_an_unwritable_cache_is_said_once_and_skipped(tmp_path, capsys) -> None:
    """A cache folder that cannot be created (here: a file is in the way; a read-only home in a container) made
    the command fail; the arrays are now computed as without a cache, and that is said once."""
    f = tmp_path / "s.npy"
    np.save(f, _series(1)[0])
    (tmp_path / "blocked").write_text("a file where the cache folder would go")
    cache = FCCache(tmp_path / "blocked" / "cache")
    for _ in range(2):
        fc = cache.fetch(f, lambda: connectivity([np.load(f)])[0], kind="pearson")
        assert fc.shape == (np.load(f).shape[1],) * 2
    assert capsys.readouterr().err.count("cannot write the connectivity cache") == 1 and not cache.usable
