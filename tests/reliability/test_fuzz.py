"""Hypothesis fuzzing of the NIfTI loader/validator and the manifest parser (issue 7, item 2).

Properties: whatever the bytes, nothing escapes but :class:`neuromoe.errors.NeuroMoEError`; a load that
succeeds gives finite float32 3D/4D data; and the loader never allocates more than ``ALLOC_LIMIT``
(tracemalloc peak, numpy included) for a file of a few kB whatever size its header declares — the
size guard fires before data is read. Default run: a few hundred cases; ``-m slow``: ≥ 10⁴.
"""

from __future__ import annotations

import atexit
import gzip
import io
import shutil
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_corpus import brain, write

from neuromoe.errors import NeuroMoEError
from neuromoe.io.nifti import load_nifti
from neuromoe.io.table import ROLES, load_table, validate_table

ALLOC_LIMIT = 8 * 2**20  # the base image holds 20·24·20 float32 = 38 kB
FAST, SLOW = 120, 3000  # per property; 4 properties → 480 / 12 000 cases
WORK = Path(tempfile.mkdtemp(prefix="neuromoe-fuzz-"))  # made at import (hypothesis needs it before any fixture)
atexit.register(shutil.rmtree, WORK, ignore_errors=True)  # every test run left one behind in /tmp


def _base_bytes(dtype: Any = np.float32) -> bytes:
    path = write(WORK / "base.nii", brain().astype(dtype))
    return path.read_bytes()


BASE = {np.dtype(d).name: _base_bytes(d) for d in (np.float32, np.int16, np.uint8)}
finite = st.floats(-1e6, 1e6, allow_nan=False)
weird_float = st.one_of(
    finite, st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e38, -1e-38, 1.0])
)
dim_value = st.one_of(st.integers(-3, 64), st.sampled_from([2**15 - 1, -(2**15), 512, 30000]))
HEADER_FIELDS: dict[str, st.SearchStrategy] = {
    "dim": st.lists(dim_value, min_size=8, max_size=8).map(lambda d: [max(-9, min(9, d[0])), *d[1:]]),
    "pixdim": st.lists(weird_float, min_size=8, max_size=8),
    "datatype": st.one_of(
        st.sampled_from([2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304]),
        st.integers(-(2**15), 2**15 - 1),
    ),
    "bitpix": st.integers(-(2**15), 2**15 - 1),
    "vox_offset": st.one_of(st.sampled_from([0.0, 348.0, 352.0, 353.0, 1e9, -352.0, float("nan")]), finite),
    "scl_slope": weird_float,
    "scl_inter": weird_float,
    "qform_code": st.integers(-2, 6),
    "sform_code": st.integers(-2, 6),
    "srow_x": st.lists(weird_float, min_size=4, max_size=4),
    "srow_y": st.lists(weird_float, min_size=4, max_size=4),
    "srow_z": st.lists(weird_float, min_size=4, max_size=4),
    "quatern_b": weird_float,
    "quatern_c": weird_float,
    "quatern_d": weird_float,
    "sizeof_hdr": st.sampled_from([348, 540, 0, -1, 2**31 - 1]),
    "magic": st.sampled_from([b"n+1\x00", b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"xyz\x00"]),
    "intent_code": st.integers(-(2**15), 2**15 - 1),
    "xyzt_units": st.integers(0, 255),
}
nifti_fields = st.fixed_dictionaries(
    {},
    optional=HEADER_FIELDS,
)
nifti_case = st.fixed_dictionaries(
    {
        "base": st.sampled_from(sorted(BASE)),
        "fields": nifti_fields,
        "gz": st.booleans(),
        "truncate": st.one_of(st.none(), st.integers(0, 40_000)),
        "allow_4d": st.booleans(),
    }
)
byte_case = st.fixed_dictionaries(
    {
        "base": st.sampled_from(sorted(BASE)),
        "flips": st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=12),
        "gz": st.booleans(),
    }
)


def _patched(raw: bytes, fields: dict[str, Any]) -> bytes | None:
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    for key, value in fields.items():
        try:
            hdr[key] = value
        except (ValueError, OverflowError, TypeError):
            return None  # not representable in the field's binary type: not a file anyone can write
    return hdr.binaryblock + raw[348:]


def _load_checked(data: bytes, gz: bool, allow_4d: bool = False) -> None:
    path = WORK / ("case.nii.gz" if gz else "case.nii")
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    tracemalloc.start()
    try:
        img = load_nifti(path, allow_4d=allow_4d)
    except NeuroMoEError as exc:
        assert "\n" not in str(exc)
        img = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < ALLOC_LIMIT, f"loader allocated {peak / 2**20:.1f} MiB for a {len(data)}-byte file"
    if img is not None:
        assert img.data.dtype == np.float32 and img.data.ndim in (3, 4) and np.isfinite(img.data).all()
        assert np.isfinite(img.affine).all()


