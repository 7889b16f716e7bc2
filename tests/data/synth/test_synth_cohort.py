"""Layout, determinism, lesion masks and effect directions of the synthetic cohort (6 mm grid)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuromoe.data.synth import quicklook, synth_cohort
from neuromoe.data.synth.anatomy import load_anatomy
from neuromoe.data.synth.cohort import FMRI_COLS, LESION_COLS, STRUCT_COLS
from neuromoe.data.synth.lesions import DATASETS
from neuromoe.errors import InputError

KW = dict(n_structural=6, n_lesion=5, n_fmri=4, spacing=6.0, n_rois=24, progress=False, n_timepoints=60)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c")
    synth_cohort(out, **KW)
    return out


def _rows(p: Path) -> list[dict]:
    with p.open() as f:
        return list(csv.DictReader(f))


def test_layout_and_columns(cohort: Path) -> None:
    for name, cols in (("structural", STRUCT_COLS), ("lesion", LESION_COLS), ("fmri", FMRI_COLS)):
        rows = _rows(cohort / "manifests" / f"{name}.csv")
        assert list(rows[0]) == cols
        assert {r["split"] for r in rows} <= {"train", "val", "test"}
    s = _rows(cohort / "manifests" / "structural.csv")
    assert {r["sex"] for r in s} <= {"F", "M"} and {r["cohort"] for r in s} <= {"ukb", "adni", "ppmi"}
    assert {r["dx_ad"] for r in s} <= {"", "CN", "MCI", "AD"} and {r["dx_pd"] for r in s} <= {"", "HC", "PD"}
    f = _rows(cohort / "manifests" / "fmri.csv")
    assert {r["cohort"] for r in f} == {"pretrain", "downstream"}
    assert all(r["phenotype"] in ("control", "patient") for r in f if r["cohort"] == "downstream")
    ts = np.load(cohort / "manifests" / f[0]["timeseries"])
    assert ts.shape == (60, 24) and ts.dtype == np.float32
    gt = json.loads((cohort / "ground_truth.json").read_text())
    assert gt["fmri"]["informative_state"] == "wm" and gt["fmri"]["patient_edges"]
    assert (cohort / "participants.tsv").exists() and (cohort / "atlas" / "rois.tsv").exists()


def test_lesion_masks_and_modalities(cohort: Path) -> None:
    anat = load_anatomy(6.0)
    for r in _rows(cohort / "manifests" / "lesion.csv"):
        mask = nib.load(cohort / "manifests" / r["mask"])
        m = np.asarray(mask.dataobj) > 0
        assert m.sum() > 0 and np.allclose(mask.affine, anat.affine)
        # a warp moves the brain slightly; the mask must still lie (almost) inside a dilated brain
        assert (m & ~anat.brain).sum() <= 0.2 * m.sum()
        have = {k for k in ("t1", "t1c", "t2", "flair", "dwi") if r[k]}
        assert have == set(DATASETS[r["lesion_type"]][1])
        for k in have:
            assert nib.load(cohort / "manifests" / r[k]).shape == m.shape


def test_deterministic_in_any_number_of_processes(tmp_path: Path, cohort: Path) -> None:
    synth_cohort(tmp_path, **KW, workers=2)
    for p in ("manifests/structural.csv", "manifests/lesion.csv", "manifests/fmri.csv", "ground_truth.json",
              "participants.tsv"):
        assert (tmp_path / p).read_bytes() == (cohort / p).read_bytes()
    images = sorted(p.relative_to(cohort) for p in cohort.rglob("*.nii.gz"))
    assert images == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.nii.gz"))
    for rel in images:
        a = np.asarray(nib.load(cohort / rel).dataobj)
        assert np.array_equal(a, np.asarray(nib.load(tmp_path / rel).dataobj)), rel


def test_modalities_restricted(tmp_path: Path) -> None:
    synth_cohort(tmp_path, **{**KW, "kinds": ("lesion",), "modalities": ("t1", "flair")})
    for r in _rows(tmp_path / "manifests" / "lesion.csv"):
        assert not (r["t1c"] or r["t2"] or r["dwi"])
    with pytest.raises(InputError):
        synth_cohort(tmp_path, **{**KW, "modalities": ("pet",)})


def test_quicklook_png(cohort: Path, tmp_path: Path) -> None:
    png = quicklook(cohort, tmp_path / "q.png", n=1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_effect_directions() -> None:
    from neuromoe.data.synth import fmri as fm
    from neuromoe.data.synth.structural import MEDIAL_TEMPORAL, region_union, synth_t1

    anat = load_anatomy(6.0)
    mtl = region_union(anat, MEDIAL_TEMPORAL) > 0.5

    def mtl_mean(dx: str, i: int) -> float:
        img = synth_t1(anat, np.random.default_rng(i), age=70, sex="F", dx_ad=dx, dx_pd="", site="site-A")
        return float(img[mtl].mean())

    assert np.mean([mtl_mean("AD", i) for i in range(3)]) < np.mean([mtl_mean("CN", i) for i in range(3)])
    d = fm.design(40, 0)
    i, j = d["patient_edges"][0]

    def edge(state: str, patient: bool) -> float:
        vals = []
        for s in range(6):
            ts = fm.synth_timeseries(d, np.random.default_rng(s), state=state, patient=patient, sex="F", age=40,
                                     n_t=150, tr=2.0, site_noise=0.3)
            vals.append(np.corrcoef(ts[:, i], ts[:, j])[0, 1])
        return float(np.mean(vals))

    assert edge("wm", True) - edge("wm", False) > 0.15
    assert abs(edge("rest", True) - edge("rest", False)) < 0.1


def test_adding_fmri_subjects_keeps_the_earlier_ones(tmp_path: Path) -> None:
    """Pretrain/downstream and patient/control were assigned by halves of ``n_fmri``: a larger cohort moved
    earlier subjects between cohorts, flipped their phenotype and changed their scans."""
    kw = {**KW, "kinds": ("fmri",)}
    small, large = tmp_path / "small", tmp_path / "large"
    synth_cohort(small, **{**kw, "n_fmri": 4})
    synth_cohort(large, **{**kw, "n_fmri": 6})
    a = _rows(small / "manifests" / "fmri.csv")
    b = [r for r in _rows(large / "manifests" / "fmri.csv") if r["subject"] in {r["subject"] for r in a}]
    cols = ("subject", "state", "cohort", "phenotype", "sex", "age", "site", "timeseries")
    assert [tuple(r[c] for c in cols) for r in a] == [tuple(r[c] for c in cols) for r in b]
    assert {r["cohort"] for r in a} == {"pretrain", "downstream"}
    for r in a:
        np.testing.assert_array_equal(np.load(small / "manifests" / r["timeseries"]),
                                      np.load(large / "manifests" / r["timeseries"]))


@pytest.mark.parametrize("spacing", [1.0, 1.5, 2.0, 3.0])
def test_bold_rois_are_6mm_spheres_at_any_spacing(spacing: float) -> None:
    """The ROI window was ±3 voxels: below 2 mm the promised 6 mm sphere was clipped to a cube."""
    from neuromoe.data.synth.anatomy import Anatomy
    from neuromoe.data.synth.cohort import bold_image

    n = int(40 / spacing) + 1
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -20.0
    z = np.zeros((n, n, n), np.float32)
    anat = Anatomy(aff, z, z, z, z, np.ones((n, n, n), bool))
    vol = bold_image(anat, np.zeros((1, 3)), np.full((1, 1), 1000.0, np.float32), np.random.default_rng(0))
    roi = vol[..., 0] > 5000  # signal 10·1000 above a baseline of 100 ± 5 noise
    sphere = sum(x**2 for x in anat.mm_grid()) <= 36.0
    assert sphere.sum() > 20 and np.array_equal(roi, sphere)


def test_regenerating_into_a_cohort_folder_leaves_no_stale_subjects(tmp_path: Path) -> None:
    """A smaller cohort written over a larger one left the larger one's subject folders, which a BIDS reader
    of the folder then picked up; a folder that synth did not write is refused, not mixed into."""
    from neuromoe.io.table import load_table

    out = tmp_path / "c"
    synth_cohort(out, **{**KW, "n_structural": 6})
    synth_cohort(out, **{**KW, "n_structural": 3})
    gt = json.loads((out / "ground_truth.json").read_text())["subjects"]
    on_disk = {p.name for p in out.glob("sub-*")} | {p.name for p in (out / "derivatives" / "lesions").glob("sub-*")}
    assert on_disk == set(gt) and len(gt) == 3 + 5 + 4
    assert set(load_table(out)["subject"]) == set(gt)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        synth_cohort(user, **KW)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_small_cohorts_get_every_split_and_big_ones_keep_theirs(cohort: Path) -> None:
    """6 structural subjects over 7 strata (each under 3) used to be all 'train', so the documented train /
    evaluate commands failed; now every kind of 3 or more has train, val and test."""
    from neuromoe.data.splits import stratified_split

    for name in ("structural", "lesion", "fmri"):
        assert {r["split"] for r in _rows(cohort / "manifests" / f"{name}.csv")} == {"train", "val", "test"}
    for n in (3, 4, 12):
        split = stratified_split([f"s{i % 7}" for i in range(n)], seed=1)
        assert {"train", "val", "test"} <= set(split) and split.count("train") >= 1
    assert stratified_split(["a", "b"], seed=0) == ["train", "train"]
    # strata of 3+ are split as before (70/15/15 per stratum); the top-up never runs there
    big = stratified_split([f"s{i % 5}" for i in range(150)], seed=0)
    assert (big.count("train"), big.count("val"), big.count("test")) == (110, 20, 20)


def test_participants_tsv_carries_the_manifests_labels(cohort: Path) -> None:
    """The cohort read as a BIDS root has the manifests' subject labels (it had only kind/age/sex)."""
    from neuromoe.io.table import load_table

    table = load_table(cohort)
    struct = {r["subject"]: r for r in _rows(cohort / "manifests" / "structural.csv")}
    fmri = {r["subject"]: r for r in _rows(cohort / "manifests" / "fmri.csv")}
    for _, row in table.iterrows():
        want = struct.get(row["subject"]) or fmri.get(row["subject"])
        if want is None:
            continue  # a lesion case
        for col in ("dx_ad", "dx_pd", "phenotype", "site", "split"):
            if col in want:
                assert (want[col] or None) == (None if row[col] != row[col] else row[col]), (row["subject"], col)
    lesion = _rows(cohort / "manifests" / "lesion.csv")[0]
    assert table.set_index("subject").loc[lesion["subject"], "lesion_type"] == lesion["lesion_type"]


