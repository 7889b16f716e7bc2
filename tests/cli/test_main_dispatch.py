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
