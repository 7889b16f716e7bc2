"""Preprocessing: output affine maps back to the input grid, multi-modal grids, cache, cohort runner."""

from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neuromoe.data.preprocess import (
    PreprocCache,
    PreprocSpec,
    antialias_sigma,
    preprocess_case,
    preprocess_cohort,
    preprocess_image,
)
from neuromoe.errors import InputError
from neuromoe.io.nifti import load_nifti, resample_to_grid


def _brain(path, affine, shape=(20, 22, 18), seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    data = ((g**2).sum(0) < 0.5) * (100 + 10 * rng.random(shape))
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


def _oblique_lps():
    c, s = np.cos(0.25), np.sin(0.25)
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return rot @ np.diag([-1.5, -1.5, 2.0, 1.0]) @ np.array(
        [[1, 0, 0, -10], [0, 1, 0, -11], [0, 0, 1, -9], [0, 0, 0, 1.0]])


def test_prediction_goes_back_to_oblique_lps_input(tmp_path):
    img = load_nifti(_brain(tmp_path / "t1.nii.gz", _oblique_lps()))
    # geometry only: the anti-aliasing blur would move the brain edge that the Dice below reads
    spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=(24, 24, 24), antialias=False)
    pre = preprocess_image(img, spec)
    assert pre.data.shape == (1, 24, 24, 24)
    fg = pre.data[0] != 0
    assert abs(pre.data[0][fg].mean()) < 1e-3 and abs(pre.data[0][fg].std() - 1) < 1e-2
    # "prediction" = the brain on the output grid, at half its intensity (not "!= 0": interpolation spreads
    # small values one voxel past the edge, which costs the Dice more the finer the grid)
    raw = preprocess_image(img, PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=(24, 24, 24), antialias=False,
                                            norm="none"))
    pred = (raw.data[0] > 50).astype(np.float32)
    back = resample_to_grid(pred, raw.affine, img.data.shape, img.affine, order=0)
    truth = img.data > 0
    dice = 2 * (back.astype(bool) & truth).sum() / (back.astype(bool).sum() + truth.sum())
    assert dice > 0.9


def test_multimodal_common_grid_mask_nearest_and_cache(tmp_path):
    t1 = _brain(tmp_path / "t1.nii.gz", np.diag([1.0, 1.0, 1.0, 1.0]))
    fl = _brain(tmp_path / "fl.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0]), shape=(10, 11, 9), seed=1)
    mask = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image((load_nifti(t1).data > 105).astype(np.uint8), np.eye(4)), mask)
    spec = PreprocSpec(spacing=(1.5, 1.5, 1.5), shape=(16, 16, 16), norm="percentile")
    cache = PreprocCache(tmp_path / "c")
    out = preprocess_case({"t1": str(t1), "flair": str(fl), "mask": str(mask)}, spec, cache)
    assert {k: v.shape for k, v in out.items()} == {r: (16, 16, 16) for r in ("t1", "flair", "mask")}
    assert set(np.unique(out["mask"])) <= {0.0, 1.0} and out["t1"].max() <= 1.0
    again = preprocess_case({"t1": str(t1), "flair": str(fl), "mask": str(mask)}, spec, cache)
    assert (cache.misses, cache.hits) == (1, 1)
    np.testing.assert_array_equal(again["flair"], out["flair"])
    assert PreprocSpec.from_dict(spec.to_dict()) == spec


def test_cohort_second_pass_recomputes_nothing_and_records_failures(tmp_path):
    rows = [{"subject": f"s{i}", "t1": str(_brain(tmp_path / f"s{i}.nii.gz", np.eye(4), seed=i))} for i in range(3)]
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    rows.append({"subject": "sbad", "t1": str(bad)})
    table = pd.DataFrame(rows)
    spec = PreprocSpec(spacing=None, shape=(16, 16, 16))
    first = preprocess_cohort(table, spec, tmp_path / "c", workers=1, progress=False)
    assert (first["done"], first["cached"], first["failed"]) == (3, 0, 1)
    assert "sbad" in pd.read_csv(first["failures_csv"])["subject"].tolist()
    # with sessions, a failure row says which session failed
    two = pd.DataFrame([{**rows[0], "session": "ses-1"}, {"subject": "s0", "session": "ses-2", "t1": str(bad)}])
    out = preprocess_cohort(two, spec, tmp_path / "e", workers=1, progress=False)
    failed = pd.read_csv(out["failures_csv"], dtype=str)
    assert failed[["subject", "session"]].values.tolist() == [["s0", "ses-2"]]
    second = preprocess_cohort(table, spec, tmp_path / "c", workers=1, progress=False)
    assert (second["done"], second["cached"]) == (0, 3)
    shards = [preprocess_cohort(table, spec, tmp_path / "d", shard=(i, 2), progress=False) for i in range(2)]
    assert sum(s["done"] + s["failed"] for s in shards) == 4


