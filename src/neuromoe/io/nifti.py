"""NIfTI-1/-2 loading and saving with header guards, RAS+ reorientation and world-space resampling.

Header problems (dims, declared size, affine) are caught *before* the data is read so a corrupt or
hostile file never allocates memory; every user-fixable problem becomes an :class:`InputError`.
Scaling: nibabel applies ``scl_slope``/``scl_inter``; a slope of 0 or NaN means "no scaling" (NIfTI spec);
an infinite slope or intercept is a corrupt header and is refused.
"""

from __future__ import annotations

import gzip
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage

from neuromoe.errors import InputError
from neuromoe.io.atomic import atomic_path

MAX_VOXELS = 512**3
# one slice stored as (X, Y, 1), or a 2x2x2 "volume", is 3-D in name only and would get a brain age or a lesion
# mask; a true 2-D file is refused, so these are too. Voxels, not mm: the thinnest real volumes (thick-slice
# clinical scans, partial-FOV BOLD, nibabel's 3-slice functional.nii) must still load
MIN_AXIS_VOXELS = 3
_IDENTIFYING = ("descrip", "aux_file", "db_name", "intent_name")


@dataclass
class Image:
    """A RAS+ float32 volume plus what is needed to write results back on the original grid."""

    data: np.ndarray
    affine: np.ndarray
    orig_affine: np.ndarray
    orig_shape: tuple[int, ...]
    orig_ornt: np.ndarray
    header: Any = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _open_header(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise InputError("file not found", path=path, fix="check the path")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise InputError("not a NIfTI file name", path=path, fix="give a .nii or .nii.gz file")
    _check_extensions(path)
    quiet = nib.imageglobals.logger.disabled
    nib.imageglobals.logger.disabled = True  # nibabel logs its silent header "fixes" to stderr
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot read NIfTI header ({type(exc).__name__})", path=path,
                         fix="re-export the image as NIfTI-1/-2") from None
    finally:
        nib.imageglobals.logger.disabled = quiet
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise InputError("not a NIfTI image", path=path, fix="convert it to NIfTI (e.g. dcm2niix)")
    return img


def _check_extensions(path: Path) -> None:
    """Walk the header extensions' size fields before nibabel reads them: it allocates each declared size, and
    one flipped byte (a 1 GB size in a 38 kB file) cost 1 GB of memory before the file was refused. A file
    that cannot be read this far (a folder, not gzip, truncated) is left to nibabel's error and ours."""
    try:
        _walk_extensions(path)
    except (OSError, EOFError, zlib.error, ValueError):
        return


def _walk_extensions(path: Path) -> None:
    with nib.openers.ImageOpener(str(path)) as fh:
        head = fh.read(552)
    if len(head) < 352:
        return  # too short for a header: nibabel's own error says so
    # the header class and byte order nibabel will use: the NIfTI-1 magic first, then sizeof_hdr 540; the order
    # from dim[0] before sizeof_hdr (a file with a flipped sizeof_hdr is still read, by its dim[0])
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        if cls.may_contain_header(head):
            hdr_size = cls.sizeof_hdr
            order = cls.guessed_endian(np.ndarray(shape=(), dtype=cls.template_dtype, buffer=head[:hdr_size]))
            break
    else:
        return  # not a NIfTI header: nibabel refuses it
    if len(head) <= hdr_size or head[hdr_size] == 0:
        return  # no extension flag
    # extensions end where the voxel data starts (NIfTI-1: float32 vox_offset at byte 108, NIfTI-2: int64 at 168)
    offset = float(np.frombuffer(head[108:112], f"{order}f4")[0]) if hdr_size == 348 else float(
        np.frombuffer(head[168:176], f"{order}i8")[0])
    end = offset if np.isfinite(offset) else float("inf")
    pos, size = hdr_size + 4, None
    with nib.openers.ImageOpener(str(path)) as fh:
        while pos + 8 <= end:
            fh.seek(pos)
            field_bytes = fh.read(8)
            if len(field_bytes) < 8:
                return  # the flag without an extension: nibabel reads none
            esize = int(np.frombuffer(field_bytes[:4], f"{order}i4")[0])
            if size is None or pos + esize > size:
                size = _gz_size(path, pos + max(esize, 8)) if path.name.endswith(".gz") else path.stat().st_size
            if esize < 8 or pos + esize > size:
                raise InputError(f"header extension at byte {pos} declares {esize} bytes, the file holds {size} "
                                 "(corrupt header)", path=path, fix="re-copy or re-export the file")
            pos += esize
            if pos + 8 > size:
                return


