"""One PNG with orthogonal slices of structural T1s and lesion cases (with mask contours)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromoe.errors import InputError
from neuromoe.io.atomic import atomic_path


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    c = [s // 2 for s in vol.shape]
    return [vol[c[0]].T, vol[:, c[1]].T, vol[:, :, c[2]].T]


def quicklook(cohort_dir: str | Path, out_png: str | Path, n: int = 3) -> Path:
    """Rows: ``n`` structural T1s, then ``n`` lesion cases (each available modality, contour in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(cohort_dir)
    panels: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    man = root / "manifests" / "structural.csv"
    if man.exists():
        for r in list(csv.DictReader(man.open()))[:n]:
            panels.append((f"{r['subject']} T1 age {float(r['age']):.0f} {r['dx_ad'] or r['dx_pd']}",
                           nib.load(man.parent / r["t1"]).get_fdata(), None))
    man = root / "manifests" / "lesion.csv"
    if man.exists():
        for r in list(csv.DictReader(man.open()))[:n]:
            mask = nib.load(man.parent / r["mask"]).get_fdata() > 0
            for mod in ("t1", "t1c", "t2", "flair", "dwi"):
                if r.get(mod):
                    panels.append((f"{r['subject']} {mod} {r['lesion_type']}", nib.load(man.parent / r[mod]).get_fdata(),
                                   mask))
    if not panels:
        raise InputError(f"{root}: no structural or lesion manifest; run `neuromoe synth --out {root}` first")
    fig, axes = plt.subplots(len(panels), 3, figsize=(6, 2 * len(panels)), squeeze=False)
    for row, (title, vol, mask) in zip(axes, panels, strict=True):
        if mask is not None:  # slice through the lesion centre so the contour is visible
            c = np.argwhere(mask).mean(0).round().astype(int) if mask.any() else np.array(vol.shape) // 2
            sl = [vol[c[0]].T, vol[:, c[1]].T, vol[:, :, c[2]].T]
            ml = [mask[c[0]].T, mask[:, c[1]].T, mask[:, :, c[2]].T]
        else:
            sl, ml = _slices(vol), [None] * 3
        vmax = np.percentile(vol, 99.5)
        for ax, s, m in zip(row, sl, ml, strict=True):
            ax.imshow(s, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            if m is not None and m.any():
                ax.contour(m.astype(float), levels=[0.5], colors="r", linewidths=0.8)
            ax.axis("off")
        row[0].set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return out
