"""Atomic writes end with normal permissions (not mkstemp's 0600) and keep an existing file's mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from neuromoe.io.atomic import atomic_write_text


def test_new_file_gets_umask_mode_and_replacement_keeps_mode(tmp_path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    out = tmp_path / "a.csv"
    atomic_write_text(out, "x\n")
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask != 0o600
    os.chmod(out, 0o640)
    atomic_write_text(out, "y\n")
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_text() == "y\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]