def _core_shape(shape: tuple[int, ...], allow_4d: bool) -> tuple[int, ...]:
    """``shape`` without trailing singleton axes beyond the 3rd (4th with ``allow_4d``): converters write a
    3-D volume as (X, Y, Z, 1) or (X, Y, Z, 1, 1)."""
    core = tuple(int(s) for s in shape)
    while len(core) > (4 if allow_4d else 3) and core[-1] == 1:
        core = core[:-1]
    return core


def _check_header(img: nib.Nifti1Image, path: Path, allow_4d: bool, max_voxels: int) -> None:
    shape = img.header.get_data_shape()
    core = _core_shape(shape, allow_4d)
    if len(core) not in (3, 4) or (len(core) == 4 and not allow_4d):
        want = "3D or 4D" if allow_4d else "3D"
        raise InputError(f"image has {len(shape)} dimensions {shape}, expected {want}", path=path,
                         fix="give a single 3D volume" if not allow_4d else "give a 3D/4D volume")
    if any(int(s) <= 0 for s in shape):
        raise InputError(f"zero or negative dimension in {shape}", path=path, fix="repair the header dims")
    if int(np.prod([int(s) for s in shape], dtype=np.int64)) > max_voxels:
        raise InputError(f"declared size {shape} exceeds {max_voxels} voxels", path=path,
                         fix="crop/downsample the image or raise max_voxels")
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise InputError(f"voxel type {dtype} is not a real scalar (complex/RGB)", path=path,
                         fix="convert it to a real-valued scalar image (e.g. magnitude or one channel)")
    # nibabel silently "fixes" some header fields on load (inf slope -> NaN, pixdim 0 -> 1 mm): check raw ones
    with nib.openers.ImageOpener(str(path)) as fh:
        raw = type(img.header).from_fileobj(fh, check=False)
    slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
    if np.isinf(slope) or (np.isfinite(slope) and slope != 0 and not np.isfinite(inter)):
        raise InputError(f"scaling scl_slope={slope}, scl_inter={inter} is not finite", path=path,
                         fix="set scl_slope to 1 (or 0/NaN for no scaling) and scl_inter to 0")
    if int(raw["sform_code"]) == 0:  # the affine then comes from qform/pixdim
        zooms = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
        if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
            raise InputError(f"voxel size pixdim[1:4]={zooms.tolist()} is zero, negative or non-finite", path=path,
                             fix="write the true voxel size into the header (or set an sform)")
    if int(img.dataobj.offset) < 0:
        raise InputError(f"vox_offset {img.dataobj.offset} is negative", path=path, fix="repair the header")
    need = int(img.dataobj.offset) + int(np.prod([int(x) for x in shape], dtype=np.int64)) * dtype.itemsize
    have = _gz_size(path, need) if path.name.endswith(".gz") else path.stat().st_size
    if have < need:  # refuse before nibabel allocates the declared size
        raise InputError(f"file holds {have} bytes but its header declares {need} (truncated file or corrupt "
                         "dims/datatype/vox_offset)", path=path, fix="re-copy or re-export the file")
    aff = img.affine
    if aff is None or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError("affine is non-finite or singular", path=path, fix="repair the sform/qform")
    if np.isnan(ornt.io_orientation(aff)).any():  # e.g. one axis 1e38 × the others: no RAS+ reorientation
        raise InputError("affine is degenerate (axes have no unique orientation)", path=path,
                         fix="repair the sform/qform")
    thin = [k for k in range(3) if int(shape[k]) < MIN_AXIS_VOXELS]
    if thin:
        raise InputError(f"image has {int(shape[thin[0]])} voxel(s) along axis {thin[0]} of {tuple(shape)}: one or "
                         f"two slices, not a 3D volume (need >= {MIN_AXIS_VOXELS} on every axis)", path=path,
                         fix="give the whole 3D scan, not a single slice")


