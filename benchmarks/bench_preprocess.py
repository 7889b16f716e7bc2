"""Preprocessing throughput, cold vs cached, on volumes built from the nilearn MNI152 template; prints JSON.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_preprocess.py --n 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.datasets import load_mni152_template

from neuromoe.data.preprocess import PreprocSpec, preprocess_cohort


def _cohort(root: Path, n: int) -> pd.DataFrame:
    """``n`` template copies with random intensity scale, noise and a 1-voxel shift (distinct files)."""
    tpl = load_mni152_template(resolution=2)
    base = np.asarray(tpl.get_fdata(), dtype=np.float32)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        data = np.roll(base, rng.integers(-1, 2, 3), axis=(0, 1, 2)) * rng.uniform(0.5, 2.0)
        data += (base > 0) * rng.normal(0, 5, base.shape).astype(np.float32)
        path = root / f"sub-{i:03d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), tpl.affine), path)
        rows.append({"subject": f"sub-{i:03d}", "t1": str(path)})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    spec = PreprocSpec(spacing=(3.0, 3.0, 3.0), shape=(64, 64, 64))
    with tempfile.TemporaryDirectory() as tmp:
        table = _cohort(Path(tmp), args.n)
        times = {}
        for label in ("cold", "cached"):
            t0 = time.perf_counter()
            summary = preprocess_cohort(table, spec, Path(tmp) / "cache", workers=args.workers, progress=False)
            times[label] = time.perf_counter() - t0
            assert summary["failed"] == 0
    print(json.dumps({
        "volumes": args.n, "workers": args.workers, "input_shape": [91, 109, 91], "spec": spec.to_dict(),
        "cold_vol_per_s": round(args.n / times["cold"], 2), "cached_vol_per_s": round(args.n / times["cached"], 2),
        "speedup": round(times["cold"] / times["cached"], 1),
    }))


if __name__ == "__main__":
    main()
