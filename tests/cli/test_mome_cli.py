"""``neuromoe segment``: masks on the exact input grid for real-header inputs, clean failures, batch mode."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, ornt_transform

from neuromoe.cli.main import main
from neuromoe.data.preprocess import PreprocSpec
from neuromoe.engine.precision import resolve_precision
from neuromoe.models import create_model
from neuromoe.models.registry import save_model

MODS = ["t1", "t2", "flair"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """An untrained tiny MoME saved like 'train' does (geometry, not accuracy, is under test)."""
    torch.manual_seed(0)
    model = create_model("mome_tiny", modalities=MODS)
    spec = PreprocSpec(spacing=(6.0, 6.0, 6.0), shape=(16, 24, 16))
    out = tmp_path_factory.mktemp("model") / "model"
    extra = {
        "kind": "mome",
        "modalities": MODS,
        "patch_size": [16, 16, 16],
        "multimodal": False,
        "threshold": 0.5,
    }
    save_model(model, out, {"family": "mome", "preprocessing": spec.to_dict(), "extra": extra})
    return str(out)


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot


def _lps_oblique(img: nib.Nifti1Image, path, deg: float = 12.0) -> str:
    """Reorient to LPS and give the result an oblique (rotated) affine, as scanners write them."""
    now = nib.orientations.io_orientation(img.affine)
    lps = img.as_reoriented(ornt_transform(now, axcodes2ornt(("L", "P", "S"))))
    data = np.asarray(lps.dataobj, dtype=np.float32)
    out = nib.Nifti1Image(data, _rotation(deg) @ lps.affine)
    nib.save(out, str(path))
    return str(path)


@pytest.fixture(scope="module")
def anatomical(tmp_path_factory) -> str:
    from nibabel.testing import data_path

    img = nib.load(os.path.join(data_path, "anatomical.nii"))
    return _lps_oblique(img, tmp_path_factory.mktemp("in") / "anat_lps_oblique.nii.gz")


@pytest.fixture(scope="module")
def mni(tmp_path_factory) -> str:
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    return _lps_oblique(
        nib.Nifti1Image(img.get_fdata(), img.affine), tmp_path_factory.mktemp("in") / "mni.nii.gz"
    )


@pytest.fixture(scope="module")
def far(anatomical, tmp_path_factory) -> str:
    """The anatomical image moved 400 mm away: a FLAIR that is not co-registered with the T1."""
    img = nib.load(anatomical)
    aff = img.affine.copy()
    aff[:3, 3] += 400
    path = tmp_path_factory.mktemp("in") / "anat_far.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), aff), str(path))
    return str(path)


@pytest.fixture(scope="module")
def coarse(anatomical, tmp_path_factory) -> str:
    """The anatomical image on a 2× coarser grid in the same world space (co-registered, other resolution)."""
    img = nib.load(anatomical)
    aff = img.affine.copy()
    aff[:3, :3] *= 2
    path = tmp_path_factory.mktemp("in") / "anat_coarse.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32)[::2, ::2, ::2], aff), str(path))
    return str(path)


@pytest.mark.parametrize("which", ["anatomical", "mni"])
def test_segment_writes_mask_on_the_exact_input_grid(
    which, model_dir, anatomical, mni, tmp_path, capsys
) -> None:
    src = {"anatomical": anatomical, "mni": mni}[which]
    out = tmp_path / "mask.nii.gz"
    rc = main(
        [
            "segment",
            "--model",
            model_dir,
            "--t1",
            src,
            "--flair",
            src,
            "--output",
            str(out),
            "--probabilities",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    ref, mask = nib.load(src), nib.load(str(out))
    assert mask.shape == ref.shape
    np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-6)
    assert nib.aff2axcodes(mask.affine) == ("L", "P", "S")
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    prob = nib.load(str(tmp_path / "mask_prob.nii.gz"))
    assert prob.shape == ref.shape and 0.0 <= prob.get_fdata().min() <= prob.get_fdata().max() <= 1.0
    import json

    side = json.loads((tmp_path / "mask.json").read_text())
    assert side["shape"] == list(ref.shape)
    voxel_ml = abs(np.linalg.det(ref.affine[:3, :3])) / 1000
    assert side["lesion_volume_ml"] == pytest.approx(np.asarray(mask.dataobj).sum() * voxel_ml, rel=1e-3)
    assert set(side["gate_share"]) == set(MODS) and sum(side["gate_share"].values()) == pytest.approx(
        1, abs=1e-3
    )
    assert side["n_components"] >= 0


def _segment_pair(model_dir: str, t1: str, flair: str, out) -> int:
    return main(["segment", "--model", model_dir, "--t1", t1, "--flair", flair, "--output", str(out),
                 "--device", "cpu"])


def test_not_coregistered_modalities_exit_2_with_one_line_and_no_output(
    model_dir, anatomical, far, tmp_path, capsys
) -> None:
    rc = _segment_pair(model_dir, anatomical, far, tmp_path / "mask.nii.gz")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "anat_far.nii.gz" in err and "co-register" in err
    assert not any(tmp_path.iterdir())


def test_coregistered_modality_on_another_grid_is_resampled(
    model_dir, anatomical, coarse, tmp_path, capsys
) -> None:
    out = tmp_path / "mask.nii.gz"
    assert _segment_pair(model_dir, anatomical, coarse, out) == 0, capsys.readouterr().err
    ref, mask = nib.load(anatomical), nib.load(str(out))
    assert mask.shape == ref.shape
    np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-6)


def test_an_output_that_is_an_input_is_refused_and_the_scan_left_intact(
    model_dir, anatomical, tmp_path, capsys
) -> None:
    t1 = tmp_path / "t1.nii.gz"
    t1.write_bytes(Path(anatomical).read_bytes())
    (tmp_path / "link.nii.gz").symlink_to(t1)
    before = t1.read_bytes()
    for out in (t1, tmp_path / "link.nii.gz"):
        assert _segment_pair(model_dir, str(t1), anatomical, out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "overwrite the input" in err
    assert t1.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["link.nii.gz", "t1.nii.gz"]


def test_unknown_modality_and_missing_inputs_are_clean_errors(
    model_dir, anatomical, tmp_path, capsys
) -> None:
    rc = main(["segment", "--model", model_dir, "--dwi", anatomical, "--output", str(tmp_path / "m.nii.gz")])
    assert rc == 2 and "dwi" in capsys.readouterr().err
    rc = main(["segment", "--model", model_dir, "--output", str(tmp_path / "m.nii.gz")])
    assert rc == 2 and "--input" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_modality_given_twice_is_refused(model_dir, anatomical, tmp_path, capsys) -> None:
    """argparse kept the last --flair and dropped the first without a word (the second need not even be
    co-registered with the rest)."""
    out = tmp_path / "m.nii.gz"
    with pytest.raises(SystemExit) as info:
        main(["segment", "--model", model_dir, "--flair", anatomical, "--t1", anatomical, "--flair", "other.nii.gz",
              "--output", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--flair given twice" in err and "other.nii.gz" in err and not out.exists()


def test_single_corrupt_file_exit_2_names_it_and_writes_nothing(model_dir, anatomical, tmp_path, capsys) -> None:
    """One scan given directly (not a manifest): a truncated gzip gets its own one-line error."""
    bad = tmp_path / "in" / "truncated_T1w.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(gzip.compress(Path(anatomical).read_bytes())[:2000])
    out = tmp_path / "out" / "mask.nii.gz"
    rc = main(["segment", "--model", model_dir, "--t1", str(bad), "--output", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "truncated_T1w.nii.gz" in err and "fix:" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_batch_mode_finishes_good_cases_and_lists_failures(
    model_dir, anatomical, mni, far, tmp_path, capsys
) -> None:
    manifest = tmp_path / "cases.csv"
    manifest.write_text(
        "subject,t1,flair\n"
        f"good1,{anatomical},{anatomical}\n"
        f"bad,{anatomical},{far}\n"
        f"good2,{mni},\n"
        f"missing,{tmp_path / 'nope.nii.gz'},\n"
    )
    out = tmp_path / "masks"
    rc = main(
        ["segment", "--model", model_dir, "--input", str(manifest), "--output", str(out), "--device", "cpu"]
    )
    assert rc == 1
    assert (out / "good1_mask.nii.gz").is_file() and (out / "good2_mask.nii.gz").is_file()
    assert nib.load(str(out / "good2_mask.nii.gz")).shape == nib.load(mni).shape
    assert not (out / "bad_mask.nii.gz").exists() and not (out / "missing_mask.nii.gz").exists()
    failures = (out / "failures.csv").read_text()
    assert "bad" in failures and "missing" in failures
    assert "2 failed" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["pretrain", "train-experts", "train", "evaluate", "segment"])
def test_help_has_an_example(verb, capsys) -> None:
    argv = [verb, "--help"] if verb == "segment" else [verb, "--family", "mome", "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "example" in capsys.readouterr().out


def test_segment_precision_flag_overrides_the_stored_one(model_dir, anatomical, tmp_path) -> None:
    import json

    out = tmp_path / "bf16.nii.gz"
    argv = ["segment", "--model", model_dir, "--t1", anatomical, "--output", str(out), "--device", "cpu"]
    assert main([*argv, "--precision", "bf16"]) == 0
    side = json.loads((tmp_path / "bf16.json").read_text())
    # the sidecar records what ran: bf16 where the CPU computes it natively, fp32 elsewhere
    assert side["precision"] == resolve_precision("bf16", torch.device("cpu"))
    assert nib.load(str(out)).shape == nib.load(anatomical).shape
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--precision", "fp16"])
    assert exc.value.code == 2


def test_batch_mode_writes_one_mask_per_session_of_a_subject(
    model_dir, anatomical, mni, tmp_path, capsys
) -> None:
    """A BIDS folder with two sessions of one subject: each session gets its own mask and sidecar
    (``<subject>_mask.nii.gz`` made the second session silently overwrite the first one's). The sessions' func/
    scans are not cases (they used to be "failures" and made the batch exit 1)."""
    import json
    import shutil

    import pandas as pd

    inputs = {"ses-1": anatomical, "ses-2": mni}  # different shapes: each mask shows which scan it is of
    for ses, src in inputs.items():
        anat = tmp_path / "bids" / "sub-01" / ses / "anat"
        anat.mkdir(parents=True)
        shutil.copy(src, anat / f"sub-01_{ses}_T1w.nii.gz")
        (anat.parent / "func").mkdir()
        np.save(anat.parent / "func" / f"sub-01_{ses}_task-rest_timeseries.npy", np.zeros((20, 5), np.float32))
    out = tmp_path / "masks"
    rc = main(["segment", "--model", model_dir, "--input", str(tmp_path / "bids"), "--output", str(out),
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "segment.csv")
    names = list(table["mask"])
    assert len(set(names)) == 2 and sorted(p.name for p in out.glob("*_mask.nii.gz")) == sorted(names)
    assert sorted(table["session"]) == ["ses-1", "ses-2"]  # the table says which session each row is
    for name in names:
        (t1,) = json.loads((out / name.replace("_mask.nii.gz", "_mask.json")).read_text())["inputs"].values()
        (ses,) = [s for s in inputs if s in t1]
        assert ses in name and nib.load(str(out / name)).shape == nib.load(inputs[ses]).shape


def test_evaluate_without_seed_scores_the_split_the_model_was_trained_on(
    model_dir, tmp_path, capsys
) -> None:
    """A manifest without a ``split`` column: ``evaluate`` without ``--seed`` must re-draw the split with
    the seed stored with the model (``split_seed``), not the preset's 0, whose test case is one of this
    model's training cases; ``--seed`` still overrides it."""
    import json
    import shutil

    import pandas as pd

    from neuromoe.data.splits import assign_splits

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["extra"]["split_seed"] = 1
    (model / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    rows = []
    for i in range(6):
        mask = np.zeros((16, 24, 16), np.uint8)
        mask[6:10, 8:12, 6:9] = 1
        paths = {k: str(tmp_path / f"s{i}_{k}.nii.gz") for k in ("t1", "mask")}
        nib.save(nib.Nifti1Image((1 + 0.1 * rng.normal(size=mask.shape)).astype(np.float32), affine), paths["t1"])
        nib.save(nib.Nifti1Image(mask, affine), paths["mask"])
        rows.append({"subject": f"s{i}", **paths})
    table = pd.DataFrame(rows)
    table.to_csv(tmp_path / "lesion.csv", index=False)
    split = {s: assign_splits(table, seed=s) for s in (0, 1)}
    test = {s: set(table["subject"][split[s] == "test"]) for s in (0, 1)}
    assert test[0] and test[0] <= set(table["subject"][split[1] == "train"])
    argv = ["evaluate", "--family", "mome", "--model", str(model), "--data", str(tmp_path / "lesion.csv"),
            "--device", "cpu", "--cache", str(tmp_path / "cache"), "--set", "eval.n_overlays=0"]
    for extra, seed in (([], 1), (["--seed", "0"], 0)):
        out = tmp_path / f"ev{seed}"
        assert main([*argv, "--out", str(out), *extra]) == 0, capsys.readouterr().err
        assert set(pd.read_csv(out / "per_case.csv")["subject"]) == test[seed]


def test_segment_cache_is_used_and_gives_the_same_mask(model_dir, anatomical, coarse, tmp_path, monkeypatch) -> None:
    """segment --cache keeps the preprocessed inputs (it used to be accepted and ignored); a second run reads
    them back instead of preprocessing again and writes the identical mask."""
    import neuromoe.data.preprocess as prep

    cache = tmp_path / "cache"
    argv = ["segment", "--model", model_dir, "--t1", anatomical, "--flair", coarse, "--device", "cpu",
            "--cache", str(cache)]
    assert main([*argv, "--output", str(tmp_path / "a.nii.gz")]) == 0
    assert len(list(cache.glob("*.npy"))) == 1

    def no_preprocessing(*_a, **_k):
        raise AssertionError("preprocessed again despite the cache")

    monkeypatch.setattr(prep, "preprocess_image", no_preprocessing)
    assert main([*argv, "--output", str(tmp_path / "b.nii.gz")]) == 0
    a, b = (np.asarray(nib.load(str(tmp_path / f"{n}.nii.gz")).dataobj) for n in "ab")
    np.testing.assert_array_equal(a, b)


def test_batch_mode_survives_an_unforeseen_error_in_one_case(model_dir, anatomical, mni, tmp_path, monkeypatch,
                                                            capsys) -> None:
    """Only InputError was caught per case: e.g. an out-of-memory RuntimeError on one scan ended the whole batch
    with a traceback. Now that case is listed in failures.csv and the others finish (exit 1)."""
    import neuromoe.pipelines.mome as mome_pipe

    real, calls = mome_pipe.predict_volume, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(*a, **k)

    monkeypatch.setattr(mome_pipe, "predict_volume", flaky)
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"subject,t1\nfirst,{anatomical}\nsecond,{mni}\n")
    out = tmp_path / "masks"
    assert main(["segment", "--model", model_dir, "--input", str(manifest), "--output", str(out),
                 "--device", "cpu"]) == 1
    assert (out / "second_mask.nii.gz").is_file() and not (out / "first_mask.nii.gz").exists()
    assert "RuntimeError: DefaultCPUAllocator" in (out / "failures.csv").read_text()
    assert "1 failed" in capsys.readouterr().err


def test_segment_takes_a_bids_dwi_series_and_writes_a_3d_mask_on_its_grid(anatomical, tmp_path, capsys) -> None:
    """A 4-D DWI (b0 + three b=1000 directions, .bval beside it, as BIDS dwi/ holds it) is read as its trace
    image; the mask is one 3-D volume on the series' grid. Without the .bval: one line, exit 2, no mask."""
    torch.manual_seed(0)
    model = create_model("mome_tiny", modalities=["t1", "dwi"])
    spec = PreprocSpec(spacing=(6.0, 6.0, 6.0), shape=(16, 24, 16))
    model_dir = tmp_path / "model"
    extra = {"kind": "mome", "modalities": ["t1", "dwi"], "patch_size": [16, 16, 16], "multimodal": False,
             "threshold": 0.5}
    save_model(model, model_dir, {"family": "mome", "preprocessing": spec.to_dict(), "extra": extra})
    src = nib.load(anatomical)
    t1 = np.asarray(src.dataobj, np.float32)
    dwi = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([t1 * f for f in (2.0, 0.9, 1.0, 1.1)], -1), src.affine), str(dwi))
    (tmp_path / "sub-01_dwi.bval").write_text("0 1000 1000 1000\n")
    out = tmp_path / "mask.nii.gz"
    rc = main(["segment", "--model", str(model_dir), "--dwi", str(dwi), "--output", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    mask = nib.load(str(out))
    assert mask.shape == t1.shape
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-6)
    (tmp_path / "sub-01_dwi.bval").unlink()
    out2 = tmp_path / "mask2.nii.gz"
    rc = main(["segment", "--model", str(model_dir), "--dwi", str(dwi), "--output", str(out2), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "without a .bval file" in err and len(err.strip().splitlines()) == 1 and not out2.exists()


def test_a_late_unwritable_output_is_refused_before_inference_and_leaves_no_partial_set(
    model_dir, anatomical, tmp_path, capsys
) -> None:
    """The sidecar's name taken by a folder, or a parent that is a file: one line and exit 2 before any work;
    the mask and probability map used to be written, then a raw traceback came from the sidecar."""
    (tmp_path / "m.json").mkdir()
    argv = ["segment", "--model", model_dir, "--t1", anatomical, "--probabilities", "--device", "cpu"]
    assert main([*argv, "--output", str(tmp_path / "m.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "m.json" in err and "folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    (tmp_path / "file").write_text("x")
    assert main([*argv, "--output", str(tmp_path / "file" / "m.nii.gz")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_batch_ids_with_path_separators_fail_and_write_nothing_outside_the_output_folder(
    model_dir, anatomical, tmp_path, capsys
) -> None:
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"subject,t1\n{tmp_path / 'abs'},{anatomical}\nsite1/sub-1,{anatomical}\n"
                        f"../up,{anatomical}\nok,{anatomical}\nempty,\n")
    out = tmp_path / "masks"
    assert main(["segment", "--model", model_dir, "--input", str(manifest), "--output", str(out),
                 "--device", "cpu"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv", "masks"]
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv", "ok_mask.json", "ok_mask.nii.gz", "segment.csv"]
    failures = (out / "failures.csv").read_text()
    assert failures.count("path separator") == 3 and "has no image" in failures
    assert "4 failed" in capsys.readouterr().err


def test_batch_output_named_like_a_mask_file_is_refused(model_dir, anatomical, tmp_path, capsys) -> None:
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"subject,t1\nok,{anatomical}\n")
    assert main(["segment", "--model", model_dir, "--input", str(manifest), "--output",
                 str(tmp_path / "masks.nii.gz"), "--device", "cpu"]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "masks.nii.gz").exists()


def test_reference_puts_the_mask_on_the_chosen_modality_grid(model_dir, anatomical, coarse, tmp_path, capsys) -> None:
    """A clinical FLAIR on its own grid: ``--reference flair`` writes the mask there (default: the T1's)."""
    base = ["segment", "--model", model_dir, "--t1", anatomical, "--flair", coarse, "--device", "cpu"]
    assert main([*base, "--output", str(tmp_path / "a.nii.gz")]) == 0
    assert main([*base, "--reference", "flair", "--output", str(tmp_path / "b.nii.gz")]) == 0
    a, b, t1, flair = (nib.load(str(p)) for p in (tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", anatomical, coarse))
    assert a.shape == t1.shape and np.allclose(a.affine, t1.affine)
    assert b.shape == flair.shape and np.allclose(b.affine, flair.affine) and t1.shape != flair.shape
    assert main([*base, "--reference", "t2", "--output", str(tmp_path / "c.nii.gz")]) == 2
    assert "reference" in capsys.readouterr().err and not (tmp_path / "c.nii.gz").exists()


def test_a_3d_dwi_stored_with_a_singleton_fourth_axis_is_the_trace_image(anatomical, tmp_path) -> None:
    from neuromoe.io.nifti import load_dwi

    src = nib.load(anatomical)
    path = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj, dtype=np.float32)[..., None], src.affine), str(path))
    img = load_dwi(path)
    assert img.data.shape == src.shape


def test_a_batch_where_every_case_fails_is_refused_with_its_failures_and_no_table(
    model_dir, anatomical, tmp_path, capsys
) -> None:
    """Like predict / embed: exit 2 and no segment.csv (it was a 1-byte file a reader could not parse, exit 1)."""
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"subject,t1\n../up,{anatomical}\nmissing,{tmp_path / 'nope.nii.gz'}\n")
    out = tmp_path / "masks"
    out.mkdir()
    (out / "segment.csv").write_text("subject\nold\n")  # an earlier run's table must not pass for this one's
    assert main(["segment", "--model", model_dir, "--input", str(manifest), "--output", str(out),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no case could be segmented (2 failed" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv"]
    # no case at all (an fMRI-only table): the same refusal, not an empty table and exit 0
    (tmp_path / "func.csv").write_text(f"subject,bold,t1\ns1,{tmp_path / 'bold.nii.gz'},\n")
    assert main(["segment", "--model", model_dir, "--input", str(tmp_path / "func.csv"), "--output",
                 str(tmp_path / "masks2"), "--device", "cpu"]) == 2
    assert "no lesion case in it" in capsys.readouterr().err and not (tmp_path / "masks2" / "segment.csv").exists()