def check_nifti_fields(case: dict[str, Any]) -> None:
    data = _patched(BASE[case["base"]], case["fields"])
    if data is None:
        return
    if case["truncate"] is not None:
        data = data[: case["truncate"]]
    _load_checked(data, case["gz"], case["allow_4d"])


def check_nifti_bytes(case: dict[str, Any]) -> None:
    data = bytearray(BASE[case["base"]])
    for offset, value in case["flips"]:
        data[offset] = value
    _load_checked(bytes(data), case["gz"])


# --------------------------------------------------------------------------------------------- manifests

GOOD = write(WORK / "good_t1.nii.gz", brain())
cell = st.one_of(
    st.just(""),
    st.just(str(GOOD)),
    st.just("good_t1.nii.gz"),
    st.just("missing/sub-01_T1w.nii.gz"),
    st.just("sub\x00.nii.gz"),
    st.just(str(WORK)),
    st.sampled_from(["CN", "AD", "train", "val", "test", "holdout", "F", "M", "nan", "NA", "1e400", "-0"]),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True).map(str),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
)
column = st.one_of(
    st.sampled_from(["subject", "session", "state", "split", "age", "sex", "dx_ad", *ROLES]),
    st.text(min_size=0, max_size=6),
)
structured = st.fixed_dictionaries(
    {
        "columns": st.lists(column, min_size=1, max_size=7),
        "rows": st.lists(st.lists(cell, min_size=0, max_size=8), min_size=0, max_size=6),
        "sep": st.sampled_from([",", "\t"]),
        "quote": st.booleans(),
    }
)
raw_text = st.fixed_dictionaries(
    {
        "text": st.one_of(st.text(max_size=400), st.binary(max_size=400)),
        "suffix": st.sampled_from([".csv", ".tsv"]),
    }
)


def _parse_checked(path: Path) -> None:
    try:
        df = load_table(path)
        roles = [c for c in df.columns if c in ROLES]
        validate_table(df, roles=roles or ("t1",))
    except NeuroMoEError as exc:
        assert "\n" not in str(exc)


def check_manifest_structured(case: dict[str, Any]) -> None:
    sep = case["sep"]

    def fmt(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if case["quote"] else v

    lines = [sep.join(fmt(c) for c in case["columns"])] + [sep.join(fmt(v) for v in r) for r in case["rows"]]
    path = WORK / ("m.tsv" if sep == "\t" else "m.csv")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    _parse_checked(path)


def check_manifest_raw(case: dict[str, Any]) -> None:
    path = WORK / f"raw{case['suffix']}"
    data = case["text"]
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    _parse_checked(path)


PROPERTIES: dict[str, tuple[st.SearchStrategy, Callable[[Any], None]]] = {
    "nifti_header_fields": (nifti_case, check_nifti_fields),
    "nifti_random_bytes": (byte_case, check_nifti_bytes),
    "manifest_structured": (structured, check_manifest_structured),
    "manifest_raw_text": (raw_text, check_manifest_raw),
}


def _fuzz(name: str, n: int) -> None:
    strategy, check = PROPERTIES[name]

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case: Any) -> None:
        check(case)

    run()


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_fuzz_fast(name: str) -> None:
    _fuzz(name, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROPERTIES))
def test_fuzz_slow(name: str) -> None:
    _fuzz(name, SLOW)


def test_gigantic_header_refused_before_allocation() -> None:
    """The declared-size guard itself: a 40 kB file declaring 400³ voxels allocates nothing big."""
    data = _patched(BASE["float32"], {"dim": [3, 400, 400, 400, 1, 1, 1, 1]})
    for gz in (False, True):
        with pytest.raises(NeuroMoEError, match="declares"):
            load_nifti(_write(data, gz))
        _load_checked(data, gz)


def test_extension_sizes_are_read_in_the_byte_order_nibabel_uses() -> None:
    """Found by the slow fuzz: sizeof_hdr flipped to another value, nibabel still reads the file (byte order
    from dim[0]) and allocated a 1 GB extension the guard had skipped for want of sizeof_hdr 348."""
    data = bytearray(BASE["float32"])
    for offset, value in [(0, 0), (110, 184), (348, 1)]:
        data[offset] = value
    for gz in (False, True):
        _load_checked(bytes(data), gz)


def _write(data: bytes, gz: bool) -> Path:
    path = WORK / ("g.nii.gz" if gz else "g.nii")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path