def _ball(path, voxel: float) -> str:
    """The same physical object (a 30 mm ball with a 10 mm ring) as a scanner with ``voxel`` mm voxels sees
    it: rendered at 0.5 mm, then averaged over each voxel (partial volume)."""
    c = np.arange(160) * 0.5 - 39.75
    r = np.sqrt(sum(a**2 for a in np.meshgrid(c, c, c, indexing="ij")))
    hi = np.where(r < 15, 100.0, np.where((r > 20) & (r < 25), 60.0, 0.0)).astype(np.float32)
    f = round(voxel / 0.5)
    n = 160 // f
    data = hi[: n * f, : n * f, : n * f].reshape(n, f, n, f, n, f).mean((1, 3, 5))
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = -40 + voxel / 2
    nib.save(nib.Nifti1Image(data, aff), path)
    return str(path)


def test_antialias_makes_the_output_independent_of_the_input_voxel_size(tmp_path):
    fine, coarse = _ball(tmp_path / "fine.nii.gz", 1.0), _ball(tmp_path / "coarse.nii.gz", 3.0)
    gap = {}
    for aa in (False, True):
        spec = PreprocSpec(spacing=(4.0, 4.0, 4.0), shape=(20, 20, 20), crop_foreground=False, norm="none",
                           antialias=aa)
        a, b = (preprocess_image(load_nifti(p), spec).data[0] for p in (fine, coarse))
        gap[aa] = float(np.abs(a - b).mean())
    assert gap[True] < 0.6 * gap[False]  # measured 0.45: the rest is where the grids sample the edge
    assert np.allclose(antialias_sigma(np.diag([4.0, 4.0, 5.0, 1.0]), (4.0, 4.0, 4.0)), 0)
    # cubic: the variance of a 4 mm box beyond a 1 mm one, (4² − 1²) / 12 mm², in 1 mm voxels
    assert np.allclose(antialias_sigma(np.eye(4), (4.0, 4.0, 4.0)), np.sqrt(15 / 12), atol=1e-3)
    # linear (older models): FWHM sqrt(4² − 1²) mm
    assert np.allclose(antialias_sigma(np.eye(4), (4.0, 4.0, 4.0), "linear"), np.sqrt(15) / 2.3548, atol=1e-3)


def _shells(path, voxel: float, shift: float) -> str:
    """Concentric shells 6 mm apart rendered at ``voxel`` mm (averaged over each voxel from 0.5 mm), the grid
    moved by ``shift`` mm against the world's 4 mm lattice."""
    fine = 0.5
    n = round(80 / voxel) * round(voxel / fine)
    c = (np.arange(n) + 0.5) * fine - 40.0 + shift
    r = np.sqrt(sum(a**2 for a in np.meshgrid(c, c, c, indexing="ij")))
    hi = np.where(r < 30, 50.0 + 50.0 * (np.floor(r / 3.0) % 2), 0.0).astype(np.float32)
    f, m = round(voxel / fine), round(80 / voxel)
    data = hi.reshape(m, f, m, f, m, f).mean((1, 3, 5))
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = -40.0 + shift + voxel / 2
    nib.save(nib.Nifti1Image(data, aff), path)
    return str(path)


def test_cubic_interpolation_blurs_alike_wherever_the_grids_fall(tmp_path):
    """Linear interpolation blurs by an amount set by where the output voxels fall between the input's: a 2 mm
    scan whose voxels coincide with every other 4 mm voxel reached that grid sharper than the same scan moved by
    a millimetre (a brain-age model read the same subjects at 2 mm 3.4 y younger than at 3 mm)."""

    def detail(spec: PreprocSpec, shift: float) -> float:
        out = preprocess_image(load_nifti(_shells(tmp_path / f"s{shift}.nii.gz", 2.0, shift)), spec).data[0]
        return float(np.abs(np.diff(out, axis=0)).mean())

    base = dict(spacing=(4.0, 4.0, 4.0), shape=(20, 20, 20), crop_foreground=False, norm="none")
    # shifted by 1 mm the 2 mm voxel centres sit on the 4 mm lattice; unshifted, halfway between its points
    ratio = {i: detail(PreprocSpec(**base, interpolation=i), 1.0) / detail(PreprocSpec(**base, interpolation=i), 0.0)
             for i in ("linear", "cubic")}
    assert ratio["linear"] > 1.1 and abs(ratio["cubic"] - 1.0) < 0.05, ratio


