"""BrainMoE inputs: ROI time series from 4D BOLD + atlas, ready series files, manifests and BIDS ``func/``.

BOLD images pass the toolkit's header guards (:func:`neuromoe.io.nifti.load_nifti`) before nilearn's
maskers touch them, so absurd headers, NaNs and empty images are refused with one clear line. The default
atlas is nilearn's bundled Power-264 coordinate list (no download). ROIs that have no voxel inside the
image's field of view (or no signal) are never silently zero: a warning names them and
``return_mask=True`` gives the mask of valid ROIs; their all-zero columns make :func:`connectivity` refuse
the scan unless it is told ``on_constant="zero"``.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import nilearn
import numpy as np
import pandas as pd

from neuromoe.data.connectivity import MIN_TIMEPOINTS, FCCache, check_timeseries, connectivity, file_digest
from neuromoe.errors import InputError
from neuromoe.io.nifti import MAX_VOXELS, Image, load_nifti, resample_to_grid
from neuromoe.io.table import load_table

Atlas = str | Path | np.ndarray | None
SOURCES = ("auto", "timeseries", "bold")
_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}


def load_timeseries(path: str | Path) -> np.ndarray:
    """A ready T×M ROI series from ``.npy`` or ``.tsv``/``.csv`` (header row optional) as float32."""
    p = Path(path)
    if not p.exists():
        raise InputError("time series file not found", path=p, fix="check the path in the manifest")
    name = p.name.lower()
    if name.endswith(".npy"):
        try:
            x = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"cannot read .npy ({type(exc).__name__})",
                path=p,
                fix="save a plain numeric array with numpy.save",
            ) from None
    elif name.endswith((".tsv", ".csv", ".tsv.gz", ".csv.gz")):
        x = _read_text_table(p, "\t" if ".tsv" in name else ",")
    else:
        raise InputError(
            "unsupported time series format", path=p, fix="use .npy, .tsv or .csv (T rows × M ROIs)"
        )
    return check_timeseries(x, source=p, allow_constant=True).astype(np.float32)


def _read_text_table(p: Path, sep: str) -> np.ndarray:
    try:
        raw = pd.read_csv(p, sep=sep, header=None, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises parser-specific types
        raise InputError(
            f"cannot parse table ({type(exc).__name__})",
            path=p,
            fix="save T rows × M numeric columns, optional header row",
        ) from None
    if raw.empty:
        raise InputError("empty time series table", path=p, fix="save T rows × M numeric columns")
    missing = ["n/a", "nan", "NaN"]
    first = pd.to_numeric(raw.iloc[0], errors="coerce")
    header = (first.isna() & ~raw.iloc[0].isin(missing)).any()  # a non-numeric first row; n/a is data
    # column numbers as the header (pandas' to_csv writes 0..M-1, atlases label ROIs 1..M): read as a time
    # point they shifted every FC value; no measured first time point is an exact integer ramp
    ramp = first.notna().all() and len(first) >= 3 and raw.iloc[0].str.fullmatch(r"\s*\d+\s*").all()
    header = header or bool(ramp and first.iloc[0] in (0, 1) and (np.diff(first.to_numpy()) == 1).all())
    body = raw.iloc[1:] if header else raw
    num = body.apply(pd.to_numeric, errors="coerce")
    bad = num.isna() & ~body.isin(missing)
    if bad.to_numpy().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise InputError(
            f"non-numeric value '{body.iat[r, c]}' at row {r + 1 + (len(raw) - len(body))}, column {c + 1}",
            path=p,
            fix="keep numbers only (one header row allowed)",
        )
    return num.to_numpy(dtype=np.float64)


def _repetition_time(img: Image, path: Path) -> float:
    zooms = img.header.get_zooms() if img.header is not None else ()
    unit = img.header.get_xyzt_units()[1] if img.header is not None else "unknown"
    if len(zooms) > 3 and zooms[3] > 0 and unit in _TIME_UNITS:
        return float(zooms[3]) * _TIME_UNITS[unit]
    raise InputError(
        "band-pass filtering needs the repetition time, and the header has none "
        f"(pixdim[4]={zooms[3] if len(zooms) > 3 else None}, unit {unit})",
        path=path,
        fix="pass t_r= (seconds)",
    )


def _coords(atlas: Atlas) -> np.ndarray | None:
    """(M, 3) world coordinates when ``atlas`` is a coordinate atlas, else None (label image)."""
    if atlas is None:
        from neuromoe.data.synth.fmri import power_coords

        return power_coords()
    if isinstance(atlas, np.ndarray):
        c = np.asarray(atlas, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != 3 or not np.isfinite(c).all():
            raise InputError(
                f"coordinate atlas must be a finite (M, 3) array, got shape {c.shape}",
                fix="pass MNI x, y, z per ROI",
            )
        return c
    p = Path(atlas)
    if p.name.endswith((".nii", ".nii.gz")):
        return None
    if not p.exists() or p.suffix not in (".tsv", ".csv"):
        raise InputError(
            "atlas is neither a label image (.nii/.nii.gz) nor a coordinate table (.tsv/.csv)",
            path=p,
            fix="give a label NIfTI or a table with x, y, z columns",
        )
    df = pd.read_csv(p, sep="\t" if p.suffix == ".tsv" else ",")
    cols = {c.lower(): c for c in df.columns}
    if not {"x", "y", "z"} <= set(cols):
        raise InputError(
            f"coordinate table has no x, y, z columns (has {list(df.columns)})",
            path=p,
            fix="add x, y, z columns (world mm, e.g. MNI)",
        )
    c = df[[cols["x"], cols["y"], cols["z"]]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(c).all():
        raise InputError("non-numeric or missing coordinates", path=p, fix="fill every x, y, z")
    return c


def atlas_digest(atlas: Atlas) -> str:
    """Identity of an atlas for cache keys: content hash of its file or of its coordinates."""
    if atlas is None:
        return "power264"
    if isinstance(atlas, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(atlas, dtype=np.float64).tobytes()).hexdigest()[:16]
    return file_digest(atlas)[:16]


def _sphere_valid(
    coords: np.ndarray, shape: tuple[int, ...], affine: np.ndarray, radius: float
) -> np.ndarray:
    """Spheres nilearn would not find empty: a voxel centre within ``radius`` or the seed's voxel in the image."""
    from scipy.spatial import cKDTree

    vox = nib.affines.apply_affine(np.linalg.inv(affine), coords)
    nearest = np.round(vox).astype(int)
    inside = np.all((nearest >= 0) & (nearest < np.array(shape[:3])), axis=1)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape[:3]], indexing="ij"), -1).reshape(-1, 3)
    dist, _ = cKDTree(nib.affines.apply_affine(affine, grid)).query(coords, k=1)
    return inside | (dist <= radius)


