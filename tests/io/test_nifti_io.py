"""NIfTI loading: real nibabel test headers, RAS round trips (LPS, oblique), header guards."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from neuromoe.errors import InputError
from neuromoe.io.nifti import inspect_nifti, load_nifti, resample_to_grid, save_nifti

REAL = ["anatomical.nii", "functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz"]


def _variant(tmp_path, name, kind):
    src = nib.load(os.path.join(data_path, "anatomical.nii"))
    data = np.asarray(src.get_fdata(), dtype=np.float32)
    aff = src.affine.copy()
    if kind == "lps":
        aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    elif kind == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        aff = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]) @ aff
    out = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), out)
    return out


@pytest.mark.parametrize("name", REAL)
def test_real_headers_round_trip_affine_exactly(tmp_path, name):
    path = os.path.join(data_path, name)
    img = load_nifti(path, allow_4d=True)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    out = save_nifti(img.data, tmp_path / "rt.nii.gz", like=img)
    back, orig = nib.load(out), nib.load(path)
    assert np.array_equal(back.affine, orig.affine)
    np.testing.assert_allclose(back.get_fdata(), orig.get_fdata(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_lps_and_oblique_round_trip(tmp_path, kind):
    path = _variant(tmp_path, kind, kind)
    img = load_nifti(path)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    back = nib.load(save_nifti(img.data, tmp_path / "o.nii.gz", like=img))
    assert np.array_equal(back.affine, nib.load(path).affine)
    np.testing.assert_array_equal(back.get_fdata(), nib.load(path).get_fdata())


def test_identifying_fields_are_not_copied(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    img.header["descrip"] = b"John Doe 1970"
    nib.save(img, tmp_path / "a.nii")
    loaded = load_nifti(tmp_path / "a.nii")
    back = nib.load(save_nifti(loaded.data, tmp_path / "b.nii", like=loaded))
    assert b"John" not in back.header["descrip"].tobytes()


def test_scl_slope_applied_and_zero_slope_means_unscaled(tmp_path):
    img = nib.Nifti1Image(np.full((4, 4, 4), 3, np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "s.nii")
    assert np.all(load_nifti(tmp_path / "s.nii").data == 7.0)
    img.header.set_slope_inter(np.nan, np.nan)
    nib.save(img, tmp_path / "z.nii")
    assert np.all(load_nifti(tmp_path / "z.nii").data == 3.0)


def _bad(tmp_path, kind):
    p = tmp_path / f"{kind}.nii.gz"
    if kind == "magic":
        p.write_bytes(gzip.compress(b"x" * 400))
    elif kind == "truncated":
        nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype(np.float32), np.eye(4)), p)
        p.write_bytes(p.read_bytes()[:600])
    elif kind == "2d":
        nib.save(nib.Nifti1Image(np.ones((4, 4), np.float32), np.eye(4)), p)
    elif kind == "5d":
        nib.save(nib.Nifti1Image(np.ones((2, 2, 2, 2, 2), np.float32), np.eye(4)), p)
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((3, 3, 3, 2), np.float32), np.eye(4)), p)
    elif kind == "singular":
        img = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4))
        hdr = img.header
        hdr.set_qform(None, code=0)
        hdr["sform_code"], hdr["srow_y"] = 1, [0.0, 0.0, 0.0, 0.0]
        hdr["vox_offset"] = 352
        p.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + np.ones(27, np.float32).tobytes()))
    elif kind == "nan":
        d = np.ones((3, 3, 3), np.float32)
        d[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(d, np.eye(4)), p)
    elif kind == "zeros":
        nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), p)
    elif kind == "huge":
        img = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4))
        img.header.set_data_shape((4000, 4000, 4000))
        raw = img.header.binaryblock + b"\0" * 4 + b"\0" * 32
        p.write_bytes(gzip.compress(raw))
    elif kind == "one_slice":  # how converters store a 2-D image: dim[0] = 3, nz = 1
        nib.save(nib.Nifti1Image(np.ones((31, 37, 1), np.float32), np.diag([6.0, 6.0, 6.0, 1.0])), p)
    elif kind == "two_cube":
        nib.save(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.diag([12.0, 12.0, 12.0, 1.0])), p)
    elif kind == "missing":
        pass
    return p


_BAD_MESSAGE = {"magic": "cannot read NIfTI header", "truncated": "truncated", "2d": "2 dimensions",
                "5d": "5 dimensions", "4d": "4 dimensions", "singular": "singular", "nan": "NaN/Inf",
                "zeros": "all zeros", "huge": "exceeds", "missing": "not found",
                "one_slice": "1 voxel.* axis 2 .*not a 3D volume", "two_cube": "2 voxel.* axis 0 .*not a 3D volume"}


@pytest.mark.parametrize("kind", sorted(_BAD_MESSAGE))
def test_bad_inputs_raise_input_error(tmp_path, kind):
    with pytest.raises(InputError, match=_BAD_MESSAGE[kind]) as err:
        load_nifti(_bad(tmp_path, kind))
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_4d_allowed_on_request_and_inspect_reads_no_data(tmp_path):
    assert load_nifti(_bad(tmp_path, "4d"), allow_4d=True).data.shape == (3, 3, 3, 2)
    info = inspect_nifti(os.path.join(data_path, "example_nifti2.nii.gz"))
    assert info["version"] == "NIfTI-2" and len(info["spacing"]) == 3


def test_resample_identity_and_flip():
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_allclose(resample_to_grid(data, aff, data.shape, aff, order=0), data)
    flip = aff.copy()
    flip[0, 0], flip[0, 3] = -2.0, 8.0
    np.testing.assert_allclose(resample_to_grid(data, aff, data.shape, flip, order=0), data[::-1])


def test_saved_masks_keep_the_inputs_qform_sform_and_their_codes(tmp_path):
    """Readers differ in which transform they trust (qform- or sform-first, code-aware): an output written
    with the input's own transforms and codes lands where every reader puts the input."""
    aff_s = np.diag([2.0, 2.0, 2.0, 1.0])
    aff_q = aff_s.copy()
    aff_q[0, 3] = 10.0  # a stale qform, 10 mm off
    img = nib.Nifti1Image(np.random.default_rng(0).random((6, 7, 8)).astype(np.float32), aff_s)
    img.header.set_sform(aff_s, code=4)  # MNI
    img.header.set_qform(aff_q, code=1)
    nib.save(img, tmp_path / "in.nii.gz")
    src = load_nifti(tmp_path / "in.nii.gz")
    save_nifti((src.data > 0.5).astype(np.uint8), tmp_path / "mask.nii.gz", like=src, dtype=np.uint8)
    out = nib.load(tmp_path / "mask.nii.gz").header
    assert (int(out["sform_code"]), int(out["qform_code"])) == (4, 1)
    np.testing.assert_allclose(out.get_sform(), aff_s)
    np.testing.assert_allclose(out.get_qform(), aff_q, atol=1e-5)