def test_specs_stored_without_antialias_replay_without_it():
    assert PreprocSpec.from_dict({"spacing": [2, 2, 2]}).antialias is False
    assert PreprocSpec.from_overrides({}).antialias is True
    assert PreprocSpec.from_dict(PreprocSpec().to_dict()).antialias is True


def test_specs_stored_without_interpolation_replay_linear():
    assert PreprocSpec.from_dict({"spacing": [2, 2, 2]}).interpolation == "linear"
    assert PreprocSpec.from_overrides({}).interpolation == "cubic"
    with pytest.raises(Exception, match="interpolation"):
        PreprocSpec(interpolation="sinc")


def test_rank_norm_is_the_same_for_any_monotonic_intensity_change(tmp_path):
    img = load_nifti(_brain(tmp_path / "t1.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0])))
    gamma = load_nifti(_brain(tmp_path / "g.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0])))
    gamma.data[...] = 3 * np.clip(gamma.data, 0, None) ** 1.4  # another scanner's gain and contrast
    spec = PreprocSpec(spacing=None, shape=None, crop_foreground=False, norm="rank")
    a, b = (preprocess_image(i, spec).data[0] for i in (img, gamma))
    fg = img.data != 0
    assert np.allclose(a, b, atol=1e-5)
    assert abs(a[fg].mean()) < 1e-3 and abs(a[fg].std() - 1) < 0.05 and (a[~fg] == 0).all()
    z = PreprocSpec(spacing=None, shape=None, crop_foreground=False, norm="zscore")
    assert not np.allclose(*(preprocess_image(i, z).data[0] for i in (img, gamma)), atol=1e-2)


def test_cache_key_depends_on_the_reference_role(tmp_path):
    """The first role is the reference grid whose foreground sets the crop: the same files in another
    role order must not hit the entry computed for the first order (it held another grid)."""
    from neuromoe.data.preprocess import PreprocCache, PreprocSpec

    for name in ("t1", "flair"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    a = {"t1": str(tmp_path / "t1.nii.gz"), "flair": str(tmp_path / "flair.nii.gz")}
    b = {"flair": a["flair"], "t1": a["t1"]}
    cache, spec = PreprocCache(tmp_path / "cache"), PreprocSpec(spacing=(1.0, 1.0, 1.0), shape=None)
    assert cache.key(a, spec) != cache.key(b, spec) and cache.key(a, spec) == cache.key(dict(a), spec)


def test_shards_keep_their_own_failures_and_a_clean_rerun_leaves_none(tmp_path):
    """``--shard i/n`` jobs share one cache dir: each used to overwrite one failures.csv, and a clean re-run
    left the old table naming subjects that no longer fail."""
    import zlib

    rows = [{"subject": f"s{i}", "t1": str(_brain(tmp_path / f"s{i}.nii.gz", np.eye(4), seed=i))} for i in range(4)]
    bad = {}
    for k in range(100):  # one failing subject in each shard of 2
        bad.setdefault(zlib.crc32(f"bad{k}".encode()) % 2, f"bad{k}")
    for s in bad.values():
        rows.append({"subject": s, "t1": str(tmp_path / f"{s}_missing.nii.gz")})
    table = pd.DataFrame(rows)
    spec = PreprocSpec(spacing=None, shape=(16, 16, 16))
    cache = tmp_path / "c"
    for i in range(2):
        out = preprocess_cohort(table, spec, cache, shard=(i, 2), workers=1, progress=False)
        assert out["failures_csv"].endswith(f"failures_shard{i}of2.csv")
    for i in range(2):
        assert pd.read_csv(cache / f"failures_shard{i}of2.csv")["subject"].tolist() == [bad[i]]
    clean = preprocess_cohort(table[~table["subject"].isin(bad.values())], spec, cache, workers=1, progress=False)
    assert clean["failed"] == 0 and clean["failures_csv"] == "" and not list(cache.glob("failures*.csv"))


def test_a_table_without_image_columns_is_one_clear_error(tmp_path):
    from neuromoe.errors import InputError

    table = pd.DataFrame({"subject": ["s1", "s2"], "timeseries": ["a.npy", "b.npy"]})
    table.attrs["source"] = str(tmp_path / "fmri.csv")
    with pytest.raises(InputError, match=r"fmri\.csv.*no image column"):
        preprocess_cohort(table, PreprocSpec(), tmp_path / "c", workers=1, progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("bad", [{"spacing": "fine"}, {"spacing": 0}, {"spacing": [2, 2]}, {"shape": [64, 64]},
                                 {"shape": [64.5, 64, 64]}, {"register": "yes please"}, {"crop_margin": "two"},
                                 {"antialias": "maybe"}, {"head_mask": "yes"}, {"bias_correct": 1},
                                 {"percentiles": [99, 1]}])
def test_preprocessing_overrides_are_type_checked(bad):
    """``preprocessing`` is a free dict in the family configs: bad values crashed with a bare TypeError or were
    taken as given ('yes please' counted as true)."""
    from neuromoe.errors import ConfigError

    with pytest.raises(ConfigError, match="preprocessing"):
        PreprocSpec.from_dict(bad)


def test_a_scalar_spacing_or_shape_means_isotropic():
    spec = PreprocSpec.from_dict({"spacing": 3, "shape": 64})
    assert spec.spacing == (3.0, 3.0, 3.0) and spec.shape == (64, 64, 64)
    assert PreprocSpec.from_dict({"spacing": "none"}).spacing is None  # like config.py's optional fields


def test_cache_key_sees_new_voxels_with_the_same_size_and_mtime(tmp_path):
    """An uncompressed .nii rewritten with other voxels keeps its size; with the same mtime too (cp -p, rsync -a
    of another version) the key read only the header and background, and the cache returned the old volume."""
    import os

    path = tmp_path / "t1.nii"
    spec = PreprocSpec(spacing=None, shape=(16, 16, 16), norm="none", antialias=False)
    cache = PreprocCache(tmp_path / "cache")
    outs = []
    for value in (1.0, 5.0):
        data = np.zeros((32, 32, 32), np.float32)
        data[8:24, 8:24, 8:24] = value
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        if value == 1.0:
            st = os.stat(path)
        else:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert os.stat(path).st_size == st.st_size
        outs.append(float(preprocess_case({"t1": str(path)}, spec, cache)["t1"].max()))
    assert outs == [1.0, 5.0] and cache.hits == 0
    # an edit between the sampled blocks of an uncompressed file (the whole .nii is hashed now)
    data = np.random.default_rng(0).uniform(1, 100, (40, 40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    st = os.stat(path)
    spec = PreprocSpec(spacing=None, shape=(40, 40, 40), norm="none", crop_foreground=False, antialias=False)
    preprocess_case({"t1": str(path)}, spec, cache)
    data[10:30, 10:30, 2:4] = 5000.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert float(preprocess_case({"t1": str(path)}, spec, cache)["t1"].max()) == 5000.0


def test_bids_root_with_func_scans_preprocesses_anat_only(tmp_path):
    """A BIDS root lists its func/ scans too; they are skipped (and counted), not failures with exit 1. A
    manifest row with no image at all is still a failure."""
    from neuromoe.io.table import load_table

    root = tmp_path / "bids"
    for i in range(2):
        anat, func = root / f"sub-0{i}" / "anat", root / f"sub-0{i}" / "func"
        anat.mkdir(parents=True)
        func.mkdir()
        _brain(anat / f"sub-0{i}_T1w.nii.gz", np.eye(4), seed=i)
        for task in ("rest", "wm"):
            np.save(func / f"sub-0{i}_task-{task}_timeseries.npy", np.zeros((20, 5), np.float32))
    table = load_table(root)
    assert len(table) == 6
    spec = PreprocSpec(spacing=None, shape=(16, 16, 16))
    out = preprocess_cohort(table, spec, tmp_path / "c", workers=1, progress=False)
    assert (out["done"], out["failed"], out["skipped_fmri"], out["failures_csv"]) == (2, 0, 4, "")
    empty = pd.DataFrame([{"subject": "s0", "t1": table["t1"].dropna().iloc[0]}, {"subject": "s1", "t1": ""}])
    out = preprocess_cohort(empty, spec, tmp_path / "d", workers=1, progress=False)
    assert (out["done"], out["failed"], out["skipped_fmri"]) == (1, 1, 0)


def test_a_header_with_wrong_voxel_units_is_refused_before_resampling(tmp_path):
    """1000 mm voxels (metres written as mm) pass the header checks; resampling them to 2 mm asked torch for
    terabytes and ended in a traceback. Now one InputError naming the file."""
    from neuromoe.errors import InputError

    path = _brain(tmp_path / "m.nii.gz", np.diag([1000.0, 1000.0, 1000.0, 1.0]))
    with pytest.raises(InputError, match="1000×1000×1000 mm voxels") as exc:
        preprocess_image(load_nifti(path), PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=(16, 16, 16)))
    assert "m.nii.gz" in str(exc.value) and "units" in str(exc.value)
    preprocess_image(load_nifti(_brain(tmp_path / "ok.nii.gz", np.diag([4.0, 4.0, 4.0, 1.0]))), PreprocSpec())


def test_cache_key_changes_with_the_cache_version(tmp_path, monkeypatch):
    """An entry written by an older preprocessing (e.g. before units were honoured) is never served."""
    import neuromoe.data.preprocess as prep

    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    cache, spec = prep.PreprocCache(tmp_path / "c"), prep.PreprocSpec()
    key = cache.key({"t1": str(path)}, spec)
    monkeypatch.setattr(prep, "CACHE_VERSION", prep.CACHE_VERSION + 1)
    assert cache.key({"t1": str(path)}, spec) != key


def _mni(resolution: int = 2) -> nib.Nifti1Image:
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=resolution)
    return nib.Nifti1Image(np.asarray(img.get_fdata(), np.float32), img.affine)


def test_an_oblique_grid_of_the_same_anatomy_reaches_the_model_in_world_orientation(tmp_path):
    """The same brain stored on a voxel grid rotated by 15°: the output was the rotated brain (MONAI keeps the
    rotation in the affine); it is now resampled onto world axes, like the axis-aligned scan."""
    img = _mni()
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    centre = np.eye(4)
    centre[:3, 3] = img.affine[:3, :3] @ (np.array(img.shape) / 2) + img.affine[:3, 3]
    obl_aff = centre @ rot @ np.linalg.inv(centre) @ img.affine
    obl = resample_to_grid(np.asarray(img.dataobj), img.affine, img.shape, obl_aff, order=1)
    nib.save(img, tmp_path / "axis.nii.gz")
    nib.save(nib.Nifti1Image(obl, obl_aff), tmp_path / "oblique.nii.gz")
    spec = PreprocSpec(spacing=(4.0, 4.0, 4.0), shape=(48, 48, 48), crop_foreground=False)
    a, b = (preprocess_image(load_nifti(tmp_path / n), spec) for n in ("axis.nii.gz", "oblique.nii.gz"))
    brain = (a.data[0] != 0) & (b.data[0] != 0)
    r = np.corrcoef(a.data[0][brain], b.data[0][brain])[0, 1]
    assert r > 0.9  # measured 0.94 (two interpolations of the rotated grid); 0.77 with the rotation kept
    assert np.allclose(b.affine[:3, :3], np.diag([4.0, 4.0, 4.0]))


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path):
    t1 = _brain(tmp_path / "t1.nii.gz", np.eye(4))
    (tmp_path / "out").write_text("x")
    table = pd.DataFrame({"subject": ["a"], "t1": [str(t1)]})
    with pytest.raises(InputError, match="existing file"):
        preprocess_cohort(table, PreprocSpec(spacing=(2.0, 2.0, 2.0)), tmp_path / "out", progress=False)


@pytest.mark.parametrize("offset", [1e-3, -0.05, 0.04, 0.11, 2.0, -30.0, 250.0])
def test_an_offset_on_a_zero_background_changes_neither_crop_nor_normalisation(tmp_path, offset):
    """A rescale intercept or rounding offset on an exactly zero background counted as foreground: the crop jumped
    from the head to the whole field of view and the background entered the z-score (the MNI template + 2e-6 moved
    a predicted brain age by 14 years). Past 0.1 % of the peak (0.11 here, on a brain of ~100) the same cliff
    stood (+0.26 on the template's 255: 2.6 years); a flat background at any level is now an offset."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    clean = load_nifti(_brain(tmp_path / "t1.nii.gz", aff, shape=(40, 44, 36)))
    shifted = nib.Nifti1Image(np.asarray(nib.load(tmp_path / "t1.nii.gz").dataobj) + np.float32(offset), aff)
    nib.save(shifted, tmp_path / "t1_offset.nii.gz")
    spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=(32, 32, 32))
    a = preprocess_image(clean, spec)
    b = preprocess_image(load_nifti(tmp_path / "t1_offset.nii.gz"), spec)
    np.testing.assert_allclose(b.affine, a.affine)
    np.testing.assert_allclose(b.data, a.data, atol=1e-2)


def test_a_noise_floor_is_not_taken_for_an_offset(tmp_path):
    """Only a flat background is shifted: a scanner's noise floor (no two voxels alike) reaches preprocessing as
    it is, and so do an image whose minimum is zero and one with a zero background beside a plateau of tissue."""
    from neuromoe.data.preprocess import _without_offset

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.asarray(nib.load(_brain(tmp_path / "t1.nii.gz", aff)).dataobj)
    noisy = data + np.random.default_rng(0).rayleigh(2.0, data.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noisy, aff), tmp_path / "noisy.nii.gz")
    # a brain-extracted scan z-scored and clipped low: its plateau at the minimum is tissue, 0 the background
    z = np.where(data > 0, np.clip((data - 105.0) / 3.0, -1.2, None), 0.0).astype(np.float32)
    assert (z == z.min()).mean() > 0.01
    nib.save(nib.Nifti1Image(z, aff), tmp_path / "clipped.nii.gz")
    for name in ("t1", "noisy", "clipped"):
        img = load_nifti(tmp_path / f"{name}.nii.gz")
        assert _without_offset(img) is img


def test_a_pre_normalised_image_is_said_once(tmp_path, capsys, monkeypatch):
    """A z-scored scan ran with exit 0 and other results than the scan as it came, without a word."""
    from neuromoe.data import preprocess

    monkeypatch.setattr(preprocess, "_NEGATIVE_SAID", [])
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.asarray(nib.load(_brain(tmp_path / "t1.nii.gz", aff, shape=(24, 24, 24))).dataobj)
    spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=None)
    preprocess_image(load_nifti(tmp_path / "t1.nii.gz"), spec)
    assert capsys.readouterr().err == ""
    z = np.where(data > 0, (data - 105.0) / 3.0, 0.0).astype(np.float32)
    nib.save(nib.Nifti1Image(z, aff), tmp_path / "z.nii.gz")
    for _ in range(2):
        preprocess_image(load_nifti(tmp_path / "z.nii.gz"), spec)
    err = capsys.readouterr().err
    assert err.count("pre-normalised") == 1 and "z.nii.gz" in err


def test_with_the_head_mask_a_noise_floor_and_an_off_centre_head_change_nothing(tmp_path):
    """Raw scanner images carry a noise floor over the whole field of view, brain-extracted or converted ones often
    a zero background. Without the head mask the noise made every voxel foreground: the window moved off the head
    (centred on the field of view) and the background entered the z-score (the MNI template: brain age 70.3 vs
    67.6 y, MoME lesion volume +7 to +31 %). With it both reach the model as the same arrays, up to the noise."""
    g = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in (40, 44, 36)], indexing="ij"))
    r = np.sqrt(((g / np.array([16, 18, 14])[:, None, None, None]) ** 2).sum(0))
    head = np.where(r < 1, np.where(r < 0.4, 30.0, 100.0 - 20 * r), 0.0)
    head = np.pad(head, ((0, 0), (0, 14), (0, 12)))  # the head low and posterior in a larger field of view
    rng = np.random.default_rng(0)
    noisy = np.hypot(head + rng.normal(0, 2, head.shape), rng.normal(0, 2, head.shape))  # Rician floor, 2 %
    # 8 %: above a third of it passed 10 % of the peak and joined the head, over the whole field of view
    noisier = np.hypot(head + rng.normal(0, 8, head.shape), rng.normal(0, 8, head.shape))
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, data in (("clean", head), ("noisy", noisy), ("noisier", noisier)):
        nib.save(nib.Nifti1Image(data.astype(np.float32), aff), tmp_path / f"{name}.nii.gz")
    for head_mask in (True, False):
        spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=(40, 40, 36), head_mask=head_mask, antialias=False)
        a, b, c = (preprocess_image(load_nifti(tmp_path / f"{n}.nii.gz"), spec) for n in ("clean", "noisy", "noisier"))
        same = np.allclose(a.affine, b.affine) and np.abs(a.data - b.data).mean() < 0.05
        assert same == head_mask
        if head_mask:
            np.testing.assert_array_equal(a.data == 0, b.data == 0)  # the noise outside the head is background
            # the same window up to a voxel (a speck on the surface can still stretch the box), the same head
            assert np.abs(a.affine - c.affine).max() <= 2.0
            assert abs(np.count_nonzero(c.data) / np.count_nonzero(a.data) - 1) < 0.05


def test_each_image_is_antialiased_on_its_own_grid(tmp_path):
    """One blur from the reference's voxel size went to every role: a 3 mm T1 beside a 1.5 mm FLAIR reference
    was blurred as if it were 1.5 mm (lesion volume 13 % off), and a finer non-reference image aliased."""
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])
    t1 = load_nifti(_brain(tmp_path / "t1.nii.gz", coarse, shape=(20, 22, 18)))
    fine = coarse @ np.diag([0.5, 0.5, 0.5, 1.0])
    fine[:3, 3] -= 0.75  # the 1.5 mm grid's voxel centres tile the same field of view
    data = resample_to_grid(t1.data, coarse, (40, 44, 36), fine)
    nib.save(nib.Nifti1Image(data, fine), tmp_path / "flair.nii.gz")
    flair = load_nifti(tmp_path / "flair.nii.gz")
    spec = PreprocSpec(spacing=(3.0, 3.0, 3.0), shape=None, crop_foreground=False)  # the blur moves the box
    with_aa = preprocess_image({"flair": flair, "t1": t1}, spec)
    without = preprocess_image({"flair": flair, "t1": t1}, replace(spec, antialias=False))
    # the T1 is already at the target resolution: no blur for it, whichever image is the reference
    np.testing.assert_allclose(with_aa.data[1], without.data[1], atol=1e-5)
    # the finer FLAIR still is blurred to the target resolution when it is not the reference
    t1_ref = preprocess_image({"t1": t1, "flair": flair}, spec)
    t1_ref_raw = preprocess_image({"t1": t1, "flair": flair}, replace(spec, antialias=False))
    assert not np.allclose(t1_ref.data[1], t1_ref_raw.data[1], atol=1e-3)


def test_one_hot_voxel_does_not_make_the_brain_background(tmp_path):
    """The background threshold was relative to the maximum: one voxel at 1e6 on a brain of ~100 made every
    brain voxel background (rank output all zero)."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.asarray(nib.load(_brain(tmp_path / "t1.nii.gz", aff, shape=(24, 24, 24))).dataobj)
    data[12, 12, 12] = 1e6
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "hot.nii.gz")
    spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=None, norm="rank", antialias=False, crop_foreground=False)
    clean = preprocess_image(load_nifti(tmp_path / "t1.nii.gz"), spec).data
    hot = preprocess_image(load_nifti(tmp_path / "hot.nii.gz"), spec).data
    assert np.count_nonzero(hot) == np.count_nonzero(clean) > 1000


def test_registered_images_off_the_reference_grid_are_blurred_in_the_registered_world(monkeypatch):
    """With register=true the reference was blurred for its registered voxel size and another role for its
    native one: the same data on a grid 0.01 mm away, under a registration that scales by 1.25, came out
    24 intensity units apart (the reference blurred, the other not)."""
    import neuromoe.data.registration as reg
    from neuromoe.io.nifti import Image

    rng = np.random.default_rng(0)
    data = np.zeros((48, 48, 48), np.float32)
    data[8:40, 8:40, 8:40] = 100 + 20 * rng.standard_normal((32, 32, 32))
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = -24
    moved = aff.copy()
    moved[:3, 3] += 0.01
    monkeypatch.setattr(reg, "register_to_mni", lambda img, **k: np.diag([1.25, 1.25, 1.25, 1.0]) @ img.affine)
    ornt = np.array([[0, 1], [1, 1], [2, 1]])
    t1, flair = Image(data, aff, aff, data.shape, ornt), Image(data.copy(), moved, moved, data.shape, ornt)
    spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), register=True, norm="none", crop_foreground=False)
    a, b = preprocess_image({"t1": t1, "flair": flair}, spec).data
    assert float(np.abs(a - b).max()) < 2.0


def test_an_unwritable_cache_is_said_once_and_inference_goes_on(tmp_path, capsys):
    """A read-only home (an inference container) must not fail predict, nor blame the scans."""
    spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=(12, 12, 12))
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")  # a file where the cache folder would go: unwritable even for root
    cache = PreprocCache(blocker / "cache")
    a = preprocess_case({"t1": str(_brain(tmp_path / "a.nii.gz", np.eye(4)))}, spec, cache)
    b = preprocess_case({"t1": str(_brain(tmp_path / "b.nii.gz", np.eye(4), seed=1))}, spec, cache)
    ref = preprocess_case({"t1": str(tmp_path / "a.nii.gz")}, spec)
    np.testing.assert_array_equal(a["t1"], ref["t1"])
    assert b["t1"].shape == (12, 12, 12) and not cache.usable
    again = PreprocCache(blocker / "cache")  # a command opens its cache more than once: still said once
    preprocess_case({"t1": str(tmp_path / "a.nii.gz")}, spec, again)
    err = capsys.readouterr().err
    assert err.count("cannot write the preprocessing cache") == 1 and "--cache" in err
    with pytest.raises(InputError, match=r"cannot write the preprocessing cache.*--out"):
        preprocess_case({"t1": str(tmp_path / "a.nii.gz")}, spec, PreprocCache(blocker / "c", required=True))


