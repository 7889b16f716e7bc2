"""Atomic writes: the final name only ever holds a complete file."""

from __future__ import annotations

import pytest

from neuromoe.io.atomic import atomic_path, atomic_write_json, atomic_write_text


def test_success_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.csv"
    atomic_write_text(target, "a,b\n")
    atomic_write_text(target, "c,d\n")
    assert target.read_text() == "c,d\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.csv"]


def test_failure_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")  # writers that infer the format from the suffix still work
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_failure_creates_nothing(tmp_path):
    target = tmp_path / "new.json"
    with pytest.raises(ValueError), atomic_path(target):
        raise ValueError
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_json_numpy(tmp_path):
    import numpy as np

    atomic_write_json(tmp_path / "a.json", {"x": np.float32(1.5), "y": np.arange(3)})
    assert (tmp_path / "a.json").read_text().count("1.5") == 1


def test_strict_json_writes_null_for_nan_and_inf(tmp_path):
    """Results files are standard JSON (a conformal interval of infinite width used to be written as Infinity,
    which jq / JavaScript refuse); model configs keep NaN so they read back exactly."""
    import json

    import numpy as np

    obj = {"mean_width": float("inf"), "r": [np.float32("nan"), 0.5], "nested": {"x": np.array([1.0, -np.inf])}}
    atomic_write_json(tmp_path / "m.json", obj, strict=True)
    text = (tmp_path / "m.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"mean_width": None, "r": [None, 0.5], "nested": {"x": [1.0, None]}}
    atomic_write_json(tmp_path / "c.json", {"v": float("nan")})
    assert np.isnan(json.loads((tmp_path / "c.json").read_text())["v"])