def test_singleton_fourth_axis_round_trips_and_corrupt_gzip_is_refused(tmp_path):
    """Converters often write (X, Y, Z, 1): a mask of such an input has that shape too. A damaged .nii.gz
    whose data block still decompresses (nibabel does not check the gzip CRC) is refused, not half-read."""
    data = np.random.default_rng(1).random((6, 7, 8, 1)).astype(np.float32) + 0.1
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    src = load_nifti(tmp_path / "a.nii.gz")
    assert src.data.shape == (6, 7, 8) and src.orig_shape == (6, 7, 8, 1)
    save_nifti(src.data, tmp_path / "b.nii.gz", like=src)
    assert nib.load(tmp_path / "b.nii.gz").shape == (6, 7, 8, 1)
    # (X, Y, Z, 1, 1) too (it used to be refused as 5-D); a real 4th/5th axis still is
    nib.save(nib.Nifti1Image(data[..., None], np.eye(4)), tmp_path / "c.nii.gz")
    src = load_nifti(tmp_path / "c.nii.gz")
    assert src.data.shape == (6, 7, 8) and src.orig_shape == (6, 7, 8, 1, 1)
    save_nifti(src.data, tmp_path / "d.nii.gz", like=src)
    assert nib.load(tmp_path / "d.nii.gz").shape == (6, 7, 8, 1, 1)
    assert load_nifti(tmp_path / "c.nii.gz", allow_4d=True).data.shape == (6, 7, 8, 1)
    nib.save(nib.Nifti1Image(np.ones((6, 7, 8, 1, 2), np.float32), np.eye(4)), tmp_path / "e.nii.gz")
    with pytest.raises(InputError, match="5 dimensions"):
        load_nifti(tmp_path / "e.nii.gz")
    # a gzip member whose checksum does not match its content: nibabel reads the data block and stops
    raw = gzip.compress(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)).to_bytes())
    bad = bytearray(raw)
    bad[-8:-4] = bytes(a ^ 0xFF for a in bad[-8:-4])  # the CRC32 of the trailer
    (tmp_path / "bad.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(InputError, match=r"bad\.nii\.gz"):
        load_nifti(tmp_path / "bad.nii.gz")


def test_inspect_spacing_is_the_affines_voxel_size(tmp_path):
    """pixdim can be zero or stale where the sform is right; spacing comes from the affine, as preprocessing reads it."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header["pixdim"][1:4] = [1.0, 1.0, 1.0]
    nib.save(img, tmp_path / "s.nii")
    assert inspect_nifti(tmp_path / "s.nii")["spacing"] == [2.0, 2.0, 3.0]


@pytest.mark.parametrize(("unit", "per_mm"), [("meter", 1e-3), ("micron", 1e3)])
def test_spatial_units_of_the_header_are_honoured(tmp_path, unit, per_mm):
    """A header whose affine is in metres or microns (xyzt_units) is the same image as its mm twin: it was read as
    0.006 mm or 6000 mm voxels. Written outputs keep the input's own affine and unit."""
    rng = np.random.default_rng(0)
    data = rng.random((8, 9, 10)).astype(np.float32) + 1
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [-10, 20, -30]
    paths = {}
    for name, scale, u in (("mm", 1.0, "mm"), ("other", per_mm, unit)):
        img = nib.Nifti1Image(data, np.diag([scale] * 3 + [1.0]) @ aff)
        img.header.set_xyzt_units(u, "sec")
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(img, paths[name])
    mm, other = load_nifti(paths["mm"]), load_nifti(paths["other"])
    np.testing.assert_allclose(other.affine, mm.affine, rtol=1e-5, atol=1e-4)
    assert inspect_nifti(paths["other"])["spacing"] == pytest.approx([2.0, 2.0, 3.0], rel=1e-5)
    out = save_nifti(other.data > 1.5, tmp_path / "mask.nii.gz", like=other, dtype=np.uint8)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, nib.load(str(paths["other"])).affine)
    assert back.header.get_xyzt_units()[0] == unit



