"""Bad-input corpus, generated on the fly (no committed binaries).

Each kind is a small function writing one broken (or awkward-but-valid) input under a folder and
returning a :class:`Case`: which role it plays (a NIfTI image, a 4D BOLD, ROI time series, a
manifest, a BIDS folder, a plain folder), the path to pass, and whether a correct tool must refuse it
(``bad=True``) or accept it (awkward but valid: relative paths, spaces and non-ASCII in names, NIfTI-2).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (20, 24, 20)


@dataclass(frozen=True)
class Case:
    kind: str
    role: str  # "image" | "bold" | "timeseries" | "manifest" | "bids" | "folder" | "fmri_manifest" | "fmri_bids"
    path: Path
    bad: bool
    culprit: Path  # the file a good error message must name


def _affine(spacing: float = 5.0) -> np.ndarray:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -np.array(SHAPE) * spacing / 2
    return aff


def brain(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    """A blob-shaped 'head' so foreground crops and normalisation have something to work on."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape[:3]], indexing="ij"))
    inside = (grid**2).sum(0) < 0.85  # ~90 mm across: DenseFormer refuses content under 80 mm (not a whole brain)
    vol = np.where(inside, 100.0, 0.0) + rng.normal(0, 5, shape[:3])
    if len(shape) == 4:
        vol = vol[..., None] + rng.normal(0, 5, shape)
    return np.abs(vol).astype(np.float32)  # a magnitude image, as scanners write them: no negative voxels


# Identifying header fields planted in every cohort image; no output may ever contain them.
PRIVATE = {
    "descrip": b"PRIVdescrip7f3a",
    "aux_file": b"PRIVaux7f3a",
    "db_name": b"PRIVdb7f3a",
    "intent_name": b"PRIVintent7f3a",
}


def write(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    nifti2: bool = False,
    private: bool = False,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(data, _affine() if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
    if private:
        for key, value in PRIVATE.items():
            img.header[key] = value
    nib.save(img, path)
    return path


def _patch_header(path: Path, **fields: object) -> Path:
    """Rewrite raw header fields of an uncompressed .nii (bypassing nibabel's own checks)."""
    raw = bytearray(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])), check=False)
    for key, value in fields.items():
        hdr[key] = value
    raw[:348] = hdr.binaryblock
    path.write_bytes(bytes(raw))
    return path


def _img(root: Path, name: str, data: np.ndarray | None = None, **kw: object) -> Path:
    return write(root / name, brain() if data is None else data, **kw)  # type: ignore[arg-type]


def _manifest(root: Path, rows: list[dict[str, object]], name: str = "manifest.csv") -> Path:
    import pandas as pd

    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _labels(i: int) -> dict[str, object]:
    return {"age": 60 + i, "sex": "FM"[i % 2], "dx_ad": ["CN", "AD"][i % 2]}


SPLITS = ("train", "train", "train", "train", "val", "val", "test", "test", "test")  # 3 test: evaluate scores age