def test_a_stratum_of_three_gives_one_subject_to_val_and_to_test() -> None:
    """round(0.15 · 3) = 0 kept a 3-subject diagnosis class out of val and test (AD-vs-CN unscorable)."""
    from neuromoe.data.splits import stratified_split

    split = stratified_split(["AD"] * 3 + ["CN"] * 20, seed=0)
    assert sorted(split[:3]) == ["test", "train", "val"]


@pytest.mark.parametrize("n_rois", [8, 24, 264])
def test_sex_edges_are_disjoint_sorted_pairs(n_rois: int) -> None:
    """Drawn with replacement, sex pairs shared ROIs (4 × the same pair at 8 ROIs), stacking the drive the docs
    call weaker than the patient's and correlating pairs the ground truth did not list."""
    from neuromoe.data.synth import fmri

    for seed in range(6):
        edges = fmri.design(n_rois, seed)["sex_edges"]
        rois = [r for e in edges for r in e]
        assert edges and len(set(rois)) == len(rois) and all(i < j for i, j in edges)


def test_bad_arguments_are_refused_before_the_folder_is_touched(tmp_path: Path) -> None:
    out = tmp_path / "c"
    for kw in ({"seed": -1}, {"n_rois": 3}, {"n_lesion": -2}):
        with pytest.raises(InputError):
            synth_cohort(out, **{**KW, **kw})
        assert not out.exists()


