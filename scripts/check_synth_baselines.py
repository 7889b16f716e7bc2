"""How hard is each structural label of a synthetic cohort for simple features? (generator sanity check)

The DenseFormer acceptance needs the labels to be learnable from the image but *not* solved by a
one-number baseline. This script measures, with 5-fold cross-validated scikit-learn models on the raw
generator output (template grid, no preprocessing):

* ``tbv``: total brain volume (voxels above 0.45 of the white-matter intensity) — the documented simple
  baseline; ``tbv_icv`` adds head size (voxels above 0.1), as a real volumetric analysis would;
* ``blocks``: mean intensity of 4³-voxel blocks (12 mm at 3 mm spacing), ridge / L2-logistic;
* ``regional``: mean intensity in the generator's regions (medial temporal lobe, ventricles, temporal
  horns, putamen/SN, cortical ribbon, brain), an upper-bound-ish hand-crafted feature set.

Labels: age (all subjects; MAE next to predict-the-mean, R²), AD vs CN, PD vs HC, sex (AUC).

Usage::

    python scripts/check_synth_baselines.py runs/df/cohort [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from neuromoe.data.synth.anatomy import load_anatomy
from neuromoe.data.synth.structural import (
    MEDIAL_TEMPORAL,
    PD_REGIONS,
    TEMPORAL_HORNS,
    VENTRICLES,
    region_union,
)
from neuromoe.eval.metrics import classification_metrics, regression_metrics
from neuromoe.io.table import load_table


def features(images: np.ndarray, spacing: float) -> dict[str, np.ndarray]:
    """The three feature sets of the module docstring, one row per subject."""
    anat = load_anatomy(spacing)
    cortex = (anat.gm > 0.3) & ~ndimage.binary_erosion(anat.brain, iterations=max(1, round(9 / spacing)))
    masks = [region_union(anat, r) > 0.5 for r in (MEDIAL_TEMPORAL, VENTRICLES, TEMPORAL_HORNS, PD_REGIONS)]
    masks += [cortex, anat.brain]
    tbv = (images > 0.45).reshape(len(images), -1).sum(1).astype(float)
    icv = (images > 0.1).reshape(len(images), -1).sum(1).astype(float)
    b = 4
    crop = tuple(s - s % b for s in images.shape[1:])
    v = images[:, : crop[0], : crop[1], : crop[2]]
    blocks = v.reshape(len(v), crop[0] // b, b, crop[1] // b, b, crop[2] // b, b).mean((2, 4, 6))
    return {
        "tbv": tbv[:, None],
        "tbv_icv": np.stack([tbv, icv, tbv / icv], 1),
        "blocks": blocks.reshape(len(v), -1),
        "regional": np.stack([images[:, m].mean(1) for m in masks], 1),
    }


def _cv_predict(x: np.ndarray, y: np.ndarray, classify: bool, seed: int) -> np.ndarray:
    if classify:  # small cohorts: as many folds as the rarer class allows (callers skip fewer than 3)
        m = int(np.bincount(y).min())
        k = min(5, m)
        inner = min(5, m - -(-m // k))  # the rarer class's count in every training fold (5 from 7 up)
        cv = StratifiedKFold(k, shuffle=True, random_state=seed)
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=inner, max_iter=2000))
        return cross_val_predict(model, x, y, cv=cv, method="predict_proba")
    cv = KFold(5, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15)))
    return cross_val_predict(model, x, y, cv=cv)


def check(cohort: Path, seed: int = 0) -> dict:
    """Cross-validated metrics per (label, feature set)."""
    manifest = cohort / "manifests" / "structural.csv" if cohort.is_dir() else cohort
    table = load_table(manifest)
    imgs = [nib.load(p) for p in table["t1"]]  # load_table made the paths absolute
    spacing = float(abs(imgs[0].affine[0, 0]))
    images = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs])
    feats = features(images, spacing)
    dx_ad, dx_pd = table["dx_ad"].fillna("").astype(str), table["dx_pd"].fillna("").astype(str)
    labels = {
        "age": (np.ones(len(table), bool), table["age"].to_numpy(float), False),
        "AD vs CN": (dx_ad.isin(["CN", "AD"]).to_numpy(), (dx_ad == "AD").to_numpy(int), True),
        "PD vs HC": (dx_pd.isin(["HC", "PD"]).to_numpy(), (dx_pd == "PD").to_numpy(int), True),
        "sex": (np.ones(len(table), bool), (table["sex"] == "M").to_numpy(int), True),
    }
    out: dict = {"cohort": str(cohort), "n": len(table), "seed": seed, "results": {}}
    for name, (sel, y, classify) in labels.items():
        res: dict = {"n": int(sel.sum())}
        if classify and (np.unique(y[sel]).size < 2 or np.bincount(y[sel]).min() < 3):
            res["skipped"] = "fewer than 3 subjects in a class"
            out["results"][name] = res
            continue
        if not classify:
            res["mean_predictor_mae"] = float(np.abs(y[sel] - y[sel].mean()).mean())
        for fname, x in feats.items():
            p = _cv_predict(x[sel], y[sel], classify, seed)
            if classify:
                res[fname] = {"auc": classification_metrics(y[sel], p)["auc"]}
            else:
                m = regression_metrics(y[sel], p)
                res[fname] = {"mae": m["mae"], "r2": m["r2"]}
        out["results"][name] = res
    return out


def markdown(res: dict) -> str:
    """The table for docs/experiments.md."""
    names = ["tbv", "tbv_icv", "blocks", "regional"]
    lines = ["| label | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, r in res["results"].items():
        if "skipped" in r:
            cells = [r["skipped"]] + [""] * (len(names) - 1)
            label = f"{label} (n={r['n']})"
        elif "mean_predictor_mae" in r:
            cells = [f"MAE {r[n]['mae']:.2f} y (R² {r[n]['r2']:.2f})" for n in names]
            label = f"{label} (n={r['n']}, mean-predictor MAE {r['mean_predictor_mae']:.2f} y)"
        else:
            cells = [f"AUC {r[n]['auc']:.2f}" for n in names]
            label = f"{label} (n={r['n']})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cohort", type=Path, help="cohort folder (with manifests/structural.csv) or the manifest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    res = check(args.cohort, args.seed)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["results"], indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
