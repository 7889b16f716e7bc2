"""``neuromoe info`` / ``neuromoe preprocess`` through the real dispatcher: output and bad inputs."""

import json

import nibabel as nib
import numpy as np
import pytest

from neuromoe.cli.main import main


@pytest.fixture
def t1(tmp_path):
    d = np.zeros((16, 16, 16), np.float32)
    d[4:12, 4:12, 4:12] = 100
    p = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(d, np.diag([-2.0, 2.0, 2.0, 1.0])), p)
    return p


def test_info_json_and_warn(t1, capsys):
    assert main(["info", str(t1), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["orientation"] == "LAS" and info["verdict"] == "WARN" and info["max"] == 100


def test_info_bad_file_fails_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"xx")
    assert main(["info", str(bad)]) == 2
    assert "FAIL" in capsys.readouterr().out


def test_preprocess_manifest_and_bad_inputs(tmp_path, t1, capsys):
    (tmp_path / "m.csv").write_text(f"subject,t1\ns1,{t1.name}\n")
    out = tmp_path / "cache"
    assert main(["preprocess", "--data", str(tmp_path / "m.csv"), "--out", str(out), "--shape", "16", "16", "16",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["done"] == 1
    assert len(list(out.glob("*.npy"))) == 1
    for argv in (["--data", str(tmp_path / "none.csv")], ["--data", str(tmp_path / "m.csv"), "--shard", "x"],
                 ["--data", str(tmp_path / "m.csv"), "--shard", "3/2"]):
        assert main(["preprocess", *argv, "--out", str(tmp_path / "o2")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("neuromoe: error:") and "Traceback" not in err and err.count("\n") == 1
        assert not (tmp_path / "o2").exists()


def test_preprocess_of_an_fmri_manifest_and_synth_with_a_bad_spacing_are_one_line_errors(tmp_path, capsys):
    """No row of an fMRI manifest can be preprocessed: exit 2 naming the manifest (was exit 1 plus a failures
    table in --out); ``synth --spacing 0`` gave a traceback and left an empty folder."""
    (tmp_path / "fmri.csv").write_text("subject,timeseries\ns1,a.npy\ns2,b.npy\n")
    runs = [(["preprocess", "--data", str(tmp_path / "fmri.csv"), "--out", str(tmp_path / "o"), "--no-progress"],
             "fmri.csv")]
    runs += [(["synth", "--out", str(tmp_path / "o"), "--spacing", s], "spacing") for s in ("0", "-3", "nan")]
    for argv, needle in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("neuromoe: error:") and needle in err and err.count("\n") == 1
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override", ["preprocessing.register=maybe", "preprocessing.spacing=fine",
                                      "preprocessing.crop_margin=two"])
def test_train_with_a_bad_preprocessing_override_is_a_one_line_error(tmp_path, capsys, override):
    """``preprocessing`` is a free dict in the family configs: a bad ``--set`` value gave a traceback
    (spacing) or was taken as given and failed later per subject (register, crop_margin)."""
    rows = [f"s{i},s{i}_T1w.nii.gz,{60 + i},{'MF'[i % 2]},{('train', 'train', 'val', 'test')[i % 4]}" for i in range(8)]
    (tmp_path / "m.csv").write_text("subject,t1,age,sex,split\n" + "\n".join(rows) + "\n")  # images never read
    argv = ["train", "--family", "denseformer", "--config", "tiny", "--set", override,
            "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuromoe: error: preprocessing") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_info_warns_when_the_header_has_no_orientation(tmp_path, capsys, monkeypatch) -> None:
    import nibabel as nib
    import numpy as np

    from neuromoe.cli.main import main
    from neuromoe.errors import InputError
    from neuromoe.io import nifti

    monkeypatch.setattr(nifti, "_no_orientation", set())  # what earlier tests of this process were told

    img = nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, tmp_path / "noorient.nii.gz")
    hdr = nib.load(tmp_path / "noorient.nii.gz").header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (0, 0)
    assert main(["info", str(tmp_path / "noorient.nii.gz")]) == 0
    assert "WARN" in capsys.readouterr().out
    assert "no orientation" in describe_reasons(tmp_path / "noorient.nii.gz")
    # the models read it too, and said nothing: loading says it once on stderr (info's verdict says it there)
    from neuromoe.io.nifti import load_nifti

    capsys.readouterr()
    load_nifti(tmp_path / "noorient.nii.gz")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "noorient.nii.gz: no orientation" in err and "fix:" in err
    # once per file, three files named, then one line for the rest of a cohort
    for i in range(5):
        nib.save(img, tmp_path / f"more{i}.nii.gz")
        load_nifti(tmp_path / f"more{i}.nii.gz")
        load_nifti(tmp_path / f"more{i}.nii.gz")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "more0.nii.gz" in err[0] and "more1.nii.gz" in err[1] and "more headers" in err[2]
    # a refused file gets its one error line, no warning before it
    monkeypatch.setattr(nifti, "_no_orientation", set())
    zeros = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    zeros.set_qform(None, code=0)
    zeros.set_sform(None, code=0)
    nib.save(zeros, tmp_path / "zeros.nii.gz")
    with pytest.raises(InputError, match="all zeros"):
        load_nifti(tmp_path / "zeros.nii.gz")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("zoom", "words"), [(0.1, "finer than MRI gives"), (10.0, "larger than a head")])
def test_info_warns_about_voxel_sizes_no_head_has(tmp_path, zoom, words) -> None:
    """0.1 mm voxels (a 61-voxel scan 6 mm across) were OK to info, and segment labelled 80 % of it lesion;
    10 mm voxels made a 610 mm field of view that took minutes to segment, also without a word."""
    import nibabel as nib
    import numpy as np

    aff = np.diag([zoom, zoom, zoom, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((61, 73, 61)).astype(np.float32), aff),
             tmp_path / "odd.nii.gz")
    assert words in describe_reasons(tmp_path / "odd.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((61, 73, 61)).astype(np.float32),
                             np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "head.nii.gz")
    assert describe_reasons(tmp_path / "head.nii.gz") == ""


def describe_reasons(path) -> str:
    from neuromoe.cli.info import describe

    return " ".join(describe(str(path))["reasons"])


def test_preprocess_full_fov_fills_the_cache_whole_field_of_view_reads_use(tmp_path, t1, capsys):
    """MoME evaluate/segment (and its demo preset) read the whole field of view; preprocess could not write
    that entry, so a cache filled beforehand was preprocessed again."""
    from neuromoe.data.preprocess import PreprocCache, PreprocSpec, preprocess_case

    (tmp_path / "m.csv").write_text(f"subject,t1\ns1,{t1.name}\n")
    out = tmp_path / "cache"
    assert main(["preprocess", "--data", str(tmp_path / "m.csv"), "--out", str(out), "--spacing", "2",
                 "--full-fov", "--no-progress"]) == 0
    files = sorted(out.iterdir())
    spec = PreprocSpec(spacing=(2.0,) * 3, shape=None)
    arr = preprocess_case({"t1": str(t1)}, spec, cache=PreprocCache(out))
    assert sorted(out.iterdir()) == files  # a cache hit
    np.testing.assert_array_equal(arr["t1"], preprocess_case({"t1": str(t1)}, spec)["t1"])
    with pytest.raises(SystemExit, match="2"):  # one or the other
        main(["preprocess", "--data", str(tmp_path / "m.csv"), "--out", str(out), "--full-fov", "--shape", "8", "8",
              "8"])


@pytest.mark.parametrize("flag,head_mask,bias,interp", [([], False, False, "cubic"),
                                                       (["--head-mask"], True, False, "cubic"),
                                                       (["--head-mask", "--bias-correct"], True, True, "cubic"),
                                                       (["--interpolation", "linear"], False, False, "linear")])
def test_preprocess_fills_the_entry_of_either_foreground(tmp_path, t1, capsys, flag, head_mask, bias, interp):
    """A model trained with ``preprocessing.head_mask`` (or ``bias_correct``, or an older model's linear
    interpolation) reads another cache entry; preprocess can fill any."""
    from neuromoe.data.preprocess import PreprocCache, PreprocSpec, preprocess_case

    (tmp_path / "m.csv").write_text(f"subject,t1\ns1,{t1.name}\n")
    out = tmp_path / "cache"
    assert main(["preprocess", "--data", str(tmp_path / "m.csv"), "--out", str(out), "--shape", "16", "16", "16",
                 "--no-progress", *flag]) == 0
    files = sorted(out.iterdir())
    preprocess_case({"t1": str(t1)}, PreprocSpec(spacing=(2.0,) * 3, shape=(16,) * 3, head_mask=head_mask,
                                                 bias_correct=bias, interpolation=interp), cache=PreprocCache(out))
    assert sorted(out.iterdir()) == files  # a cache hit
    preprocess_case({"t1": str(t1)}, PreprocSpec(spacing=(2.0,) * 3, shape=(16,) * 3, head_mask=not head_mask,
                                                 bias_correct=bias, interpolation=interp), cache=PreprocCache(out))
    assert sorted(out.iterdir()) != files  # the other foreground is another entry