def test_lesion_cases_carry_their_site_effects() -> None:
    """The lesion manifest's site column used to be a label only (every case got the same bias and noise)."""
    from neuromoe.data.synth.lesions import synth_lesion_case

    anat = load_anatomy(6.0)
    air = ~anat.brain & (anat.t1 < 0.05)
    noise = {}
    for site in ("site-A", "site-B"):
        images, _ = synth_lesion_case(anat, np.random.default_rng(0), "wmh", ("t1", "flair"), site=site)
        noise[site] = float(np.mean(images["flair"][air]))
    assert noise["site-B"] > 1.5 * noise["site-A"]  # Rician noise floor 0.04 vs 0.02


def test_ground_truth_records_sites_and_sex(cohort: Path) -> None:
    truth = json.loads((cohort / "ground_truth.json").read_text())
    assert set(truth["sites"]) == {"site-A", "site-B", "site-C"}
    rows = {r["subject"]: r for name in ("structural", "lesion") for r in _rows(cohort / "manifests" / f"{name}.csv")}
    for sub, r in rows.items():
        assert truth["subjects"][sub]["site"] == r["site"]
        if "sex" in r:
            assert truth["subjects"][sub]["sex"] == r["sex"]


def test_the_band_age_thins_holds_the_same_grey_matter_at_any_spacing() -> None:
    """A whole number of erosions made the band 8 mm deep at 2 mm voxels and 9 mm at 3 mm: the same subjects
    rendered at 2 mm had 7 % less grey matter to lose with age and read 4.2 y younger."""
    from neuromoe.data.synth.structural import cortex_band

    def grey_ml(spacing: float) -> float:
        anat = load_anatomy(spacing)
        return float((anat.gm * cortex_band(anat)).sum()) * spacing**3 / 1000.0

    ml = {s: grey_ml(s) for s in (1.5, 2.0, 3.0)}
    assert 300 < ml[3.0] < 400, ml
    assert max(ml.values()) / min(ml.values()) < 1.03, ml