_MM_PER_UNIT = {1: 1000.0, 2: 1.0, 3: 1e-3}  # NIfTI xyzt_units spatial codes: metre, mm, micron


def _to_mm(img: nib.Nifti1Image) -> np.ndarray:
    """World scaling from the header's spatial unit (xyzt_units) to mm; 'unknown' (or an invalid code, which
    nibabel's get_xyzt_units cannot even name) is read as mm, as every neuroimaging tool does. Outputs keep the
    input's own affine and units (save_nifti)."""
    s = _MM_PER_UNIT.get(int(img.header["xyzt_units"]) % 8, 1.0)
    return np.diag([s, s, s, 1.0])


def _gz_size(path: Path, need: int, chunk: int = 1 << 20) -> int:
    """Uncompressed size of a .gz, at least up to ``need`` bytes, in bounded memory.

    The gzip trailer (ISIZE, size mod 2**32) answers at once for an intact file; when it says "too short"
    (truncated file, multi-member or bgzip files whose last member is small) the stream is counted.
    """
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() >= 4:
            fh.seek(-4, 2)
            if need < 2**32 and int.from_bytes(fh.read(4), "little") >= need:
                return need
    count = 0
    try:
        with gzip.open(path, "rb") as gz:
            while count < need:
                block = gz.read(min(chunk, need - count))
                if not block:
                    break
                count += len(block)
    except (EOFError, OSError, zlib.error):
        pass
    return count


def inspect_nifti(path: str | Path, *, allow_4d: bool = True, max_voxels: int = MAX_VOXELS) -> dict[str, Any]:
    """Header facts without reading the data: shape, spacing, orientation codes, dtype, version."""
    path = Path(path)
    img = _open_header(path)
    _check_header(img, path, allow_4d, max_voxels)
    return {
        "path": str(path), "version": "NIfTI-2" if isinstance(img, nib.Nifti2Image) else "NIfTI-1",
        "shape": [int(s) for s in img.shape],
        "spacing": [round(float(z), 6) for z in np.linalg.norm((_to_mm(img) @ img.affine)[:3, :3], axis=0)],
        "orientation": "".join(nib.aff2axcodes(img.affine)), "dtype": str(img.get_data_dtype()),
        "codes": [int(img.header["qform_code"]), int(img.header["sform_code"])],
    }


def load_nifti(path: str | Path, *, allow_4d: bool = False, max_voxels: int = MAX_VOXELS,
               allow_empty: bool = False, warn: bool = True) -> Image:
    """Load a NIfTI as a RAS+ float32 :class:`Image`; every bad input raises :class:`InputError`. With ``warn``
    a header without orientation is said on stderr (it is read, as every reader does, but may be mirrored)."""
    path = Path(path)
    img = _open_header(path)
    _check_header(img, path, allow_4d, max_voxels)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"data block unreadable or truncated ({type(exc).__name__})", path=path,
                         fix="re-copy or re-export the file") from None
    if path.name.endswith(".gz"):  # nibabel stops at the end of the data block: check the gzip CRC too
        try:
            with gzip.open(path, "rb") as gz:
                while gz.read(1 << 20):  # bounded memory
                    pass
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(f"compressed data is corrupt ({type(exc).__name__}: {exc})", path=path,
                             fix="re-copy or re-export the file") from None
    file_shape = tuple(int(x) for x in img.shape)
    data = data.reshape(_core_shape(data.shape, allow_4d))
    if not np.all(np.isfinite(data)):
        raise InputError(f"{int((~np.isfinite(data)).sum())} NaN/Inf voxels", path=path,
                         fix="replace non-finite voxels (e.g. fslmaths -nan)")
    if not np.any(data) and not allow_empty:
        raise InputError("image is all zeros", path=path, fix="check the export; the volume is empty")
    start = ornt.io_orientation(img.affine)
    ras = ornt.apply_orientation(data, start)
    affine = _to_mm(img) @ img.affine @ ornt.inv_ornt_aff(start, data.shape)
    header = img.header.copy()
    for key in _IDENTIFYING:
        if key in header:  # NIfTI-2 has no db_name
            header[key] = b""
    if warn and int(img.header["qform_code"]) <= 0 and int(img.header["sform_code"]) <= 0:
        _warn_no_orientation(path, img.affine)  # after every check: a refused file gets its one error line only
    return Image(np.ascontiguousarray(ras, dtype=np.float32), affine, img.affine.copy(), file_shape,
                 start, header, str(path))