def test_an_invalid_units_code_reads_as_mm_and_outputs_still_write(tmp_path):
    """xyzt_units = 4 is no NIfTI code; nibabel's get_xyzt_units raises KeyError on it (the fuzzer found it)."""
    img = nib.Nifti1Image(np.random.default_rng(0).random((6, 6, 6)).astype(np.float32) + 1, np.diag([2.0, 2, 2, 1]))
    img.header["xyzt_units"] = 4
    nib.save(img, tmp_path / "u.nii.gz")
    loaded = load_nifti(tmp_path / "u.nii.gz")
    np.testing.assert_allclose(np.linalg.norm(loaded.affine[:3, :3], axis=0), [2.0, 2.0, 2.0])
    save_nifti(loaded.data > 1.5, tmp_path / "m.nii.gz", like=loaded, dtype=np.uint8)
    assert int(nib.load(str(tmp_path / "m.nii.gz")).header["xyzt_units"]) == 4


def _dwi_series(tmp_path, bvals, shape=(12, 10, 8)) -> str:
    """A 4-D DWI with one volume per b-value (volume k = k + 1 everywhere) and its BIDS .bval sidecar."""
    rng = np.random.default_rng(0)
    vols = np.stack([np.full(shape, k + 1.0) * (1 + 0.1 * rng.random(shape)) for k in range(len(bvals))], -1)
    path = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(vols.astype(np.float32), np.diag([-2.0, 2.0, 2.0, 1.0])), str(path))
    (tmp_path / "sub-01_dwi.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    return str(path)


def test_a_dwi_series_becomes_its_b1000_trace_image(tmp_path):
    """BIDS dwi/ series (b0 + directions, .bval beside it) load as the geometric mean of the b≈1000 volumes."""
    from neuromoe.io.nifti import load_dwi

    path = _dwi_series(tmp_path, [0, 1000, 995, 1005, 2000])
    img = load_dwi(path)
    raw = nib.load(path).get_fdata()
    expected = np.exp(np.log(raw[..., 1:4]).mean(-1))  # not b0, not the b = 2000 shell
    assert img.data.shape == raw.shape[:3]
    np.testing.assert_allclose(img.data, expected[::-1], rtol=1e-5)  # stored LAS, loaded RAS
    np.testing.assert_allclose(img.orig_affine, nib.load(path).affine)
    assert img.meta["dwi_shell"] == 1000 and img.meta["dwi_volumes"] == 3
    trace = str(tmp_path / "trace.nii.gz")
    nib.save(nib.Nifti1Image(expected.astype(np.float32), nib.load(path).affine), trace)
    np.testing.assert_array_equal(load_dwi(trace).data, load_nifti(trace).data)  # a 3-D trace loads as is
    # zero background stays exactly zero (it came out as max·1e-6: the foreground crop kept the whole field of
    # view and z-scoring took the background in)
    vols = nib.load(path).get_fdata().astype(np.float32)
    vols[:3] = 0.0
    nib.save(nib.Nifti1Image(vols, nib.load(path).affine), path)
    assert np.all(load_dwi(path).data[-3:] == 0.0) and np.all(load_dwi(path).data[:-3] > 0)  # stored LAS


@pytest.mark.parametrize(("bvals", "message"), [(None, "without a .bval file"), ("0 1000", "2 b-values for 3"),
                                               ("0 0 50", "no diffusion-weighted volume"), ("0 x 1", "unreadable")])
def test_dwi_series_without_usable_b_values_is_refused(tmp_path, bvals, message):
    from neuromoe.io.nifti import load_dwi

    path = _dwi_series(tmp_path, [0, 1000, 1000])
    side = tmp_path / "sub-01_dwi.bval"
    if bvals is None:
        side.unlink()
    else:
        side.write_text(bvals)
    with pytest.raises(InputError, match=message):
        load_dwi(path)
    with pytest.raises(InputError, match="expected 3D"):
        load_nifti(path)  # any other role stays 3-D only


@pytest.mark.parametrize("gz", [False, True])
def test_a_garbage_extension_size_is_refused_before_nibabel_allocates_it(tmp_path, gz):
    """Found by the slow fuzz test: the extension flag set and a ~1 GB extension size in a 38 kB file made
    nibabel allocate 1 GB before the file was refused."""
    import tracemalloc

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 24, 20)).astype(np.float32), np.eye(4)),
             tmp_path / "base.nii")
    raw = bytearray((tmp_path / "base.nii").read_bytes())
    raw[110], raw[348] = 184, 1  # the fuzz case: vox_offset (float32 at 108) becomes huge, the extension flag set
    path = tmp_path / ("bad.nii.gz" if gz else "bad.nii")
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="header extension at byte 352 declares"):
            load_nifti(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 8 * 2**20