def test_lesion_placement_regions_hold_the_same_volume_at_any_spacing() -> None:
    """Whole erosions and dilations of the cohort's own voxels made the deep white matter 128 mL at 1.5 mm and
    231 mL at 3 mm, and the periventricular band 111 and 100 mL: where lesions sat depended on the voxel size."""
    from neuromoe.data.synth.lesions import placement_regions

    ml = {s: {k: float(m.sum()) * s**3 / 1000.0 for k, m in placement_regions(load_anatomy(s)).items()}
          for s in (1.5, 2.0, 3.0)}
    for region in ("wm_deep", "periventricular", "deep_cortex"):
        vals = [ml[s][region] for s in ml]
        assert min(vals) > 50 and max(vals) / min(vals) < 1.1, (region, ml)


def _centroid(img: np.ndarray) -> np.ndarray:
    w = np.where(img > 0.5 * img.max(), img, 0.0)
    return np.array([(w * g).sum() / w.sum() for g in np.indices(img.shape)])


def test_a_head_pose_moves_each_head_and_leaves_the_rest_of_the_cohort(tmp_path: Path) -> None:
    """``pose_deg`` / ``shift_mm`` put heads where a scanner would (all lay in the template's pose): the images and the
    lesion mask move together by the recorded rotation and shift, the affine and every label stay as drawn without."""
    kw = dict(KW, n_fmri=0, n_structural=3, n_lesion=2, kinds=("structural", "lesion"))
    synth_cohort(tmp_path / "a", **kw)
    synth_cohort(tmp_path / "b", **kw, pose_deg=8.0, shift_mm=10.0)
    for name in ("structural", "lesion"):
        assert _rows(tmp_path / "a" / "manifests" / f"{name}.csv") == _rows(tmp_path / "b" / "manifests" / f"{name}.csv")
    truth = json.loads((tmp_path / "b" / "ground_truth.json").read_text())
    assert truth["pose"] == {"deg": 8.0, "shift_mm": 10.0}
    assert "pose_rotation" not in json.dumps(json.loads((tmp_path / "a" / "ground_truth.json").read_text()))
    moved = 0.0
    for r in _rows(tmp_path / "a" / "manifests" / "lesion.csv"):
        t = truth["subjects"][r["subject"]]
        rot, shift = np.array(t["pose_rotation"]), np.array(t["pose_shift_mm"]) / 6.0
        assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-5)
        for col in ("mask", *(m for m in ("t1", "flair", "dwi") if r[m])):
            a, b = (nib.load(tmp_path / c / "manifests" / r[col]) for c in ("a", "b"))
            assert np.allclose(a.affine, b.affine)
            x, y = np.asarray(a.dataobj, np.float32), np.asarray(b.dataobj, np.float32)
            c = (np.array(x.shape) - 1) / 2
            expected = rot @ (_centroid(x) - c) + c + shift
            assert np.linalg.norm(_centroid(y) - expected) < 0.75, col  # voxels of 6 mm
            moved = max(moved, float(np.linalg.norm(_centroid(y) - _centroid(x))))
    assert moved > 1.0
    for r in _rows(tmp_path / "a" / "manifests" / "structural.csv"):
        a, b = (np.asarray(nib.load(tmp_path / c / "manifests" / r["t1"]).dataobj) for c in ("a", "b"))
        assert not np.allclose(a, b) and abs(np.sum(a > 0.3) / np.sum(b > 0.3) - 1) < 0.1  # the same head, moved


def test_a_pose_spread_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--pose-deg -1 is not between 0 and 45°"):
        synth_cohort(tmp_path / "c", **KW, pose_deg=-1)
    with pytest.raises(InputError, match="--shift-mm nan"):
        synth_cohort(tmp_path / "c", **KW, shift_mm=float("nan"))
    assert not (tmp_path / "c").exists()
