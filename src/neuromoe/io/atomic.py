"""Atomic file writes: a killed job never leaves a half-written file under the final name.

Everything the toolkit writes (NIfTI, CSV, JSON, checkpoints, weights) goes through
:func:`atomic_path`: write to a temporary file in the same directory, fsync, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from neuromoe.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a finished output gets the mode a plain open() would have given it
_NEW_FILE_MODE = 0o666 & ~_umask()


def check_outputs(outputs: Iterable[str | Path], inputs: Iterable[Any]) -> None:
    """Raise :class:`InputError` before any work when an output cannot be written or would replace an input.

    Unwritable: the output is an existing folder, or its nearest existing ancestor is a file or not
    writable; found here, not after minutes of inference, and with the path and a fix instead of a traceback.
    Replacing an input (``segment --t1 scan.nii.gz --output scan.nii.gz``, ``predict --input m.csv --output
    m.csv``): the atomic rename would silently destroy the user's scan or manifest. Files are compared by
    identity (device, inode), so other spellings, symlinks and hard links count; an output that does not
    exist yet replaces nothing, so the usual case costs one failed stat per output."""
    outputs = [Path(o) for o in outputs]
    for out in outputs:
        _check_writable(out)
    existing = {}
    for out in outputs:
        with contextlib.suppress(OSError):
            st = out.stat()
            existing[(st.st_dev, st.st_ino)] = out
    if not existing:
        return
    for src in inputs:
        if not isinstance(src, (str, os.PathLike)) or not str(src):
            continue  # empty manifest cells (NaN, "")
        try:
            st = os.stat(src)
        except OSError:
            continue  # a missing input is reported by the loader
        out = existing.get((st.st_dev, st.st_ino))
        if out is not None:
            raise InputError(f"output would overwrite the input {src}", path=out,
                             fix="write the output to another file name")


def remove_stale(*paths: str | Path) -> None:
    """A failed run removes what an earlier run left under its output names: a script that checks the file
    exists would otherwise read another run's results for other inputs."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def check_out_folder(out: str | Path) -> None:
    """Refuse, before any work, an output folder (``--out`` of pretrain / train / evaluate) that is a file or lies
    under one: it failed only after the whole run, with "File exists" (exit 1)."""
    out = Path(out)
    for q in (out, *out.parents):
        if q.exists():
            if not q.is_dir():
                raise InputError("is a file, not a folder" if q == out else f"lies under {q}, which is a file",
                                 path=out, fix="give a folder path for --out")
            return


def removes_on_error(*names: str) -> Callable[[F], F]:
    """Decorator for an entry point that writes ``names`` under its ``out`` folder: an error (a refused table, an
    interrupt) removes what an earlier run left there under those names, so a script that checks
    ``out/metrics.json`` never reads another run's results as this one's."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except BaseException:
                # the cleanup never replaces the error being reported (an --out that is a file, a read-only
                # folder, a call that did not bind)
                with contextlib.suppress(OSError, TypeError, KeyError):
                    out = Path(signature.bind(*args, **kwargs).arguments["out"])
                    remove_stale(*(out / name for name in names))
                raise

        return inner  # type: ignore[return-value]

    return wrap


def _check_writable(out: Path) -> None:
    if out.is_dir():
        raise InputError("output is an existing folder", path=out, fix="give a file name, or remove the folder")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create the output: {parent} is a file, not a folder", path=out,
                         fix="choose an output path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"no permission to write in {parent}", path=out, fix="choose a writable output folder")


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync it and rename it onto ``final``.

    On any exception the temporary file is removed and ``final`` is left untouched. ``suffix``
    defaults to the final name's suffixes so that writers that infer the format from the extension
    (nibabel, pandas) still work.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            mode = final.stat().st_mode & 0o7777  # replacing a file keeps its permissions
        except FileNotFoundError:
            mode = _NEW_FILE_MODE
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, strict: bool = False) -> None:
    """``strict``: NaN / ±inf become ``null``, so results files (metrics.json, sidecars) are standard JSON that
    jq, JavaScript or R read; model configs keep Python's NaN/Infinity because they are read back exactly."""
    atomic_write_text(path, json_text(obj, strict=strict))


def json_text(obj: Any, *, strict: bool = False) -> str:
    """The text :func:`atomic_write_json` writes."""
    if strict:
        obj = _finite(obj)
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=not strict) + "\n"


def _finite(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
