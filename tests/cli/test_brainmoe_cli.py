"""``neuromoe <verb> --family brainmoe``: help with examples, exit codes, one-line errors, a real run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuromoe.cli.brainmoe import VERBS
from neuromoe.cli.main import main
from neuromoe.data.synth import synth_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_has_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--family", "brainmoe", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "neuromoe " in out


def _one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("neuromoe: error:") and needle in err[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    _one_line_error(
        capsys,
        ["pretrain", "--family", "brainmoe", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
        "data not found",
    )
    _one_line_error(
        capsys,
        [
            "train",
            "--family",
            "brainmoe",
            "--data",
            str(tmp_path),
            "--experts",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        "",
    )
    _one_line_error(
        capsys,
        [
            "predict",
            "--family",
            "brainmoe",
            "--model",
            str(tmp_path / "nomodel"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "p.csv"),
        ],
        "model directory",
    )
    _one_line_error(
        capsys,
        ["embed", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "e.txt")],
        ".csv or .npy",
    )
    _one_line_error(
        capsys,
        [
            "pretrain",
            "--family",
            "brainmoe",
            "--config",
            "tiny",
            "--set",
            "expert.kind=bogus",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        "expert.kind",
    )


def test_pretrain_one_state_then_embed(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    synth_cohort(cohort, n_structural=0, n_lesion=0, n_fmri=10, n_rois=12, n_timepoints=40, progress=False)
    out = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--family",
                "brainmoe",
                "--config",
                "tiny",
                "--data",
                str(cohort),
                "--state",
                "rest",
                "--no-pooled",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (out / "experts" / "rest" / "model.safetensors").is_file()
    assert not (out / "experts" / "pooled").exists()
    emb = tmp_path / "emb.npy"
    assert (
        main(["embed", "--model", str(out / "experts" / "rest"), "--input", str(cohort), "--output", str(emb)])
        == 0
    )
    arr = np.load(emb)
    ids = pd.read_csv(tmp_path / "emb_subjects.csv")
    assert arr.shape[0] == len(ids) == 10 * 5 // 2 + 10 // 2 and np.isfinite(arr).all()


def test_freeze_flags_override_the_preset(tmp_path):
    """``--freeze-experts`` / ``--unfreeze-experts`` win over the preset's ``model.unfreeze_experts`` either way
    (the demo preset adapts the experts, the paper's setting keeps them frozen)."""
    import yaml

    cohort = tmp_path / "cohort"
    synth_cohort(cohort, n_structural=0, n_lesion=0, n_fmri=10, n_rois=12, n_timepoints=40, progress=False)
    pre = tmp_path / "pre"
    common = ["--family", "brainmoe", "--config", "tiny", "--device", "cpu"]
    assert main(["pretrain", *common, "--data", str(cohort), "--states", "all", "--out", str(pre)]) == 0
    for flag, preset_value, expected in (("--freeze-experts", "true", False), ("--unfreeze-experts", "false", True)):
        run = tmp_path / flag.strip("-")
        argv = ["train", *common, "--data", str(cohort), "--experts", str(pre), "--out", str(run),
                "--set", f"model.unfreeze_experts={preset_value}", "--set", "train.epochs=1", flag]
        assert main(argv) == 0
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["unfreeze_experts"] is expected
    # no --config: train starts from the pretraining run's resolved config (tiny here), not from demo
    argv = ["train", "--family", "brainmoe", "--device", "cpu", "--data", str(cohort), "--experts", str(pre),
            "--out", str(tmp_path / "inherited"), "--set", "train.epochs=1"]
    assert main(argv) == 0
    assert yaml.safe_load((tmp_path / "inherited" / "config.yaml").read_text())["model"]["preset"] == "tiny"
