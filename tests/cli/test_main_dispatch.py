"""The CLI dispatcher: help, unknown commands, family selection, error → one line + exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from neuromoe.cli.main import FAMILY_VERBS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for verb in [*FAMILY_VERBS, "info", "synth", "preprocess", "report", "demo"]:
        assert verb in out


def test_family_verb_without_family_fails_with_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
    assert "--family is required" in capsys.readouterr().err


def test_unknown_family_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "--family", "denseformer"])
    assert exc.value.code == 2


def test_console_script_runs_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "neuromoe.cli.main", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.startswith("neuromoe ")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["segment", "--model", "m", "--t1", "a.nii.gz", "--output", "o.nii.gz"], ["--config", "tiny"]),
        (["segment", "--model", "m", "--t1", "a.nii.gz", "--output", "o.nii.gz"], ["--cache", "c"]),
        (["predict", "--family", "brainmoe", "--model", "m", "--input", "i", "--output", "o.csv"], ["--set", "a=1"]),
        (["predict", "--family", "denseformer", "--model", "m", "--input", "i", "--output", "o.csv"], ["--seed", "3"]),
        (["embed", "--model", "m", "--data", "d", "--out", "o.csv"], ["--config", "no_such_preset"]),
    ],
)
def test_inference_verbs_refuse_options_they_would_ignore(argv, flag, capsys):
    """predict/segment/embed replay the model's stored config: a --config/--set/--seed (or segment --cache)
    they cannot honour is refused up front instead of being accepted and silently ignored."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, *flag])
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--family", "brainmoe", "--model", "m", "--input", "i", "--output", "o.csv"],
        ["embed", "--model", "m", "--data", "d", "--out", "o.csv"],
    ],
)
def test_brainmoe_inference_honours_device(argv, capsys, monkeypatch):
    """--device cuda reaches BrainMoE predict/embed (it used to be dropped and the scans ran on the CPU)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main([*argv, "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
