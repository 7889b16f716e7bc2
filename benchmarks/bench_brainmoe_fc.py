"""BrainMoE connectivity benchmark: our batched FC vs nilearn's ConnectivityMeasure on the same scans.

Default workload = the issue's: 1,000 scans of 264 ROIs × 200 TRs (random AR(1) series with shared
network factors, generated here). For each kind both implementations run in the same process on the same
data; the JSON reports seconds, scans/s, ratio ours/nilearn (target ≤ 1) and the largest difference of
the results. Pearson is compared with nilearn's "correlation" using EmpiricalCovariance (the same
quantity, without the unused precision matrix; nilearn's default Ledoit-Wolf estimator shrinks correlations
and is timed as well).

    python benchmarks/bench_brainmoe_fc.py [--n-scans 1000 --n-rois 264 --n-t 200 --kinds pearson,partial,tangent]

``fc_timings`` is importable so that model benchmarks (FC + embedding, router/adapter scans/s) can add
their own sections to the same JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence

import numpy as np

from neuromoe.data.connectivity import KINDS, connectivity


def ar1_series(n_scans: int, n_rois: int, n_t: int, *, seed: int = 0, n_factors: int = 7) -> np.ndarray:
    """(B, T, M) float32: AR(1) latent network factors mixed into ROIs plus independent AR(1) noise."""
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n_scans, n_t, n_factors))
    noise = rng.standard_normal((n_scans, n_t, n_rois))
    for t in range(1, n_t):
        lat[:, t] = 0.6 * lat[:, t - 1] + 0.8 * lat[:, t]
        noise[:, t] = 0.3 * noise[:, t - 1] + noise[:, t]
    mix = rng.standard_normal((n_factors, n_rois)) * (rng.random((n_factors, n_rois)) < 0.3)
    return (lat @ mix + noise).astype(np.float32)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _nilearn(kind: str, scans: list[np.ndarray]) -> np.ndarray:
    from nilearn.connectome import ConnectivityMeasure
    from sklearn.covariance import EmpiricalCovariance

    if kind == "pearson":
        cm = ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance(store_precision=False))
    else:
        cm = ConnectivityMeasure(kind={"partial": "partial correlation", "tangent": "tangent"}[kind])
    return cm.fit_transform(scans)


def fc_timings(
    n_scans: int = 1000,
    n_rois: int = 264,
    n_t: int = 200,
    *,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    repeats: int = 3,
    tangent_repeats: int = 1,
) -> dict:
    """Seconds and scans/s of our ``connectivity`` and of nilearn per kind, their ratio and max difference.

    Ours and nilearn alternate ``repeats`` times and the fastest run of each counts: on a shared machine
    the minimum is the least disturbed measurement. All runs are listed.
    """
    from nilearn.connectome import ConnectivityMeasure

    x = ar1_series(n_scans, n_rois, n_t, seed=seed)
    scans = list(x)
    off = ~np.eye(n_rois, dtype=bool)
    out: dict = {}
    for kind in kinds:
        runs_ours, runs_ref = [], []
        for _ in range(tangent_repeats if kind == "tangent" else repeats):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours, t = _timed(lambda k=kind: connectivity(x, k, fisher_z=False))
                runs_ours.append(t)
                ref, t = _timed(lambda k=kind: _nilearn(k, scans))
                runs_ref.append(t)
        sel = (slice(None), off) if kind != "tangent" else (slice(None),)
        t_ours, t_ref = min(runs_ours), min(runs_ref)
        out[kind] = {
            "ours_s": round(t_ours, 3),
            "nilearn_s": round(t_ref, 3),
            "ratio_ours_over_nilearn": round(t_ours / t_ref, 3),
            "ours_scans_per_s": round(n_scans / t_ours, 1),
            "nilearn_scans_per_s": round(n_scans / t_ref, 1),
            "max_abs_diff": float(np.abs(ours[sel] - ref[sel]).max()),
            "max_abs_value": float(np.abs(ref[sel]).max()),
            "runs_ours_s": [round(t, 3) for t in runs_ours],
            "runs_nilearn_s": [round(t, 3) for t in runs_ref],
        }
        if kind == "pearson":
            _, t_z = _timed(lambda: connectivity(x, "pearson"))
            _, t_default = _timed(lambda: ConnectivityMeasure(kind="correlation").fit_transform(scans))
            out[kind]["ours_fisher_z_s"] = round(t_z, 3)
            out[kind]["nilearn_default_ledoit_wolf_s"] = round(t_default, 3)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-scans", type=int, default=1000)
    ap.add_argument("--n-rois", type=int, default=264)
    ap.add_argument("--n-t", type=int, default=200)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per kind (fastest counts)")
    ap.add_argument("--tangent-repeats", type=int, default=1)
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="BLAS threads for both implementations (0 = library default); 1 keeps the comparison "
        "fair on a shared machine, where spinning OpenBLAS threads slow small eigh ~100×",
    )
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    limit = threadpool_limits(limits=args.blas_threads, user_api="blas") if args.blas_threads > 0 else None
    result = {
        "benchmark": "brainmoe_fc",
        "workload": {"n_scans": args.n_scans, "n_rois": args.n_rois, "n_t": args.n_t, "seed": args.seed},
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "blas_threads": args.blas_threads or "default",
        },
        "fc": fc_timings(
            args.n_scans,
            args.n_rois,
            args.n_t,
            kinds=args.kinds.split(","),
            seed=args.seed,
            repeats=args.repeats,
            tangent_repeats=args.tangent_repeats,
        ),
    }
    if limit is not None:
        limit.restore_original_limits()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