def lesion_mask(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    """A small binary 'lesion' inside the blob (never empty)."""
    m = np.zeros(shape[:3], np.float32)
    c = np.array(shape[:3]) // 2 + np.random.default_rng(seed).integers(-2, 3, 3)
    m[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 1
    return m


def cohort_rows(root: Path, n: int = len(SPLITS)) -> list[dict[str, object]]:
    """Rows of a small valid cohort (T1, FLAIR, binary mask, labels, split) written once under ``root``.

    Manifest kinds are this cohort plus one defect, so a command refuses them for the defect and not
    because the cohort is too small to split into train/val/test.
    """
    rows = []
    for i in range(n):
        sub = f"sub-{i:02d}"
        d = root / sub
        paths = {"t1": d / "t1.nii.gz", "flair": d / "flair.nii.gz", "mask": d / "mask.nii.gz"}
        if not all(q.exists() for q in paths.values()):
            write(paths["t1"], brain(seed=i), private=True)
            write(paths["flair"], brain(seed=50 + i), private=True)
            write(paths["mask"], lesion_mask(seed=i), private=True)
        rows.append(
            {
                "subject": sub,
                **{k: str(v) for k, v in paths.items()},
                "age": 55 + 3 * i,
                "sex": "FM"[i % 2],
                "dx_ad": ("CN", "MCI", "AD")[i % 3],
                "dx_pd": ("HC", "PD")[i % 2],
                "lesion_type": ("tumour", "wmh")[i % 2],
                "split": SPLITS[i % len(SPLITS)],
            }
        )
    return rows


def _cohort(folder: Path) -> list[dict[str, object]]:
    return cohort_rows(folder.parent / "_cohort")


def _bad_row(rows: list[dict[str, object]], **values: object) -> list[dict[str, object]]:
    """The cohort plus a training subject ``sub-bad`` whose files/labels are overridden by ``values``."""
    return [*rows, {**rows[0], "subject": "sub-bad", "split": "train", **values}]


# --- image-level kinds -------------------------------------------------------------------------------------


def k_truncated_gz(root: Path) -> Case:
    good = _img(root, "ok.nii.gz")
    bad = root / "truncated.nii.gz"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    return Case("truncated_gz", "image", bad, True, bad)


def k_gz_bad_checksum(root: Path) -> Case:
    """A .nii.gz whose data decompresses but whose gzip CRC fails: nibabel alone never reads that far."""
    good = _img(root, "ok.nii.gz")
    raw = bytearray(good.read_bytes())
    raw[-8:-4] = bytes(b ^ 0xFF for b in raw[-8:-4])
    bad = root / "bad_checksum.nii.gz"
    bad.write_bytes(bytes(raw))
    return Case("gz_bad_checksum", "image", bad, True, bad)


def k_wrong_magic(root: Path) -> Case:
    p = _patch_header(_img(root, "magic.nii"), magic=b"xyz\x00")
    return Case("wrong_magic", "image", p, True, p)


def k_empty_file(root: Path) -> Case:
    p = root / "empty.nii.gz"
    p.write_bytes(b"")
    return Case("empty_file", "image", p, True, p)


def k_text_as_nifti(root: Path) -> Case:
    p = root / "notes.nii.gz"
    p.write_bytes(gzip.compress(b"this is not an image\n" * 50))
    return Case("text_as_nifti", "image", p, True, p)


def k_zero_dim(root: Path) -> Case:
    p = _patch_header(_img(root, "zerodim.nii"), dim=[3, 20, 0, 20, 1, 1, 1, 1])
    return Case("zero_dim", "image", p, True, p)


def k_negative_dim(root: Path) -> Case:
    p = _patch_header(_img(root, "negdim.nii"), dim=[3, 20, -24, 20, 1, 1, 1, 1])
    return Case("negative_dim", "image", p, True, p)


def k_image_2d(root: Path) -> Case:
    p = _img(root, "slice2d.nii.gz", brain()[:, :, 10])
    return Case("image_2d", "image", p, True, p)


def k_image_one_slice(root: Path) -> Case:
    """The same slice as ``image_2d`` stored the way converters write 2-D images: 3-D with one slice."""
    p = _img(root, "slice_as_3d.nii.gz", brain()[:, :, 10:11])
    return Case("image_one_slice", "image", p, True, p)


def k_image_5d(root: Path) -> Case:
    p = _img(root, "five_d.nii.gz", np.zeros((*SHAPE, 2, 2), np.float32) + 1)
    return Case("image_5d", "image", p, True, p)


def k_4d_as_structural(root: Path) -> Case:
    p = _img(root, "t1_4d.nii.gz", brain((*SHAPE, 3)))
    return Case("4d_as_structural", "image", p, True, p)


def k_nan_voxels(root: Path) -> Case:
    d = brain()
    d[5:8, 5:8, 5:8] = np.nan
    p = _img(root, "nan.nii.gz", d)
    return Case("nan_voxels", "image", p, True, p)


def k_inf_voxels(root: Path) -> Case:
    d = brain()
    d[3, 3, 3] = np.inf
    p = _img(root, "inf.nii.gz", d)
    return Case("inf_voxels", "image", p, True, p)


def k_all_zero(root: Path) -> Case:
    p = _img(root, "zeros.nii.gz", np.zeros(SHAPE, np.float32))
    return Case("all_zero", "image", p, True, p)


def k_constant(root: Path) -> Case:
    p = _img(root, "constant.nii.gz", np.full(SHAPE, 7.0, np.float32))
    return Case("constant_image", "image", p, True, p)


def k_scl_slope_nan_valid(root: Path) -> Case:
    # NaN is how nibabel itself writes "no scaling": the raw values must come back unscaled.
    p = _patch_header(_img(root, "slope_nan.nii", brain().astype(np.int16)), scl_slope=np.nan, scl_inter=0)
    return Case("scl_slope_nan_valid", "image", p, False, p)


def k_scl_slope_zero_valid(root: Path) -> Case:
    # NIfTI-1: "if scl_slope is nonzero, scale" -> 0 means the raw values are used as they are.
    p = _patch_header(_img(root, "slope_zero.nii", brain().astype(np.int16)), scl_slope=0, scl_inter=5)
    return Case("scl_slope_zero_valid", "image", p, False, p)


def k_scl_slope_inf(root: Path) -> Case:
    p = _patch_header(_img(root, "slope_inf.nii", brain().astype(np.int16)), scl_slope=np.inf, scl_inter=0)
    return Case("scl_slope_inf", "image", p, True, p)


def k_gigantic(root: Path) -> Case:
    p = _patch_header(_img(root, "gigantic.nii"), dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
    return Case("gigantic_header", "image", p, True, p)


def k_singular_affine(root: Path) -> Case:
    p = _patch_header(
        _img(root, "singular.nii"),
        srow_x=[0, 0, 0, 0],
        srow_y=[0, 0, 0, 0],
        srow_z=[0, 0, 0, 0],
        sform_code=1,
        qform_code=0,
    )
    return Case("singular_affine", "image", p, True, p)


def k_nonfinite_affine(root: Path) -> Case:
    p = _img(root, "nanaff.nii")
    p = _patch_header(p, srow_x=[np.nan, 0, 0, 0], sform_code=1, qform_code=0)
    return Case("nonfinite_affine", "image", p, True, p)


def k_zero_pixdim(root: Path) -> Case:
    p = _patch_header(_img(root, "pixdim0.nii"), pixdim=[1, 0, 0, 0, 1, 1, 1, 1], qform_code=1, sform_code=0)
    return Case("zero_pixdim", "image", p, True, p)


def k_rgb_dtype(root: Path) -> Case:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 100
    p = _img(root, "rgb.nii.gz", rgb)
    return Case("rgb_dtype", "image", p, True, p)


def k_vox_offset_past_end(root: Path) -> Case:
    p = _patch_header(_img(root, "offset.nii"), vox_offset=4_000_000)
    return Case("vox_offset_past_end", "image", p, True, p)


def k_complex_dtype(root: Path) -> Case:
    p = _img(root, "complex.nii.gz", (brain() + 1j).astype(np.complex64))
    return Case("complex_dtype", "image", p, True, p)


def k_directory_as_file(root: Path) -> Case:
    p = root / "folder.nii.gz"
    p.mkdir(parents=True)
    return Case("directory_as_file", "image", p, True, p)


def k_missing_file(root: Path) -> Case:
    p = root / "does_not_exist.nii.gz"
    return Case("missing_file", "image", p, True, p)


def k_nifti2_valid(root: Path) -> Case:
    p = _img(root, "nifti2.nii.gz", nifti2=True)
    return Case("nifti2_valid", "image", p, False, p)


def k_trailing_singletons_valid(root: Path) -> Case:
    """A 3-D volume stored as (X, Y, Z, 1, 1), as some converters write it."""
    p = _img(root, "five_d_singletons.nii.gz", brain()[..., None, None])
    return Case("trailing_singletons_valid", "image", p, False, p)


def k_nonascii_path_valid(root: Path) -> Case:
    p = _img(root / "dossier é ü", "sujet ñ 01.nii.gz")
    return Case("nonascii_spaces_valid", "image", p, False, p)


# --- 4D BOLD and time series --------------------------------------------------------------------------------


def k_bold_too_short(root: Path) -> Case:
    p = _img(root, "bold_short.nii.gz", brain((*SHAPE, 3)))
    return Case("bold_too_few_volumes", "bold", p, True, p)


def k_bold_3d(root: Path) -> Case:
    p = _img(root, "bold3d.nii.gz")
    return Case("bold_is_3d", "bold", p, True, p)


def k_timeseries_nan(root: Path) -> Case:
    ts = np.random.default_rng(0).normal(size=(120, 16)).astype(np.float32)
    ts[10, 3] = np.nan
    p = root / "ts_nan.npy"
    np.save(p, ts)
    return Case("timeseries_nan", "timeseries", p, True, p)


def k_timeseries_1d(root: Path) -> Case:
    p = root / "ts_1d.npy"
    np.save(p, np.random.default_rng(0).normal(size=120).astype(np.float32))
    return Case("timeseries_1d", "timeseries", p, True, p)


def k_timeseries_short(root: Path) -> Case:
    p = root / "ts_short.npy"
    np.save(p, np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32))
    return Case("timeseries_too_short", "timeseries", p, True, p)


def k_timeseries_pickle(root: Path) -> Case:
    p = root / "ts_object.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return Case("timeseries_pickled_object", "timeseries", p, True, p)


# --- manifests, BIDS, folders --------------------------------------------------------------------------------


def k_grid_mismatch(root: Path) -> Case:
    # a FLAIR whose field of view lies 300 mm away from the T1: not co-registered, cannot be resampled
    t1 = _img(root, "gm_t1.nii.gz")
    aff = _affine()
    aff[:3, 3] += 300
    fl = _img(root, "gm_flair.nii.gz", brain((24, 24, 20)), affine=aff)
    m = _manifest(root, _bad_row(_cohort(root), t1=t1, flair=fl), "grid_mismatch.csv")
    return Case("modalities_on_different_grids", "manifest", m, True, fl)


def k_resolution_mismatch_valid(root: Path) -> Case:
    # same physical space, different voxel size: resampled onto the T1 grid (not an error)
    t1 = _img(root, "am_t1.nii.gz")
    fl = _img(root, "am_flair.nii.gz", brain((16, 19, 16)), affine=_affine(6.25))
    m = _manifest(root, _bad_row(_cohort(root), t1=t1, flair=fl), "resolution_mismatch.csv")
    return Case("modalities_different_resolution_valid", "manifest", m, False, m)


def k_mask_labels(root: Path) -> Case:
    mask = _img(root, "ml_mask.nii.gz", np.random.default_rng(0).integers(0, 7, SHAPE).astype(np.float32))
    m = _manifest(root, _bad_row(_cohort(root), mask=mask), "mask_labels.csv")
    return Case("mask_unexpected_labels", "manifest", m, True, mask)


def k_manifest_missing_column(root: Path) -> Case:
    rows = [{k: v for k, v in r.items() if k != "subject"} for r in _cohort(root)]
    m = _manifest(root, rows, "no_subject_column.csv")
    return Case("manifest_missing_subject_column", "manifest", m, True, m)


def k_manifest_no_images(root: Path) -> Case:
    rows = [{k: v for k, v in r.items() if k not in ("t1", "flair", "mask")} for r in _cohort(root)]
    m = _manifest(root, rows, "no_image_column.csv")
    return Case("manifest_without_image_columns", "manifest", m, True, m)


def k_manifest_duplicates(root: Path) -> Case:
    rows = _cohort(root)
    m = _manifest(root, [*rows, {**rows[1], "split": "train"}], "duplicates.csv")
    return Case("manifest_duplicated_subjects", "manifest", m, True, m)


def k_manifest_missing_file(root: Path) -> Case:
    missing = root / "gone" / "sub-bad_T1w.nii.gz"
    m = _manifest(root, _bad_row(_cohort(root), t1=missing), "missing_file.csv")
    return Case("manifest_points_to_missing_file", "manifest", m, True, missing)


def k_manifest_folder_as_image(root: Path) -> Case:
    folder = root / "scan_folder"
    folder.mkdir(parents=True, exist_ok=True)
    m = _manifest(root, _bad_row(_cohort(root), t1=folder), "folder_as_image.csv")
    return Case("manifest_folder_as_image", "manifest", m, True, folder)


def k_manifest_bad_split(root: Path) -> Case:
    rows = _cohort(root)
    rows[0] = {**rows[0], "split": "training"}
    m = _manifest(root, rows, "bad_split.csv")
    return Case("manifest_unknown_split_value", "manifest", m, True, m)


def k_manifest_empty(root: Path) -> Case:
    m = root / "empty.csv"
    m.write_text("subject,t1,age\n")
    return Case("manifest_empty", "manifest", m, True, m)


def k_manifest_binary(root: Path) -> Case:
    m = root / "garbage.csv"
    m.write_bytes(bytes(range(256)) * 8)
    return Case("manifest_binary_garbage", "manifest", m, True, m)


def k_manifest_bad_label(root: Path) -> Case:
    m = _manifest(root, _bad_row(_cohort(root), age="old"), "bad_label.csv")
    return Case("manifest_non_numeric_age", "manifest", m, True, m)


def _relative_manifest(base: Path, rows: list[dict[str, object]], roles: tuple[str, ...], name: str) -> Path:
    """``rows`` with the ``roles`` paths made relative to ``base``, saved as ``base/name``."""
    for r in rows:
        for role in roles:
            r[role] = str(Path(str(r[role])).relative_to(base))
    return _manifest(base, rows, name)


def k_manifest_relative_valid(root: Path) -> Case:
    sub = root / "relative"
    m = _relative_manifest(sub, cohort_rows(sub / "images"), ("t1", "flair", "mask"), "relative.csv")
    return Case("manifest_relative_paths_valid", "manifest", m, False, m)


def k_manifest_nonascii_valid(root: Path) -> Case:
    sub = root / "données patients"
    rows = cohort_rows(sub / "IRM ü sujets")
    m = _manifest(sub, rows, "patients é.csv")
    return Case("manifest_nonascii_spaces_valid", "manifest", m, False, m)


def k_bids_no_participants(root: Path) -> Case:
    bids = root / "bids_no_participants"
    for i in range(len(SPLITS)):
        _img(bids / f"sub-0{i}" / "anat", f"sub-0{i}_T1w.nii.gz", brain(seed=i))
    return Case("bids_without_participants_tsv", "bids", bids, True, bids / "participants.tsv")


def k_bids_empty(root: Path) -> Case:
    bids = root / "bids_empty"
    bids.mkdir(parents=True)
    (bids / "participants.tsv").write_text("participant_id\tage\n")
    return Case("bids_without_subjects", "bids", bids, True, bids)


def k_empty_folder(root: Path) -> Case:
    d = root / "empty_folder"
    d.mkdir(parents=True)
    return Case("empty_folder", "folder", d, True, d)


# --- fMRI manifests and BIDS (the BrainMoE commands' own inputs) -----------------------------------------------

N_ROIS, N_TR = 10, 40


def _series(path: Path, seed: int, shape: tuple[int, int] = (N_TR, N_ROIS)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        np.save(path, np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    return path


def fmri_rows(root: Path) -> list[dict[str, object]]:
    """A small valid fMRI cohort under ``root``: 6 pretraining subjects × (rest, wm) and 8 labelled
    downstream subjects scanned in wm (ROI series of N_TR × N_ROIS)."""
    rows: list[dict[str, object]] = []
    for i in range(6):
        for j, state in enumerate(("rest", "wm")):
            f = _series(root / f"sub-p{i}" / f"sub-p{i}_task-{state}_timeseries.npy", 100 * i + j)
            rows.append(
                {"subject": f"sub-p{i}", "state": state, "timeseries": str(f), "cohort": "pretrain",
                 "phenotype": "", "sex": "FM"[i % 2], "age": 30 + 5 * i}
            )
    for i in range(8):
        f = _series(root / f"sub-d{i}" / f"sub-d{i}_task-wm_timeseries.npy", 1000 + i)
        rows.append(
            {"subject": f"sub-d{i}", "state": "wm", "timeseries": str(f), "cohort": "downstream",
             "phenotype": ("control", "patient")[i % 2], "sex": "FM"[(i // 2) % 2], "age": 25 + 6 * i}
        )
    return rows


def _fmri(folder: Path) -> list[dict[str, object]]:
    return fmri_rows(folder.parent / "_fmri_cohort")


def _fmri_bad_row(rows: list[dict[str, object]], **values: object) -> list[dict[str, object]]:
    """The fMRI cohort plus a labelled downstream scan of ``sub-bad`` overridden by ``values``."""
    return [*rows, {**rows[-1], "subject": "sub-bad", **values}]


def k_fmri_duplicates(root: Path) -> Case:
    rows = _fmri(root)
    m = _manifest(root, [*rows, rows[-1]], "fmri_duplicates.csv")
    return Case("fmri_manifest_duplicated_scans", "fmri_manifest", m, True, m)


def k_fmri_missing_file(root: Path) -> Case:
    gone = root / "gone" / "sub-bad_task-wm_timeseries.npy"
    m = _manifest(root, _fmri_bad_row(_fmri(root), timeseries=str(gone)), "fmri_missing_file.csv")
    return Case("fmri_manifest_points_to_missing_file", "fmri_manifest", m, True, gone)


def k_fmri_folder_as_series(root: Path) -> Case:
    folder = root / "series_folder"
    folder.mkdir(parents=True, exist_ok=True)
    m = _manifest(root, _fmri_bad_row(_fmri(root), timeseries=str(folder)), "fmri_folder.csv")
    return Case("fmri_manifest_folder_as_series", "fmri_manifest", m, True, folder)


def k_fmri_wrong_rois(root: Path) -> Case:
    f = _series(root / "sub-bad_task-wm_timeseries.npy", 7, (N_TR, N_ROIS + 3))
    m = _manifest(root, _fmri_bad_row(_fmri(root), timeseries=str(f)), "fmri_wrong_rois.csv")
    return Case("fmri_manifest_wrong_roi_count", "fmri_manifest", m, True, f)


def k_fmri_no_series_column(root: Path) -> Case:
    rows = [{k: v for k, v in r.items() if k != "timeseries"} for r in _fmri(root)]
    m = _manifest(root, rows, "fmri_no_series.csv")
    return Case("fmri_manifest_without_series_column", "fmri_manifest", m, True, m)


def k_fmri_no_state_column(root: Path) -> Case:
    rows = [{k: v for k, v in r.items() if k != "state"} for r in _fmri(root)]
    m = _manifest(root, rows, "fmri_no_state.csv")
    return Case("fmri_manifest_without_state_column", "fmri_manifest", m, True, m)


def k_fmri_bad_age(root: Path) -> Case:
    m = _manifest(root, _fmri_bad_row(_fmri(root), age="old"), "fmri_bad_age.csv")
    return Case("fmri_manifest_non_numeric_age", "fmri_manifest", m, True, m)


def k_fmri_relative_valid(root: Path) -> Case:
    sub = root / "relative"
    m = _relative_manifest(sub, fmri_rows(sub / "series"), ("timeseries",), "fmri_relative.csv")
    return Case("fmri_manifest_relative_paths_valid", "fmri_manifest", m, False, m)


def k_fmri_nonascii_valid(root: Path) -> Case:
    sub = root / "données IRMf"
    m = _manifest(sub, fmri_rows(sub / "séries ü sujets"), "sujets é.csv")
    return Case("fmri_manifest_nonascii_spaces_valid", "fmri_manifest", m, False, m)


def k_fmri_bids_no_participants(root: Path) -> Case:
    bids = root / "fmri_bids_no_participants"
    for r in _fmri(root):
        sub, state = r["subject"], r["state"]
        dst = bids / f"{sub}" / "func" / f"{sub}_task-{state}_timeseries.npy"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(Path(str(r["timeseries"])).read_bytes())
    return Case("fmri_bids_without_participants_tsv", "fmri_bids", bids, True, bids / "participants.tsv")


# every k_* function, in definition order
KINDS: list[Callable[[Path], Case]] = [f for name, f in list(globals().items()) if name.startswith("k_")]


def build(root: Path) -> list[Case]:
    """Write every kind under ``root`` (one sub-folder each) and return the cases."""
    cases = []
    root = root.resolve()
    for make in KINDS:
        folder = root / make.__name__[2:]
        folder.mkdir(parents=True, exist_ok=True)
        cases.append(make(folder))
    return cases