def test_a_cache_folder_that_cannot_be_searched_is_skipped(tmp_path, monkeypatch, capsys):
    """Path.exists() raises PermissionError on a folder the user may not search (HOME=/root, mode 700, in a
    container run as another user): every scan was skipped as 'Permission denied'."""
    from pathlib import Path

    spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=(12, 12, 12))
    root = tmp_path / "locked"
    real = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, **kw: (_ for _ in ()).throw(PermissionError(13, "Permission "
                        "denied")) if root in self.parents else real(self, **kw))
    out = preprocess_case({"t1": str(_brain(tmp_path / "a.nii.gz", np.eye(4)))}, spec, PreprocCache(root))
    assert out["t1"].shape == (12, 12, 12)
    assert "cannot read the preprocessing cache (Permission denied)" in capsys.readouterr().err


def test_preprocess_into_an_unwritable_folder_is_one_error_before_any_row(tmp_path):
    t1 = _brain(tmp_path / "t1.nii.gz", np.eye(4))
    (tmp_path / "f").write_text("x")
    table = pd.DataFrame({"subject": ["a"], "t1": [str(t1)]})
    with pytest.raises(InputError, match="cannot write the output folder"):
        preprocess_cohort(table, PreprocSpec(), tmp_path / "f" / "cache")


