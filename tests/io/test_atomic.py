"""Outputs never replace inputs (io.atomic.check_outputs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neuromoe.errors import InputError
from neuromoe.io.atomic import check_outputs


def test_an_output_naming_an_input_by_any_path_is_refused(tmp_path) -> None:
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"x")
    (tmp_path / "sym.nii.gz").symlink_to(scan)
    os.link(scan, tmp_path / "hard.nii.gz")
    (tmp_path / "sub").mkdir()
    for alias in ("scan.nii.gz", "sub/../scan.nii.gz", "sym.nii.gz", "hard.nii.gz"):
        with pytest.raises(InputError, match="overwrite the input") as err:
            check_outputs([tmp_path / "mask.nii.gz", tmp_path / alias], [float("nan"), "", scan])
        assert alias.split("/")[-1] in str(err.value) and "fix:" in str(err.value)
    # new files, other files and missing inputs are fine
    check_outputs([tmp_path / "mask.nii.gz", tmp_path / "other.csv"], [scan, tmp_path / "gone.nii"])


@pytest.mark.parametrize("family", ["denseformer", "mome", "brainmoe"])
def test_a_failed_evaluate_leaves_no_earlier_results_under_its_names(family: str, tmp_path: Path) -> None:
    """A refused evaluate left the previous run's metrics.json in its --out folder, read as this run's results."""
    import importlib

    from neuromoe.errors import NeuroMoEError

    out = tmp_path / "ev"
    (out / "report").mkdir(parents=True)
    names = ("metrics.json", "predictions.csv", "per_case.csv", "report/section.json")
    for name in names:
        (out / name).write_text("an earlier run's")
    evaluate = importlib.import_module(f"neuromoe.pipelines.{family}").evaluate
    with pytest.raises(NeuroMoEError):
        evaluate(tmp_path / "no_model", tmp_path / "no_data", out)
    assert [n for n in names if (out / n).exists()] == (["per_case.csv"] if family != "mome" else ["predictions.csv"])


def test_the_cleanup_of_a_failed_evaluate_never_replaces_its_error(tmp_path: Path) -> None:
    """--out naming a file: removing out/metrics.json raised NotADirectoryError over the real error (exit 1, not
    the refusal's exit 2 and message)."""
    from neuromoe.errors import NeuroMoEError
    from neuromoe.pipelines.denseformer import evaluate

    (tmp_path / "out").write_text("a file, not a folder")
    with pytest.raises(NeuroMoEError):
        evaluate(tmp_path / "no_model", tmp_path / "no_data", tmp_path / "out")
