"""Outputs never replace inputs (io.atomic.check_outputs)."""

from __future__ import annotations

import os

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
