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
    role: str  # "image" | "bold" | "timeseries" | "manifest" | "bids" | "folder"
    path: Path
    bad: bool
    culprit: Path  # the file a good error message must name


def _affine(spacing: float = 4.0) -> np.ndarray:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -np.array(SHAPE) * spacing / 2
    return aff


def brain(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    """A blob-shaped 'head' so foreground crops and normalisation have something to work on."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape[:3]], indexing="ij"))
    inside = (grid**2).sum(0) < 0.6
    vol = np.where(inside, 100.0, 0.0) + rng.normal(0, 5, shape[:3])
    if len(shape) == 4:
        vol = vol[..., None] + rng.normal(0, 5, shape)
    return vol.astype(np.float32)


def write(path: Path, data: np.ndarray, affine: np.ndarray | None = None, nifti2: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(data, _affine() if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
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


# --- image-level kinds -------------------------------------------------------------------------------------

def k_truncated_gz(root: Path) -> Case:
    good = _img(root, "ok.nii.gz")
    bad = root / "truncated.nii.gz"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    return Case("truncated_gz", "image", bad, True, bad)


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


def k_scl_slope_nan(root: Path) -> Case:
    p = _patch_header(_img(root, "slope_nan.nii", brain().astype(np.int16)), scl_slope=np.nan, scl_inter=0)
    return Case("scl_slope_nan", "image", p, True, p)


def k_scl_slope_inf(root: Path) -> Case:
    p = _patch_header(_img(root, "slope_inf.nii", brain().astype(np.int16)), scl_slope=np.inf, scl_inter=0)
    return Case("scl_slope_inf", "image", p, True, p)


def k_gigantic(root: Path) -> Case:
    p = _patch_header(_img(root, "gigantic.nii"), dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
    return Case("gigantic_header", "image", p, True, p)


def k_singular_affine(root: Path) -> Case:
    p = _patch_header(
        _img(root, "singular.nii"), srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0],
        sform_code=1, qform_code=0,
    )
    return Case("singular_affine", "image", p, True, p)


def k_nonfinite_affine(root: Path) -> Case:
    p = _img(root, "nanaff.nii")
    p = _patch_header(p, srow_x=[np.nan, 0, 0, 0], sform_code=1, qform_code=0)
    return Case("nonfinite_affine", "image", p, True, p)


def k_zero_pixdim(root: Path) -> Case:
    p = _patch_header(_img(root, "pixdim0.nii"), pixdim=[1, 0, 0, 0, 1, 1, 1, 1], qform_code=1, sform_code=0)
    return Case("zero_pixdim", "image", p, True, p)


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
    np.save(p, np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32))
    return Case("timeseries_too_short", "timeseries", p, True, p)


def k_timeseries_pickle(root: Path) -> Case:
    p = root / "ts_object.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return Case("timeseries_pickled_object", "timeseries", p, True, p)


# --- manifests, BIDS, folders --------------------------------------------------------------------------------

def k_grid_mismatch(root: Path) -> Case:
    t1 = _img(root, "gm_t1.nii.gz")
    fl = _img(root, "gm_flair.nii.gz", brain((24, 24, 20)))
    m = _manifest(root, [{"subject": "sub-01", "t1": t1, "flair": fl, **_labels(0)}], "grid_mismatch.csv")
    return Case("modalities_on_different_grids", "manifest", m, True, fl)


def k_affine_mismatch(root: Path) -> Case:
    t1 = _img(root, "am_t1.nii.gz")
    fl = _img(root, "am_flair.nii.gz", affine=_affine(3.0))
    m = _manifest(root, [{"subject": "sub-01", "t1": t1, "flair": fl, **_labels(0)}], "affine_mismatch.csv")
    return Case("modalities_with_different_affines", "manifest", m, True, fl)


def k_mask_labels(root: Path) -> Case:
    t1 = _img(root, "ml_t1.nii.gz")
    mask = _img(root, "ml_mask.nii.gz", np.random.default_rng(0).integers(0, 7, SHAPE).astype(np.float32))
    m = _manifest(root, [{"subject": "sub-01", "t1": t1, "mask": mask, **_labels(0)}], "mask_labels.csv")
    return Case("mask_unexpected_labels", "manifest", m, True, mask)


def k_manifest_missing_column(root: Path) -> Case:
    t1 = _img(root, "mc_t1.nii.gz")
    m = _manifest(root, [{"t1": t1, **_labels(0)}], "no_subject_column.csv")
    return Case("manifest_missing_subject_column", "manifest", m, True, m)


def k_manifest_no_images(root: Path) -> Case:
    m = _manifest(root, [{"subject": "sub-01", **_labels(0)}], "no_image_column.csv")
    return Case("manifest_without_image_columns", "manifest", m, True, m)


def k_manifest_duplicates(root: Path) -> Case:
    t1 = _img(root, "dup_t1.nii.gz")
    rows = [{"subject": "sub-01", "t1": t1, **_labels(0)}, {"subject": "sub-01", "t1": t1, **_labels(1)}]
    m = _manifest(root, rows, "duplicates.csv")
    return Case("manifest_duplicated_subjects", "manifest", m, True, m)


def k_manifest_missing_file(root: Path) -> Case:
    missing = root / "gone" / "sub-02_T1w.nii.gz"
    t1 = _img(root, "mf_t1.nii.gz")
    rows = [{"subject": "sub-01", "t1": t1, **_labels(0)}, {"subject": "sub-02", "t1": missing, **_labels(1)}]
    m = _manifest(root, rows, "missing_file.csv")
    return Case("manifest_points_to_missing_file", "manifest", m, True, missing)


def k_manifest_empty(root: Path) -> Case:
    m = root / "empty.csv"
    m.write_text("subject,t1,age\n")
    return Case("manifest_empty", "manifest", m, True, m)


def k_manifest_binary(root: Path) -> Case:
    m = root / "garbage.csv"
    m.write_bytes(bytes(range(256)) * 8)
    return Case("manifest_binary_garbage", "manifest", m, True, m)


def k_manifest_bad_label(root: Path) -> Case:
    t1 = _img(root, "bl_t1.nii.gz")
    rows = [{"subject": f"sub-0{i}", "t1": t1, **_labels(i), "age": "old" if i == 1 else 60} for i in range(2)]
    m = _manifest(root, rows, "bad_label.csv")
    return Case("manifest_non_numeric_age", "manifest", m, True, m)


def k_manifest_relative_valid(root: Path) -> Case:
    sub = root / "relative"
    for i in range(2):
        _img(sub / "images", f"sub-0{i}_T1w.nii.gz")
    rows = [{"subject": f"sub-0{i}", "t1": f"images/sub-0{i}_T1w.nii.gz", **_labels(i)} for i in range(2)]
    m = _manifest(sub, rows, "relative.csv")
    return Case("manifest_relative_paths_valid", "manifest", m, False, m)


def k_manifest_nonascii_valid(root: Path) -> Case:
    sub = root / "données patients"
    paths = [_img(sub / "IRM ü", f"sujet ñ {i}.nii.gz") for i in range(2)]
    rows = [{"subject": f"sub-0{i}", "t1": p, **_labels(i)} for i, p in enumerate(paths)]
    m = _manifest(sub, rows, "patients é.csv")
    return Case("manifest_nonascii_spaces_valid", "manifest", m, False, m)


def k_bids_no_participants(root: Path) -> Case:
    bids = root / "bids_no_participants"
    for i in range(2):
        _img(bids / f"sub-0{i}" / "anat", f"sub-0{i}_T1w.nii.gz")
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


KINDS: list[Callable[[Path], Case]] = [
    k_truncated_gz, k_wrong_magic, k_empty_file, k_text_as_nifti, k_zero_dim, k_negative_dim, k_image_2d,
    k_image_5d, k_4d_as_structural, k_nan_voxels, k_inf_voxels, k_all_zero, k_constant, k_scl_slope_nan,
    k_scl_slope_inf, k_gigantic, k_singular_affine, k_nonfinite_affine, k_zero_pixdim, k_complex_dtype,
    k_directory_as_file, k_missing_file, k_nifti2_valid, k_nonascii_path_valid, k_bold_too_short, k_bold_3d,
    k_timeseries_nan, k_timeseries_1d, k_timeseries_short, k_timeseries_pickle, k_grid_mismatch,
    k_affine_mismatch, k_mask_labels, k_manifest_missing_column, k_manifest_no_images, k_manifest_duplicates,
    k_manifest_missing_file, k_manifest_empty, k_manifest_binary, k_manifest_bad_label,
    k_manifest_relative_valid, k_manifest_nonascii_valid, k_bids_no_participants, k_bids_empty, k_empty_folder,
]


def build(root: Path) -> list[Case]:
    """Write every kind under ``root`` (one sub-folder each) and return the cases."""
    cases = []
    for make in KINDS:
        folder = root / make.__name__[2:]
        folder.mkdir(parents=True, exist_ok=True)
        cases.append(make(folder))
    return cases
