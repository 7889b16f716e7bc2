"""Write a whole synthetic cohort in the BIDS-like layout of docs/design.md ("Synthetic cohorts")."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from neuromoe.data.splits import stratified_split
from neuromoe.data.synth import fmri as fm
from neuromoe.data.synth.anatomy import Pose, draw_pose, load_anatomy
from neuromoe.data.synth.lesions import DATASETS, MODALITIES, synth_lesion_case
from neuromoe.data.synth.structural import SITES, synth_t1
from neuromoe.errors import InputError
from neuromoe.io.atomic import atomic_path, atomic_write_json, atomic_write_text

KINDS = ("structural", "lesion", "fmri")
# subject-level label columns of the manifests (not paths, not the per-scan session/state)
PARTICIPANT_COLS = ["age", "sex", "dx_ad", "dx_pd", "cohort", "site", "lesion_type", "dataset", "phenotype", "split"]
_FILE_SUFFIX = {"t1": "T1w", "t1c": "ce-gd_T1w", "t2": "T2w", "flair": "FLAIR", "dwi": "DWI"}
STRUCT_COLS = ["subject", "t1", "age", "sex", "dx_ad", "dx_pd", "cohort", "site", "split"]
LESION_COLS = ["subject", "t1", "t1c", "t2", "flair", "dwi", "mask", "lesion_type", "dataset", "site", "split"]
FMRI_COLS = ["subject", "session", "state", "timeseries", "bold", "cohort", "phenotype", "sex", "age", "site",
             "split"]


def _save_nii(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32, tr: float | None = None) -> None:
    """``tr`` (s) goes into the 4th voxel size of a 4-D series, where readers (ours, nilearn) look for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header.set_zooms((*img.header.get_zooms()[:3], float(tr)))
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


_PATH_COLS = {"t1", "t1c", "t2", "flair", "dwi", "mask", "timeseries", "bold"}
_SITES = sorted(SITES)  # the order a subject's site draw indexes