_NO_ORIENTATION_NAMED = 3  # files named per process; a cohort of such files says so once more, then nothing
_no_orientation: set[str] = set()


def _warn_no_orientation(path: Path, affine: np.ndarray) -> None:
    if str(path) in _no_orientation or len(_no_orientation) > _NO_ORIENTATION_NAMED:
        return
    _no_orientation.add(str(path))
    if len(_no_orientation) > _NO_ORIENTATION_NAMED:
        print("neuromoe: warning: more headers without orientation; `neuromoe info FILES` lists them",
              file=sys.stderr)
        return
    print(f"neuromoe: warning: {path}: no orientation in the header (qform_code = sform_code = 0): read as "
          f"{''.join(nib.aff2axcodes(affine))}, left and right may be swapped — fix: re-export it with its "
          "orientation (e.g. from the DICOMs with dcm2niix)", file=sys.stderr)


def bval_path(path: str | Path) -> Path:
    """The b-value sidecar of a DWI series, as BIDS and dcm2niix name it: ``sub-01_dwi.nii.gz`` → ``sub-01_dwi.bval``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".gz").removesuffix(".nii") + ".bval")


def load_dwi(path: str | Path, *, max_voxels: int = MAX_VOXELS) -> Image:
    """A diffusion-weighted input as one 3-D volume.

    Lesion datasets give DWI as a 3-D trace (b = 1000) image, which loads as is. A 4-D series (BIDS ``dwi/``,
    dcm2niix) becomes the trace-weighted image readers use for acute stroke: the geometric mean of the
    volumes of the shell nearest b = 1000 (b-values from the ``.bval`` sidecar, shells rounded to 100 s/mm²;
    the geometric mean of orthogonal directions is the isotropic, direction-free DWI). The mask of such an
    input is written as one 3-D volume on its grid.
    """
    path = Path(path)
    img = load_nifti(path, allow_4d=True, max_voxels=max_voxels)
    if img.data.ndim == 4 and img.data.shape[3] == 1 and not bval_path(path).is_file():
        # converters write a 3-D trace image as (X, Y, Z, 1); with a .bval it is a one-volume series
        img = replace(img, data=img.data[..., 0])
    if img.data.ndim == 3:
        return img
    sidecar = bval_path(path)
    fix = f"put its b-values next to it as {sidecar.name} (BIDS), or give the 3-D b=1000 trace image"
    if not sidecar.is_file():
        raise InputError(f"4-D DWI series ({img.data.shape[3]} volumes) without a .bval file", path=path, fix=fix)
    try:
        bvals = np.loadtxt(sidecar, ndmin=1, dtype=np.float64).ravel()
    except ValueError:
        raise InputError("b-values unreadable (expected numbers separated by spaces)", path=sidecar, fix=fix) from None
    if bvals.size != img.data.shape[3] or not np.all(np.isfinite(bvals)):
        raise InputError(f"{bvals.size} b-values for {img.data.shape[3]} volumes", path=sidecar,
                         fix="give the .bval file written with this series")
    shells = np.round(bvals, -2)
    weighted = np.unique(shells[shells >= 500])
    if weighted.size == 0:
        raise InputError(f"no diffusion-weighted volume (largest b-value {bvals.max():g} s/mm²)", path=path,
                         fix="give a series with b ≈ 1000 volumes, or the 3-D trace image")
    shell = weighted[np.argmin(np.abs(weighted - 1000.0))]
    vols = img.data[..., shells == shell]
    floor = max(float(vols.max()), 1e-12) * 1e-6  # a voxel that is 0 in some volumes stays ~0
    trace = np.exp(np.log(np.maximum(vols, floor)).mean(axis=-1)).astype(np.float32)
    trace[~(vols > 0).any(axis=-1)] = 0.0  # background exactly 0, as cropping and z-scoring expect
    return replace(img, data=np.ascontiguousarray(trace), meta={**img.meta, "dwi_shell": float(shell),
                                                                   "dwi_volumes": int(vols.shape[-1])})


def load_role(path: str | Path, role: str) -> Image:
    """An image of one manifest role: :func:`load_dwi` for ``dwi`` (3-D, or 4-D with b-values), else 3-D only.
    A ``mask`` may be all zeros: a lesion-free scan (a healthy control, a case whose lesion resolved) is a
    valid case, scored by the metrics' empty-mask rules."""
    return load_dwi(path) if role == "dwi" else load_nifti(path, allow_empty=role == "mask")