def _label_atlas(path: Path, bold: Image) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Labels resampled (nearest) onto the BOLD grid, and which atlas labels (sorted) remain on it."""
    lab = load_nifti(path)
    if not np.allclose(lab.data, np.round(lab.data)):
        raise InputError(
            "label atlas has non-integer values",
            path=path,
            fix="give an integer label image (a probabilistic map needs NiftiMapsMasker)",
        )
    labels = np.unique(np.round(lab.data).astype(np.int64))
    labels = labels[labels != 0]
    on_grid = np.round(resample_to_grid(lab.data, lab.affine, bold.data.shape[:3], bold.affine, order=0))
    present = np.isin(labels, np.unique(on_grid.astype(np.int64)))
    return nib.Nifti1Image(on_grid.astype(np.int32), bold.affine), present


def extract_timeseries(
    bold_path: str | Path,
    atlas: Atlas = None,
    *,
    radius_mm: float = 5.0,
    detrend: bool = True,
    standardize: bool = True,
    low_pass: float | None = None,
    high_pass: float | None = None,
    t_r: float | None = None,
    high_variance_confounds: bool = False,
    min_volumes: int = 10,
    max_voxels: int = 16 * MAX_VOXELS,
    return_mask: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """ROI series (T×M float32) of a 4D BOLD image with nilearn maskers and their confound options.

    ``atlas``: None → Power-264 coordinates; an (M, 3) array or a TSV/CSV with x, y, z → spheres of
    ``radius_mm`` (NiftiSpheresMasker); a label NIfTI → NiftiLabelsMasker (labels resampled to the BOLD
    grid, nearest neighbour). Columns of ROIs with no voxel or no signal in the image are zero and
    reported; ``return_mask=True`` also returns the (M,) boolean mask of valid ROIs. ``max_voxels``
    (x·y·z·t) defaults to 16 × the 3D limit, ~2.1 G voxels (a full 1,200-volume HCP run at 2 mm is 1.08 G).
    """
    from nilearn.maskers import NiftiLabelsMasker, NiftiSpheresMasker

    path = Path(bold_path)
    min_volumes = max(int(min_volumes), MIN_TIMEPOINTS)
    img = load_nifti(path, allow_4d=True, max_voxels=max_voxels)
    if img.data.ndim != 4:
        raise InputError(
            f"3D image {img.data.shape}; ROI time series need a 4D BOLD run",
            path=path,
            fix="give the 4D functional image (x, y, z, time)",
        )
    n_vol = img.data.shape[3]
    if n_vol < min_volumes:
        raise InputError(
            f"only {n_vol} volumes (need ≥ {min_volumes}) — too short for connectivity",
            path=path,
            fix="give the full BOLD run (typically ≥ 100 volumes) or lower min_volumes",
        )
    if (low_pass or high_pass) and t_r is None:
        t_r = _repetition_time(img, path)
    clean = {
        "detrend": detrend,
        "standardize": "zscore_sample" if standardize else False,
        "low_pass": low_pass,
        "high_pass": high_pass,
        "t_r": t_r,
        "high_variance_confounds": high_variance_confounds,
    }
    nii = nib.Nifti1Image(img.data, img.affine)
    coords = _coords(atlas)
    if coords is not None:
        valid = _sphere_valid(coords, img.data.shape, img.affine, radius_mm)
        what = "sphere(s) without voxels in the field of view"
        masker = NiftiSpheresMasker(coords[valid], radius=radius_mm, allow_overlap=True, **clean)
    else:
        labels_img, valid = _label_atlas(Path(atlas), img)
        what = "label(s) absent from the BOLD grid"
        masker = NiftiLabelsMasker(labels_img, background_label=0, **clean)
    out = np.zeros((n_vol, len(valid)), np.float32)
    if valid.any():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (UserWarning, DeprecationWarning, FutureWarning))
                sig = masker.fit_transform(nii)
        except ValueError as exc:
            raise InputError(
                f"nilearn could not extract ROI signals: {exc}".splitlines()[0],
                path=path,
                fix="check the atlas space against the BOLD image (both in world mm)",
            ) from None
        if sig.shape != (n_vol, int(valid.sum())):
            raise InputError(
                f"masker returned {sig.shape[1]} ROI signals for {int(valid.sum())} ROIs",
                path=path,
                fix="check the atlas labels",
            )
        out[:, valid] = sig
    empty = np.flatnonzero(~valid)
    flat = np.flatnonzero(valid & (np.ptp(out, axis=0) == 0))
    parts = [
        f"{len(idx)} of {len(valid)} ROI {why} (first {idx[:5].tolist()})"
        for idx, why in ((empty, what), (flat, "with a constant signal"))
        if idx.size
    ]
    if parts:
        warnings.warn(f"{path}: {'; '.join(parts)}; their columns are zero", stacklevel=2)
    out[:, flat] = 0.0
    valid[flat] = False
    return (out, valid) if return_mask else out


# Bumped when extraction changes what a BOLD file gives (cached series are keyed by it, with nilearn's version and
# every extraction option, defaults included).
SERIES_CACHE_VERSION = 1
_EXTRACT_DEFAULTS = {k: v.default for k, v in inspect.signature(extract_timeseries).parameters.items()
                     if v.default is not inspect.Parameter.empty and k not in ("atlas", "return_mask")}


def fmri_table(source: str | Path, *, check_files: bool = True) -> pd.DataFrame:
    """One row per scan (subject, session?, state, timeseries and/or bold as absolute paths, labels…).

    ``source`` is a manifest CSV/TSV or a BIDS folder (``func/sub-*_task-<state>_{bold.nii.gz,
    timeseries.npy|tsv}``; the ``task-`` entity is the cognitive state; labels from participants.tsv).
    ``state`` is missing (NaN) where a manifest does not give it. A ``neuromoe synth`` cohort folder is
    read through its ``manifests/fmri.csv``, which carries the labels (phenotype, split, ...).
    ``check_files=False`` leaves missing files to the per-scan loaders (batch modes skip and list them).
    """
    source = Path(source)
    if source.is_dir() and (source / "manifests" / "fmri.csv").is_file():
        source = source / "manifests" / "fmri.csv"
    df = load_table(source)
    src = df.attrs.get("source", str(source))
    roles = [c for c in ("timeseries", "bold") if c in df.columns]
    if not roles:
        raise InputError(
            "no 'timeseries' or 'bold' column / no func/ files",
            path=src,
            fix="add a timeseries (T×M .npy/.tsv) or bold (4D NIfTI) column",
        )
    has = df[roles].notna().any(axis=1)
    if source.is_dir():
        df = df[has].copy()  # BIDS anat-only rows are not scans
        df = df.drop(
            columns=[c for c in df.columns if df[c].isna().all() and c not in ("timeseries", "bold")]
        )
    elif not has.all():
        raise InputError(
            f"subject {df.loc[~has, 'subject'].iloc[0]}: no timeseries or bold file",
            path=src,
            fix="fill one of the two columns or drop the row",
        )
    if df.empty:
        raise InputError("no fMRI scans found", path=src, fix="check func/ files or the manifest")
    if "state" not in df.columns:
        df["state"] = np.nan
    keys = [c for c in ("subject", "session", "state", "run") if c in df.columns]
    dup = df.duplicated(subset=keys, keep=False) & df["state"].notna()
    if dup.any():
        first = df.loc[dup].iloc[0]
        raise InputError(
            f"duplicated scan {first['subject']} state {first['state']}",
            path=src,
            fix="keep one row per subject/session/state (or add a run column)",
        )
    for _, row in df.iterrows() if check_files else ():
        for role in roles:
            p = row[role]
            if isinstance(p, str) and not Path(p).exists():
                raise InputError(
                    f"subject {row['subject']}: {role} file missing ({p})",
                    path=src,
                    fix="fix the path or remove the row",
                )
    df = df.reset_index(drop=True)
    df.attrs["source"] = src
    return df


def _scan_source(row: Mapping[str, Any], source: str) -> tuple[str, str]:
    if source not in SOURCES:
        raise InputError(
            f"source must be one of {SOURCES}, got '{source}'", fix="use auto, timeseries or bold"
        )
    avail = {r: row.get(r) for r in ("timeseries", "bold") if isinstance(row.get(r), str) and row.get(r)}
    order = ("timeseries", "bold") if source == "auto" else (source,)
    for role in order:
        if role in avail:
            return role, avail[role]
    raise InputError(
        f"subject {row.get('subject')}: no {' or '.join(order)} file for this scan",
        path=row.get("timeseries") or row.get("bold") or None,
        fix="fill the timeseries or bold column",
    )


def scan_timeseries(
    row: Mapping[str, Any],
    *,
    atlas: Atlas = None,
    cache: FCCache | None = None,
    source: str = "auto",
    **extract_kw: Any,
) -> np.ndarray:
    """T×M series of one table row: the ready series if any (``source="auto"``), else extracted from BOLD.

    Extraction results are cached per BOLD file and options when ``cache`` is given.
    """
    role, path = _scan_source(row, source)
    if role == "timeseries":
        return load_timeseries(path)
    if cache is None or not (Path(path).is_file() and os.access(path, os.R_OK)):  # a bad path: extraction's refusal
        return extract_timeseries(path, atlas, **extract_kw)
    hits = cache.hits
    series = cache.fetch(
        path,
        lambda: extract_timeseries(path, atlas, **extract_kw),
        what="timeseries",
        version=SERIES_CACHE_VERSION,
        nilearn=nilearn.__version__,
        atlas=atlas_digest(atlas),
        **{**_EXTRACT_DEFAULTS, **extract_kw},  # a changed default is another entry
    )
    zero = np.flatnonzero(~series.any(0)) if cache.hits > hits else np.empty(0, int)
    if zero.size:  # what extraction said, said again for a series read from the cache
        warnings.warn(f"{path}: {zero.size} of {series.shape[1]} ROI columns are zero (first {zero[:5].tolist()}): "
                      "ROIs without voxels or signal when the series was extracted", stacklevel=2)
    return series


def table_connectivity(
    table: pd.DataFrame,
    kind: str = "pearson",
    *,
    fisher_z: bool = True,
    reference: np.ndarray | None = None,
    atlas: Atlas = None,
    cache: FCCache | None = None,
    source: str = "auto",
    on_constant: str = "error",
    **extract_kw: Any,
) -> np.ndarray:
    """(B, M, M) FC of every row of an :func:`fmri_table`, batched, cached per scan when ``cache`` is given.

    Pearson/partial matrices are cached per scan file; tangent depends on the group ``reference``, so only
    the scans' series are cached and the tangent map is recomputed (it is cheap next to extraction).
    """
    rows = [r for _, r in table.iterrows()]
    files = [_scan_source(r, source)[1] for r in rows]
    opts = {
        "what": "fc",
        "kind": kind,
        "fisher_z": fisher_z,
        "atlas": atlas_digest(atlas),
        "source": source,
        "on_constant": on_constant,
        "version": SERIES_CACHE_VERSION,
        "nilearn": nilearn.__version__,
        **{**_EXTRACT_DEFAULTS, **extract_kw},
    }
    series = lambda r: scan_timeseries(r, atlas=atlas, cache=cache, source=source, **extract_kw)  # noqa: E731
    if cache is None or kind == "tangent":
        return connectivity(
            [series(r) for r in rows],
            kind,
            fisher_z=fisher_z,
            reference=reference,
            on_constant=on_constant,
            sources=files,
        )
    keys = [cache.key(f, **opts) for f in files]
    hits = [cache.get(k) for k in keys]
    todo = [i for i, h in enumerate(hits) if h is None]
    cache.hits += len(rows) - len(todo)
    cache.misses += len(todo)
    if todo:
        fresh = connectivity(
            [series(rows[i]) for i in todo],
            kind,
            fisher_z=fisher_z,
            on_constant=on_constant,
            sources=[files[i] for i in todo],
        )
        for i, fc in zip(todo, fresh):
            cache.put(keys[i], fc)
            hits[i] = fc
    return np.stack(hits).astype(np.float32, copy=False)