def test_the_memory_budget_follows_the_jobs_cgroup_limit_and_torchruns_processes(tmp_path, monkeypatch) -> None:
    """A SLURM job's --mem is the limit of its own nested cgroup (named in /proc/self/cgroup), which the node's free
    memory and the root cgroup know nothing of; page cache the job can reclaim counts as free; torchrun's
    processes on the machine share the budget."""
    from neuromoe.data import preprocess

    gib = 2.0**30
    job = tmp_path / "cg" / "system.slice" / "slurm" / "job_7"
    (job / "step_0").mkdir(parents=True)
    (job / "memory.max").write_text(f"{int(8 * gib)}\n")
    (job / "memory.current").write_text(f"{int(6 * gib)}\n")
    (job / "memory.stat").write_text(f"anon 100\ninactive_file {int(1 * gib)}\n")
    (job / "step_0" / "memory.max").write_text("max\n")  # the step itself unlimited: the job's limit binds
    (job / "step_0" / "memory.current").write_text(f"{int(5 * gib)}\n")
    (tmp_path / "cgroup").write_text("0::/system.slice/slurm/job_7/step_0\n")
    left = preprocess.cgroup_memory_left(str(tmp_path / "cgroup"), str(tmp_path / "cg"))
    assert left == 3 * gib  # 8 − (6 − 1 reclaimable)
    v1 = tmp_path / "v1" / "memory" / "slurm" / "uid_0" / "job_9"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{int(4 * gib)}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{int(1 * gib)}\n")
    (tmp_path / "cgroup_v1").write_text("9:cpu,cpuacct:/slurm/uid_0/job_9\n5:memory:/slurm/uid_0/job_9\n")
    assert preprocess.cgroup_memory_left(str(tmp_path / "cgroup_v1"), str(tmp_path / "v1")) == 3 * gib
    assert preprocess.cgroup_memory_left(str(tmp_path / "absent"), str(tmp_path / "cg")) == float("inf")
    monkeypatch.setattr(preprocess, "cgroup_memory_left", lambda: 2 * gib)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert preprocess.available_memory() <= 2 * gib and preprocess.memory_budget() <= 2 * gib / 16


