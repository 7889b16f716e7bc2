"""Synthetic-cohort generation time per subject and kind → JSON on stdout.

``python benchmarks/bench_synth.py [--n 10] [--spacing 3.0] [--out bench_out/bench_synth.json]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from neuromoe.data.synth import synth_cohort
from neuromoe.data.synth.anatomy import load_anatomy
from neuromoe.io.atomic import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10, help="subjects per kind")
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--out", default="bench_out/bench_synth.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    load_anatomy(args.spacing)
    res: dict = {"spacing": args.spacing, "n": args.n, "anatomy_load_s": time.perf_counter() - t0,
                 "per_subject_s": {}}
    for kind in ("structural", "lesion", "fmri"):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            synth_cohort(d, n_structural=args.n, n_lesion=args.n, n_fmri=args.n, spacing=args.spacing,
                         kinds=(kind,), progress=False)
            res["per_subject_s"][kind] = (time.perf_counter() - t) / args.n
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()
