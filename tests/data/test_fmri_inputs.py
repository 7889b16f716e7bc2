"""fMRI inputs: ready series files, BOLD + atlas extraction, manifests/BIDS, real nibabel headers, synth cohort."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.testing import data_path

from neuromoe.data.connectivity import FCCache, connectivity
from neuromoe.data.fmri import (
    extract_timeseries,
    fmri_table,
    load_timeseries,
    scan_timeseries,
    table_connectivity,
)
from neuromoe.errors import InputError

AFFINE = np.array([[3.0, 0, 0, -18], [0, 3.0, 0, -18], [0, 0, 3.0, -15], [0, 0, 0, 1]])
SEEDS = np.array([[-9.0, -9.0, -6.0], [9.0, 0.0, 0.0], [0.0, 9.0, 9.0]])  # world mm, inside the image
OUTSIDE = np.array([[90.0, 90.0, 90.0]])


def _bold(path: Path, n_t: int = 40, seed: int = 0, tr_unit: str = "sec") -> np.ndarray:
    """12×12×11 BOLD with one known signal in a 6 mm ball around each seed, plus noise."""
    rng = np.random.default_rng(seed)
    sig = rng.standard_normal((n_t, len(SEEDS)))
    sig[:, 1] += 0.7 * sig[:, 0]  # ROIs 0 and 1 correlated, 2 independent
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in (12, 12, 11)], indexing="ij"), -1)
    world = nib.affines.apply_affine(AFFINE, ijk)
    vol = 100 + 0.3 * rng.standard_normal((12, 12, 11, n_t))
    for k, c in enumerate(SEEDS):
        vol[np.linalg.norm(world - c, axis=-1) <= 6.0] += sig[:, k]
    img = nib.Nifti1Image(vol.astype(np.float32), AFFINE)
    img.header.set_xyzt_units("mm", tr_unit)
    img.header["pixdim"][4] = 2.0 if tr_unit == "sec" else 2000.0
    nib.save(img, path)
    return sig


def test_load_timeseries_formats(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    pd.DataFrame(x, columns=[f"roi{i}" for i in range(4)]).to_csv(tmp_path / "b.tsv", sep="\t", index=False)
    np.savetxt(tmp_path / "c.csv", x, delimiter=",")  # no header
    for name in ("a.npy", "b.tsv", "c.csv"):
        np.testing.assert_allclose(load_timeseries(tmp_path / name), x, rtol=1e-6, atol=1e-6)
    (tmp_path / "d.tsv").write_text("r1\tr2\n1\t2\n3\tx\n4\t5\n")  # parsed before the length check
    with pytest.raises(InputError, match=r"d\.tsv: non-numeric value 'x' at row 3, column 2"):
        load_timeseries(tmp_path / "d.tsv")
    (tmp_path / "e.tsv").write_text("1\t2\nn/a\t3\n" + "".join(f"{i}\t{i + 1}\n" for i in range(4, 14)))
    with pytest.raises(InputError, match=r"e\.tsv: 1 NaN/Inf values \(first at timepoint 1, ROI 0\)"):
        load_timeseries(tmp_path / "e.tsv")
    np.save(tmp_path / "f.npy", x[:, 0])
    with pytest.raises(InputError, match="must be 2D"):
        load_timeseries(tmp_path / "f.npy")
    np.save(tmp_path / "g.npy", np.array([{"a": 1}]), allow_pickle=True)
    with pytest.raises(InputError, match=r"cannot read \.npy"):
        load_timeseries(tmp_path / "g.npy")
    (tmp_path / "h.txt").write_text("1 2\n3 4\n5 6\n")
    with pytest.raises(InputError, match="unsupported time series format"):
        load_timeseries(tmp_path / "h.txt")


def test_spheres_recover_planted_signals_and_report_empty_rois(tmp_path: Path) -> None:
    sig = _bold(tmp_path / "bold.nii.gz")
    coords = np.vstack([SEEDS, OUTSIDE])
    with pytest.warns(
        UserWarning, match=r"1 of 4 ROI sphere\(s\) without voxels .*\(first \[3\]\); their columns are zero"
    ):
        ts, valid = extract_timeseries(
            tmp_path / "bold.nii.gz", coords, radius_mm=4.0, detrend=False, return_mask=True
        )
    assert ts.shape == (40, 4) and ts.dtype == np.float32 and valid.tolist() == [True, True, True, False]
    assert np.all(ts[:, 3] == 0)
    for k in range(3):
        assert np.corrcoef(ts[:, k], sig[:, k])[0, 1] > 0.98
    np.testing.assert_allclose(ts[:, :3].std(0, ddof=1), 1.0, atol=1e-4)  # standardised (zscore_sample)
    with pytest.raises(InputError, match=r"ROI 3 is constant"):
        connectivity([ts], sources=[str(tmp_path / "bold.nii.gz")])
    fc = connectivity([ts], on_constant="zero", fisher_z=False)[0]
    assert fc[0, 1] > 0.4 and abs(fc[0, 2]) < 0.4 and np.all(fc[3] == 0)
    atlas = tmp_path / "rois.tsv"
    pd.DataFrame(SEEDS, columns=["x", "y", "z"]).assign(name=["a", "b", "c"]).to_csv(
        atlas, sep="\t", index=False
    )
    np.testing.assert_allclose(
        extract_timeseries(tmp_path / "bold.nii.gz", atlas, radius_mm=4.0, detrend=False),
        ts[:, :3],
        atol=1e-6,
    )


def test_roi_without_signal_is_flagged_and_zeroed(tmp_path: Path) -> None:
    _bold(tmp_path / "bold.nii.gz")
    img = nib.load(tmp_path / "bold.nii.gz")
    data = np.asarray(img.dataobj)
    data[:4, :4, :4] = 50.0  # a corner with a constant signal (e.g. outside the brain after masking)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "flat.nii.gz")
    corner = nib.affines.apply_affine(AFFINE, [1.5, 1.5, 1.5])
    with pytest.warns(UserWarning, match=r"1 of 2 ROI with a constant signal \(first \[1\]\)"):
        ts, valid = extract_timeseries(
            tmp_path / "flat.nii.gz", np.vstack([SEEDS[:1], corner]), standardize=False, return_mask=True
        )
    assert valid.tolist() == [True, False] and np.all(ts[:, 1] == 0) and ts[:, 0].std() > 0


def test_label_atlas_and_band_pass(tmp_path: Path) -> None:
    sig = _bold(tmp_path / "bold.nii.gz", n_t=60)
    # label atlas on a finer, larger 2 mm grid; label 9 lies outside the BOLD field of view
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -40
    ijk = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1)
    world = nib.affines.apply_affine(aff, ijk)
    lab = np.zeros((40, 40, 40), np.int16)
    for k, c in enumerate(SEEDS):
        lab[np.linalg.norm(world - c, axis=-1) <= 4.0] = k + 1
    lab[np.linalg.norm(world - np.array([34.0, 34.0, 34.0]), axis=-1) <= 4.0] = 9
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "labels.nii.gz")
    with pytest.warns(UserWarning, match=r"1 of 4 ROI label\(s\) absent from the BOLD grid"):
        ts, valid = extract_timeseries(tmp_path / "bold.nii.gz", tmp_path / "labels.nii.gz", return_mask=True)
    assert valid.tolist() == [True, True, True, False]
    for k in range(3):
        assert np.corrcoef(ts[:, k], sig[:, k])[0, 1] > 0.95
    filt = extract_timeseries(
        tmp_path / "bold.nii.gz", SEEDS, low_pass=0.1, high_pass=0.01
    )  # TR 2 s from header
    spec = np.abs(np.fft.rfft(filt, axis=0)) ** 2
    freqs = np.fft.rfftfreq(60, d=2.0)
    assert spec[freqs > 0.15].sum() < 0.05 * spec.sum()
    _bold(tmp_path / "ms.nii.gz", n_t=60, tr_unit="msec")  # TR stored as 2000 ms
    np.testing.assert_allclose(
        extract_timeseries(tmp_path / "ms.nii.gz", SEEDS, low_pass=0.1, high_pass=0.01), filt, atol=1e-5
    )
    img = nib.load(tmp_path / "bold.nii.gz")
    img.header.set_xyzt_units("mm", "unknown")
    nib.save(img, tmp_path / "nounit.nii.gz")
    with pytest.raises(InputError, match="needs the repetition time"):
        extract_timeseries(tmp_path / "nounit.nii.gz", SEEDS, low_pass=0.1)


def test_bold_refusals(tmp_path: Path) -> None:
    _bold(tmp_path / "short.nii.gz", n_t=6)
    with pytest.raises(InputError, match=r"short\.nii\.gz: only 6 volumes \(need ≥ 10\)"):
        extract_timeseries(tmp_path / "short.nii.gz", SEEDS)
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), AFFINE), tmp_path / "three.nii.gz")
    with pytest.raises(InputError, match="ROI time series need a 4D BOLD run"):
        extract_timeseries(tmp_path / "three.nii.gz", SEEDS)
    nan = np.ones((5, 5, 5, 12), np.float32)
    nan[1, 1, 1, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, AFFINE), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="1 NaN/Inf voxels"):
        extract_timeseries(tmp_path / "nan.nii.gz", SEEDS)
    _bold(tmp_path / "long.nii.gz", n_t=12)
    with pytest.raises(InputError, match=r"\(M, 3\) array"):
        extract_timeseries(tmp_path / "long.nii.gz", np.zeros((4, 2)))


def test_real_nibabel_headers() -> None:
    """example4d.nii.gz has 2 volumes (refused); functional.nii (17×21×3×20, 4×4×8 mm) is extracted."""
    with pytest.raises(InputError, match=r"example4d\.nii\.gz: only 2 volumes"):
        extract_timeseries(os.path.join(data_path, "example4d.nii.gz"))
    func = os.path.join(data_path, "functional.nii")
    with pytest.warns(UserWarning, match=r"of 264 ROI sphere\(s\) without voxels"):
        ts, valid = extract_timeseries(func, return_mask=True)  # default Power-264 atlas
    assert ts.shape == (20, 264) and 5 < valid.sum() < 264 and np.isfinite(ts).all()
    with pytest.raises(InputError, match=r"functional\.nii: ROI 0 .* is constant"):
        connectivity([ts], sources=[func])
    fc = connectivity([ts], "pearson", on_constant="zero")
    assert np.isfinite(fc).all() and np.abs(fc[0][np.ix_(valid, valid)]).sum() > 0
    assert np.all(fc[0][~valid] == 0)


def test_fmri_table_manifest_and_bids(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((20, 5)).astype(np.float32)
    func = tmp_path / "bids" / "sub-01" / "func"
    func.mkdir(parents=True)
    for task, run in (("rest", 1), ("rest", 2), ("wm", 1)):
        np.save(func / f"sub-01_task-{task}_run-{run}_timeseries.npy", x + run)
    (func / "sub-01_task-rest_desc-confounds_timeseries.tsv").write_text("a\tb\n1\t2\n")
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t31\tF\n")
    df = fmri_table(tmp_path / "bids")
    assert len(df) == 3 and sorted(df["state"]) == ["rest", "rest", "wm"] and set(df["run"]) == {"1", "2"}
    assert df["age"].tolist() == [31, 31, 31] and all(Path(p).is_absolute() for p in df["timeseries"])
    np.testing.assert_allclose(scan_timeseries(df.iloc[1]), x + 2)
    m = tmp_path / "m.csv"
    m.write_text(
        "subject,timeseries,phenotype\ns1,bids/sub-01/func/sub-01_task-wm_run-1_timeseries.npy,patient\n"
    )
    dm = fmri_table(m)
    assert dm["state"].isna().all() and Path(dm["timeseries"][0]).exists()
    m.write_text("subject,timeseries,bold\ns1,,\n")
    with pytest.raises(InputError, match=r"m\.csv: subject s1: no timeseries or bold file"):
        fmri_table(m)
    m.write_text("subject,timeseries\ns1,missing.npy\n")
    with pytest.raises(InputError, match="timeseries file missing"):
        fmri_table(m)
    m.write_text("subject,age\ns1,3\n")
    with pytest.raises(InputError):
        fmri_table(m)


def test_synthetic_bold_cohort_end_to_end(tmp_path: Path) -> None:
    """`neuromoe synth --bold` output: manifest and BIDS read as is; BOLD extraction ≈ the ready series."""
    from neuromoe.data.synth.cohort import synth_cohort

    out = synth_cohort(
        tmp_path / "c",
        n_structural=0,
        n_lesion=0,
        n_fmri=2,
        kinds=("fmri",),
        n_rois=12,
        bold=True,
        spacing=6.0,
        n_timepoints=40,
        progress=False,
    )
    df = fmri_table(out["fmri"])
    assert len(df) == 6 and set(df["state"]) == {"rest", "wm", "motor", "language", "emotion"}
    assert (
        fmri_table(tmp_path / "c")["phenotype"].tolist() == df["phenotype"].tolist()
    )  # cohort dir → manifest
    cache = FCCache(tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fc_bold = table_connectivity(df, "pearson", atlas=out["atlas"], cache=cache, source="bold")
        assert cache.misses == 12 and cache.hits == 0  # 6 series + 6 FC
        again = table_connectivity(df, "pearson", atlas=out["atlas"], cache=cache, source="bold")
    assert cache.hits == 6
    np.testing.assert_array_equal(fc_bold, again)
    fc_ready = table_connectivity(df, "pearson")
    iu = np.triu_indices(12, 1)
    agree = [np.corrcoef(a[iu], b[iu])[0, 1] for a, b in zip(fc_bold, fc_ready)]
    assert min(agree) > 0.8
    tan = table_connectivity(df, "tangent", atlas=out["atlas"], cache=cache, source="bold")
    assert tan.shape == (6, 12, 12) and np.isfinite(tan).all()
    # the header carries the generator's TR (it said 1 s), and writing BOLD leaves the series as they are
    # without it (the BOLD noise came from the subject's stream and changed every later state)
    import json

    import nibabel as nib

    tr = json.loads((tmp_path / "c" / "ground_truth.json").read_text())["fmri"]["tr"]
    assert nib.load(df["bold"].iloc[0]).header.get_zooms()[3] == pytest.approx(tr)
    plain = synth_cohort(tmp_path / "p", n_structural=0, n_lesion=0, n_fmri=2, kinds=("fmri",), n_rois=12,
                         spacing=6.0, n_timepoints=40, progress=False)
    for a, b in zip(df["timeseries"], fmri_table(plain["fmri"])["timeseries"], strict=True):
        np.testing.assert_array_equal(np.load(a), np.load(b))


def test_a_missing_value_in_the_first_volume_is_not_a_header(tmp_path):
    """n/a in row 1 of a headerless table was taken for a header and the volume silently dropped."""
    from neuromoe.data.fmri import load_timeseries

    (tmp_path / "a.tsv").write_text("1.0\tn/a\t2.0\n" + "\n".join("\t".join(["1", str(i), "3"]) for i in range(12)))
    with pytest.raises(InputError, match="1 NaN/Inf values \\(first at timepoint 0, ROI 1\\)"):
        load_timeseries(tmp_path / "a.tsv")
    (tmp_path / "b.tsv").write_text("roi_a\troi_b\n" + "\n".join(f"{i}\t{i * i}" for i in range(12)))
    assert load_timeseries(tmp_path / "b.tsv").shape == (12, 2)


@pytest.mark.parametrize("first", [0, 1])
def test_a_header_of_column_numbers_is_a_header_not_a_time_point(tmp_path: Path, first: int) -> None:
    """``pd.DataFrame(x).to_csv(index=False)`` writes 0..M-1 as the header; it was read as time point 0
    (160 × 32 became 161 × 32 and every FC value moved)."""
    import pandas as pd

    from neuromoe.data.fmri import load_timeseries

    x = np.random.default_rng(0).standard_normal((30, 6))
    path = tmp_path / "ts.csv"
    pd.DataFrame(x, columns=range(first, first + 6)).to_csv(path, index=False)
    np.testing.assert_allclose(load_timeseries(path), x.astype(np.float32), rtol=1e-6)
    np.savetxt(path, np.vstack([np.arange(6) + 0.5, x]), delimiter=",")  # numeric, not a ramp of integers: data
    assert load_timeseries(path).shape == (31, 6)


def test_a_bold_path_that_is_a_folder_is_refused_as_input_with_a_cache(tmp_path: Path) -> None:
    """With the series cache, hashing a BOLD 'file' that is a folder raised IsADirectoryError (exit 1, an OS
    error) before extraction's own refusal (exit 2); found by the slow bad-input matrix."""
    from neuromoe.data.fmri import scan_timeseries
    from neuromoe.errors import InputError

    (tmp_path / "folder.nii.gz").mkdir()
    cache = FCCache(tmp_path / "cache")
    with pytest.raises(InputError):
        scan_timeseries({"subject": "s", "bold": str(tmp_path / "folder.nii.gz")}, cache=cache)
    with pytest.raises(InputError, match="cannot read the file"):
        cache.key(tmp_path / "folder.nii.gz", what="fc")