def save_nifti(data: np.ndarray, path: str | Path, *, like: Image | None = None,
               affine: np.ndarray | None = None, dtype: Any = None) -> Path:
    """Write ``data`` (RAS+, on ``like``'s grid or with ``affine``) atomically in the original orientation."""
    path = Path(path)
    img = nifti_image(data, path, like=like, affine=affine, dtype=dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def nifti_image(data: np.ndarray, path: str | Path, *, like: Image | None = None,
                affine: np.ndarray | None = None, dtype: Any = None) -> nib.Nifti1Image:
    """The image :func:`save_nifti` writes to ``path``, for callers that write several files as one set."""
    arr = np.asarray(data)
    if like is not None:
        back = ornt.ornt_transform(ornt.axcodes2ornt(("R", "A", "S")), like.orig_ornt)
        arr = ornt.apply_orientation(arr, back)
        extra = tuple(like.orig_shape[arr.ndim:])
        if extra and all(d == 1 for d in extra) and arr.shape == tuple(like.orig_shape[:arr.ndim]):
            arr = arr.reshape(like.orig_shape)  # e.g. an (X, Y, Z, 1) input gets an (X, Y, Z, 1) mask
        out_aff = like.orig_affine
    elif affine is not None:
        out_aff = np.asarray(affine, dtype=np.float64)
    else:
        raise InputError("save_nifti needs like= or affine=", path=path, fix="pass the source Image")
    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype or arr.dtype), out_aff)
    if like is not None and like.header is not None:
        # the input's own qform/sform and codes: every reader (qform- or sform-first, code-aware) then puts
        # the output exactly where it puts the input
        src = like.header
        img.header.set_sform(src.get_sform(), code=int(src["sform_code"]))
        img.header.set_qform(src.get_qform(), code=int(src["qform_code"]))
        img.header["xyzt_units"] = src["xyzt_units"]  # raw: an invalid code must not break writing
    else:
        img.header.set_sform(out_aff, code=1)
        img.header.set_qform(out_aff, code=1)
    return img


def resample_to_grid(data: np.ndarray, src_affine: np.ndarray, dst_shape: tuple[int, ...],
                     dst_affine: np.ndarray, order: int = 1) -> np.ndarray:
    """Resample ``data`` (voxel→world ``src_affine``) onto ``dst_shape``/``dst_affine`` in world space.

    ``order`` > 1 (B-splines) rings past an edge: on an exactly zero background (a brain-extracted scan, a template)
    voxels beyond the head became non-zero and the foreground box grew by a voxel. The spline's values (within the
    input's range) are taken where every input voxel linear interpolation reads is non-zero, the linear ones
    elsewhere: an image with a noise floor is all spline, the edge of a zero background is what it was."""
    a = np.asarray(data, dtype=np.float32)
    vox = np.linalg.inv(src_affine) @ dst_affine

    def onto(x: np.ndarray, k: int) -> np.ndarray:
        return ndimage.affine_transform(x, vox[:3, :3], vox[:3, 3], output_shape=tuple(dst_shape[:3]), order=k,
                                        mode="constant", cval=0.0)

    if order <= 1 or a.size == 0:
        return onto(a, order)
    spline = np.clip(onto(a, order), a.min(), a.max())
    if (a != 0).all():  # a noise floor everywhere: nothing to ring into
        return spline
    inside = onto((a != 0).astype(np.float32), 1) > 1.0 - 1e-4
    return np.where(inside, spline, onto(a, 1)).astype(np.float32)