@pytest.mark.parametrize("pad", [1, 3])
def test_a_wider_field_of_view_of_the_same_head_gives_the_same_arrays(tmp_path, pad):
    """The output grid was anchored at the input's first voxel, so padding a scan moved the grid's phase: the same
    head padded by 3, 6 or 9 mm was sampled elsewhere (mean |Δ| 0.12 z here) and DenseFormer's brain age moved by
    1.6-3 years. Voxel centres at whole multiples of the spacing in world coordinates sample the same points."""
    img = _mni()
    data = np.asarray(img.dataobj)
    padded = np.pad(data, ((pad, 0), (pad, 0), (0, pad)))
    aff = img.affine.copy()
    aff[:3, 3] -= img.affine[:3, :3] @ np.array([pad, pad, 0])
    nib.save(img, tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(padded, aff), tmp_path / "b.nii.gz")
    spec = PreprocSpec(spacing=(4.0, 4.0, 4.0), shape=(48, 48, 48))
    a, b = (preprocess_image(load_nifti(tmp_path / n), spec) for n in ("a.nii.gz", "b.nii.gz"))
    np.testing.assert_allclose(a.affine, b.affine)
    np.testing.assert_array_equal(a.data, b.data)
    assert np.allclose(a.affine[:3, 3] / 4.0, np.round(a.affine[:3, 3] / 4.0))  # centres on the world lattice