def _write_csv(path: Path, cols: list[str], rows: Iterable[dict]) -> None:
    """Manifest rows; file paths are written relative to the manifest's folder (docs/design.md)."""

    def cell(r: dict, c: str) -> str:
        v = str(r.get(c, ""))
        return f"../{v}" if c in _PATH_COLS and v else v

    lines = [",".join(cols)] + [",".join(cell(r, c) for c in cols) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")


def synth_cohort(out_dir: str | Path, *, n_structural: int = 150, n_lesion: int = 60, n_fmri: int = 240,
                 seed: int = 0, spacing: float = 3.0, modalities: tuple[str, ...] = MODALITIES,
                 kinds: tuple[str, ...] = KINDS, n_rois: int = 264, bold: bool = False,
                 progress: bool = True, n_timepoints: int = 160, tr: float = 2.0, workers: int = 1,
                 pose_deg: float = 0.0, shift_mm: float = 0.0) -> dict:
    """Generate the cohort; returns paths of the manifests, participants.tsv and ground_truth.json.

    Every subject draws from its own seeded generator (``[seed, kind, index]``), so ``workers`` processes
    write exactly the cohort one process writes. ``pose_deg`` / ``shift_mm`` (sd of rotation about each axis,
    of the shift along it) place each structural and lesion head off the template's pose, as heads lie in a
    scanner; the pose has its own stream, so the cohort is otherwise the one drawn without it.
    """
    out = Path(out_dir)
    # checked before the folder is touched: these used to fail after minutes of writing subjects
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed {seed!r} is not a non-negative integer", fix="use e.g. --seed 0")
    counts = {"n_structural": n_structural, "n_lesion": n_lesion, "n_fmri": n_fmri}
    for name, n in counts.items():
        if n < 0:
            raise InputError(f"{name} is {n}; subject counts must be 0 or more", fix="give a count of 0 or more")
    if "fmri" in kinds and n_fmri > 0 and n_rois < fm.N_NETWORKS:
        raise InputError(f"{n_rois} ROIs cannot hold the generator's {fm.N_NETWORKS} networks",
                         fix=f"use --n-rois {fm.N_NETWORKS} or more (default 264)")
    if "fmri" in kinds and n_fmri > 0 and (n_timepoints < 1 or not tr > 0):
        raise InputError(f"{n_timepoints} time points at TR {tr} s", fix="give n_timepoints ≥ 1 and tr > 0")
    for flag, v, unit in (("--pose-deg", pose_deg, "°"), ("--shift-mm", shift_mm, " mm")):
        if not (np.isfinite(v) and 0 <= v <= 45):
            raise InputError(f"head pose spread {flag} {v!r} is not between 0 and 45{unit}",
                             fix="use e.g. --pose-deg 5 --shift-mm 5 (0 = the template's pose)")
    if not (np.isfinite(spacing) and spacing > 0):
        raise InputError(f"spacing {spacing!r} mm is not a positive number", fix="use e.g. --spacing 3 (6 for tests)")
    bad = [m for m in modalities if m not in MODALITIES]
    if bad:
        raise InputError(f"unknown modalities {bad}; choose from {','.join(MODALITIES)}")
    badk = [k for k in kinds if k not in KINDS]
    if badk:
        raise InputError(f"unknown kinds {badk}; choose from {','.join(KINDS)}")
    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    anat = load_anatomy(float(spacing))  # loaded before any worker starts: forked workers inherit it
    participants: list[dict] = []
    truth: dict = {"seed": seed, "spacing": spacing, "modalities": list(modalities),
                   "sites": {k: dict(zip(("bias", "noise", "gamma", "blur"), v, strict=True)) for k, v in SITES.items()},
                   "pose": {"deg": pose_deg, "shift_mm": shift_mm}, "subjects": {}}
    result: dict = {}
    counter = 0  # subjects numbered in the order structural, lesion, fMRI

    if "structural" in kinds and n_structural > 0:
        rows = []
        job = partial(_structural_subject, out, spacing, seed, counter, (pose_deg, shift_mm))
        for row in _each(job, n_structural, workers, "structural", progress):
            rows.append(row)
            truth["subjects"][row["subject"]] = {"kind": "structural", "age": row.pop("_age"), "sex": row["sex"],
                                                 "dx_ad": row["dx_ad"], "dx_pd": row["dx_pd"], "site": row["site"],
                                                 **row.pop("_pose")}
        counter += n_structural
        strata = [f"{r['cohort']}-{r['dx_ad'] or r['dx_pd'] or r['sex']}" for r in rows]
        for r, s in zip(rows, stratified_split(strata, seed), strict=True):
            r["split"] = s
        result["structural"] = out / "manifests" / "structural.csv"
        _write_csv(result["structural"], STRUCT_COLS, rows)
        participants += [{"kind": "structural", **r} for r in rows]

    if "lesion" in kinds and n_lesion > 0:
        rows = []
        job = partial(_lesion_case, out, spacing, seed, counter, tuple(modalities), (pose_deg, shift_mm))
        for row in _each(job, n_lesion, workers, "lesion", progress):
            rows.append(row)
            truth["subjects"][row["subject"]] = row.pop("_truth")
        counter += n_lesion
        for r, s in zip(rows, stratified_split([r["lesion_type"] for r in rows], seed), strict=True):
            r["split"] = s
        result["lesion"] = out / "manifests" / "lesion.csv"
        _write_csv(result["lesion"], LESION_COLS, rows)
        participants += [{"kind": "lesion", **r} for r in rows]

    if "fmri" in kinds and n_fmri > 0:
        d = fm.design(n_rois, seed)
        coords = d["coords"]
        atlas = out / "atlas" / "rois.tsv"
        atlas.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(atlas, "name\tx\ty\tz\n" + "".join(
            f"roi-{i + 1:03d}\t{c[0]:g}\t{c[1]:g}\t{c[2]:g}\n" for i, c in enumerate(coords)))
        rows = []
        subj_rows: list[list[dict]] = []
        for i in tqdm(range(n_fmri), desc="fmri", disable=not progress):
            rng = np.random.default_rng([seed, 3, i])
            sub = _subject_id(counter + i)
            # alternate by index (not first/second half of n_fmri) so adding subjects never relabels earlier ones
            cohort = "pretrain" if i % 2 == 0 else "downstream"
            sex = "F" if rng.random() < 0.5 else "M"
            age = float(rng.uniform(20, 70))
            site = _SITES[int(rng.integers(len(_SITES)))]
            patient = cohort == "downstream" and (i // 2) % 2 == 1
            states = fm.STATES if cohort == "pretrain" else (fm.INFORMATIVE_STATE,)
            these = []
            for st in states:
                ts = fm.synth_timeseries(d, rng, state=st, patient=patient, sex=sex, age=age, n_t=n_timepoints,
                                         tr=tr, site_noise=0.3 + 0.2 * _SITES.index(site))
                rel = f"{sub}/func/{sub}_task-{st}_timeseries.npy"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(out / rel, suffix=".npy") as tmp:
                    np.save(tmp, ts)
                rel_bold = ""
                if bold:
                    rel_bold = f"{sub}/func/{sub}_task-{st}_bold.nii.gz"
                    # its own noise stream: writing BOLD must not change the next state's time series
                    bold_rng = np.random.default_rng([seed, 4, i, fm.STATES.index(st)])
                    _save_nii(out / rel_bold, bold_image(anat, coords, ts, bold_rng), anat.affine, tr=tr)
                these.append({"subject": sub, "session": "ses-1", "state": st, "timeseries": rel, "bold": rel_bold,
                              "cohort": cohort, "phenotype": ("patient" if patient else "control")
                              if cohort == "downstream" else "", "sex": sex, "age": round(age, 2), "site": site})
            subj_rows.append(these)
            truth["subjects"][sub] = {"kind": "fmri", "cohort": cohort, "patient": patient, "age": age, "sex": sex,
                                      "site": site}
        strata = [f"{r[0]['cohort']}-{r[0]['phenotype']}" for r in subj_rows]
        for these, s in zip(subj_rows, stratified_split(strata, seed), strict=True):
            for r in these:
                r["split"] = s
                rows.append(r)
        truth["fmri"] = {"states": list(fm.STATES), "informative_state": fm.INFORMATIVE_STATE,
                         "downstream_state": fm.INFORMATIVE_STATE, "tr": tr, "n_timepoints": n_timepoints,
                         "network": d["network"].tolist(), "patient_edges": d["patient_edges"],
                         "sex_edges": d["sex_edges"], "task_networks": fm.TASK_NETWORKS}
        result["fmri"] = out / "manifests" / "fmri.csv"
        result["atlas"] = atlas
        _write_csv(result["fmri"], FMRI_COLS, rows)
        participants += [{"kind": "fmri", **these[0]} for these in subj_rows]  # the labels are per subject

    # every per-subject label of the manifests, so the folder read as BIDS carries the same labels (n/a = none)
    cols = ["participant_id", "kind", *PARTICIPANT_COLS]
    atomic_write_text(out / "participants.tsv", "\t".join(cols) + "\n" + "".join(
        "\t".join([p["subject"], p["kind"], *(str(p.get(c, "")) or "n/a" for c in PARTICIPANT_COLS)]) + "\n"
        for p in sorted(participants, key=lambda p: p["subject"])))
    atomic_write_json(out / "dataset_description.json", {
        "Name": "NeuroMoE synthetic cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "neuromoe synth", "Description": f"seed={seed} spacing={spacing}"}]})
    atomic_write_json(out / "ground_truth.json", truth)
    result["participants"] = out / "participants.tsv"
    result["ground_truth"] = out / "ground_truth.json"
    return {k: str(v) for k, v in result.items()}


def _subject_id(index: int) -> str:
    return f"sub-{index + 1:04d}"


def _each(job: Callable[[int], dict], n: int, workers: int, desc: str, progress: bool) -> Iterator[dict]:
    """``job(i)`` for i < n in index order, in ``workers`` processes when more than one."""
    if workers <= 1:
        yield from (job(i) for i in tqdm(range(n), desc=desc, disable=not progress))
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from tqdm(pool.map(job, range(n), chunksize=4), total=n, desc=desc, disable=not progress)


def _pose(seed: int, kind: int, i: int, spread: tuple[float, float], spacing: float) -> tuple[Pose | None, dict]:
    """Subject ``i``'s head pose (its own stream) and its ground-truth record; none without a spread."""
    if not any(spread):
        return None, {}
    pose = draw_pose(np.random.default_rng([seed, 5, kind, i]), *spread, spacing)
    return pose, {"pose_rotation": np.round(pose.rotation, 6).tolist(),
                  "pose_shift_mm": np.round(pose.shift * spacing, 3).tolist()}


def _structural_subject(out: Path, spacing: float, seed: int, first: int, spread: tuple[float, float],
                        i: int) -> dict:
    """Structural subject ``i``: writes its T1, returns its manifest row (true age under ``_age``, pose under
    ``_pose``)."""
    anat = load_anatomy(float(spacing))
    pose, pose_truth = _pose(seed, 1, i, spread, spacing)
    rng = np.random.default_rng([seed, 1, i])
    sub = _subject_id(first + i)
    cohort = ["ukb", "adni", "ppmi"][i % 3]
    sex = "F" if rng.random() < 0.5 else "M"
    dx_ad = dx_pd = ""
    if cohort == "ukb":
        age = rng.uniform(45, 80)
    elif cohort == "adni":
        dx_ad = ["CN", "MCI", "AD"][int(rng.integers(3))]
        age = rng.uniform(60, 88)
    else:
        dx_pd = "PD" if rng.random() < 0.5 else "HC"
        age = rng.uniform(50, 80)
    site = _SITES[int(rng.integers(len(_SITES)))]
    img = synth_t1(anat, rng, age=age, sex=sex, dx_ad=dx_ad, dx_pd=dx_pd, site=site, pose=pose)
    rel = f"{sub}/anat/{sub}_T1w.nii.gz"
    _save_nii(out / rel, img, anat.affine)
    return {"subject": sub, "t1": rel, "age": round(float(age), 2), "sex": sex, "dx_ad": dx_ad, "dx_pd": dx_pd,
            "cohort": cohort, "site": site, "_age": float(age), "_pose": pose_truth}


def _lesion_case(out: Path, spacing: float, seed: int, first: int, modalities: tuple[str, ...],
                 spread: tuple[float, float], i: int) -> dict:
    """Lesion case ``i``: writes its images and mask, returns its manifest row (truth under ``_truth``)."""
    anat = load_anatomy(float(spacing))
    pose, pose_truth = _pose(seed, 2, i, spread, spacing)
    rng = np.random.default_rng([seed, 2, i])
    sub = _subject_id(first + i)
    types = list(DATASETS)
    lt = types[i % len(types)]
    dataset, have = DATASETS[lt]
    mods = tuple(m for m in have if m in modalities) or (modalities[0],)
    # its own stream: the site does not depend on which modalities are written
    site = _SITES[int(np.random.default_rng([seed, 2, i, 1]).integers(len(_SITES)))]
    images, mask = synth_lesion_case(anat, rng, lt, mods, site=site, pose=pose)
    row = {"subject": sub, "lesion_type": lt, "dataset": dataset, "site": site}
    for mod, img in images.items():
        rel = f"{sub}/anat/{sub}_{_FILE_SUFFIX[mod]}.nii.gz"
        _save_nii(out / rel, img, anat.affine)
        row[mod] = rel
    rel = f"derivatives/lesions/{sub}/anat/{sub}_desc-lesion_mask.nii.gz"
    _save_nii(out / rel, mask, anat.affine, dtype=np.uint8)
    row["mask"] = rel
    row["_truth"] = {"kind": "lesion", "lesion_type": lt, "lesion_voxels": int(mask.sum()), "modalities": list(images),
                     "site": site, **pose_truth}
    return row


def _clear_previous(out: Path) -> None:
    """Remove an earlier cohort written into ``out`` (its subjects, manifests and truth), so a smaller or other
    cohort leaves no stale subject folders for a BIDS reader to pick up; refuse a folder synth did not write."""
    import shutil

    if not out.exists() or not any(out.iterdir()):
        return
    truth = out / "ground_truth.json"
    if not truth.is_file():
        raise InputError("output folder is not empty and holds no earlier synthetic cohort", path=out,
                         fix="choose a new or empty --out folder")
    try:
        subjects = json.loads(truth.read_text())["subjects"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError("ground_truth.json of the earlier cohort is unreadable", path=truth,
                         fix="remove the folder or choose a new --out folder") from None
    for sub in subjects:
        for folder in (out / sub, out / "derivatives" / "lesions" / sub):
            if sub.startswith("sub-") and "/" not in sub and folder.is_dir():
                shutil.rmtree(folder)
    for name in ("manifests", "atlas"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("participants.tsv", "dataset_description.json", "quicklook.png", "ground_truth.json"):
        (out / name).unlink(missing_ok=True)


def bold_image(anat, coords: np.ndarray, ts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """4D BOLD: each ROI signal fills a 6 mm sphere on the grid around its MNI coordinate, plus noise."""
    n_t = ts.shape[0]
    vol = np.zeros((*anat.shape, n_t), np.float32)
    inv = np.linalg.inv(anat.affine)
    g = anat.mm_grid()
    half = np.ceil(6.0 / np.linalg.norm(anat.affine[:3, :3], axis=0)).astype(int)  # 6 mm in voxels per axis
    for i, c in enumerate(coords):
        v = np.round(inv[:3, :3] @ c + inv[:3, 3]).astype(int)
        lo = np.maximum(v - half, 0)
        hi = np.minimum(v + half + 1, anat.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        d2 = sum((g[k][sl] - c[k]) ** 2 for k in range(3))
        vol[sl][d2 <= 36.0] = ts[:, i]
    vol += 0.5 * rng.standard_normal(vol.shape).astype(np.float32)
    return 100.0 + 10.0 * vol * anat.brain[..., None]
