"""Preprocessing built from MONAI transforms, an on-disk cache, and a parallel, shardable cohort runner.

The output affine of every step is tracked (MONAI ``MetaTensor``) so a prediction on the preprocessed
grid can be put back on the input grid with :func:`neuromoe.io.nifti.resample_to_grid`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import (
    NormalizeIntensity,
    ResizeWithPadOrCrop,
    ScaleIntensityRangePercentiles,
    SpatialResample,
)
from scipy import ndimage, special, stats

from neuromoe.errors import ConfigError, InputError
from neuromoe.io.atomic import atomic_path
from neuromoe.io.nifti import MAX_VOXELS, Image, bval_path, load_role, resample_to_grid
from neuromoe.io.table import content_sample, write_failures

IMAGE_ROLES = ("t1", "t1c", "t2", "flair", "dwi")
NORMS = ("zscore", "rank", "percentile", "none")
INTERPOLATIONS = {"linear": 1, "cubic": 3}  # spline order of images onto the output grid


def _numbers(name: str, value: Any, n: int, kind: type) -> tuple | None:
    """``value`` as ``n`` positive numbers of ``kind`` (a scalar means isotropic), or None; else one ConfigError."""
    if n == 3 and (value is None or value in ("none", "None")):  # as config.py reads none for optional fields
        return None
    vals = [value] * n if isinstance(value, (int, float)) else value
    ok = isinstance(vals, (list, tuple)) and len(vals) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in vals)
    if ok and kind is int:
        ok = all(float(v).is_integer() for v in vals)
    if not ok or (name != "percentiles" and min(vals) <= 0):
        raise ConfigError(f"preprocessing {name} must be {n} {'' if name == 'percentiles' else 'positive '}"
                          f"{'whole ' if kind is int else ''}numbers"
                          f"{' or null' if n == 3 else ''}, got {value!r}", fix=f"e.g. --set preprocessing.{name}="
                          + ("[2,2,2]" if name == "spacing" else "[64,64,64]" if name == "shape" else "[1,99]"))
    return tuple(kind(v) for v in vals)


@dataclass
class PreprocSpec:
    """What is done to every volume; stored in each model's config.json so prediction replays it."""

    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    crop_foreground: bool = True
    crop_margin: int = 2
    # "zscore" within the non-zero voxels, "rank" (their ranks mapped to a standard normal: the same for
    # any monotonic intensity change, e.g. another scanner's contrast gamma), "percentile" clip+scale to
    # [0, 1], or "none"
    norm: str = "zscore"
    percentiles: tuple[float, float] = (1.0, 99.0)
    shape: tuple[int, int, int] | None = (64, 64, 64)
    register: bool = False
    # Before resampling to a coarser ``spacing``, blur each image axis so its effective resolution (FWHM)
    # becomes the target spacing whatever the input voxel size: without it a 1.5 mm scan reached the
    # 4 mm grid sharper than a 3 mm one and a brain-age model read it as 8.7 y younger
    # (docs/experiments.md, "Site shifts"). Specs stored without the key (older models) replay False.
    antialias: bool = True
    # Interpolation of images onto the output grid: "cubic" (B-spline) or "linear" (masks: nearest). Linear
    # interpolation blurs by an amount that depends on where the output voxels fall between the input's (none at
    # all where the grids coincide): the same subjects at 2 mm reached the 4 mm grid sharper than at 3 mm and a
    # brain-age model read them 3.4 y younger (docs/experiments.md, "Voxel size"). Specs stored without the key
    # (older models) replay "linear".
    interpolation: str = "cubic"
    # The foreground (crop box, normalisation statistics, what is kept) is the head: the largest connected region
    # above HEAD_FRACTION of the peak, holes filled. Off (the non-zero voxels), a scanner's noise floor made the
    # whole field of view foreground: the same head with and without one got other z-score statistics and another
    # window (docs/reliability.md, "Noise floor"). Specs stored without the key replay False.
    head_mask: bool = False
    # N4 bias-field correction (SimpleITK) of every image on the output grid within its head, before the head's
    # statistics: a smooth coil field exp(0.3·g) moved the demo's lesion volumes by +93 to +220 % and its brain ages
    # by 8.9 y on average (4.0 y with it; docs/reliability.md, "Bias fields"). ~0.3 s an image at 4 mm, ~1 s at 3 mm.
    # Specs stored without the key replay False.
    bias_correct: bool = False

    def __post_init__(self) -> None:
        if self.orientation != "RAS":
            raise ConfigError(f"orientation {self.orientation!r} unsupported", fix="use 'RAS'")
        if self.norm not in NORMS:
            raise ConfigError(f"norm {self.norm!r} unknown", fix=f"use one of {', '.join(NORMS)}")
        self.spacing = _numbers("spacing", self.spacing, 3, float)
        self.shape = _numbers("shape", self.shape, 3, int)
        self.percentiles = _numbers("percentiles", self.percentiles, 2, float)
        if not (0 <= self.percentiles[0] < self.percentiles[1] <= 100):
            raise ConfigError(f"preprocessing percentiles {list(self.percentiles)} invalid", fix="e.g. [1, 99]")
        if isinstance(self.crop_margin, bool) or not isinstance(self.crop_margin, int) or self.crop_margin < 0:
            raise ConfigError(f"preprocessing crop_margin must be a whole number of voxels >= 0, got {self.crop_margin!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"preprocessing interpolation {self.interpolation!r} unknown",
                              fix=f"use one of {', '.join(INTERPOLATIONS)}")
        for name in ("crop_foreground", "register", "antialias", "head_mask", "bias_correct"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"preprocessing {name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {sorted(unknown)}", fix=f"use only {sorted(known)}")
        return cls(**{"antialias": False, "interpolation": "linear", **d})

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None) -> PreprocSpec:
        """The defaults with a family config's ``preprocessing:`` keys on top (what each family stores)."""
        return cls.from_dict({**cls().to_dict(), **(overrides or {})})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Preprocessed:
    """Channels-first array on the output grid and the affine mapping that grid to world."""

    data: np.ndarray
    affine: np.ndarray
    # voxel -> world of the first role's INPUT grid in the same world as ``affine`` (the MNI-registered
    # affine when ``spec.register``): what outputs are resampled back onto
    ref_affine: np.ndarray | None = None
    # mm spanned by the head (``_foreground(..., head=True)``) of the first image per axis of the output grid,
    # before any crop or pad: what a check that the scan can hold a brain reads. The non-zero voxels of the output
    # cannot tell it: a scanner noise floor made a 60 mm ball span the whole field of view
    extent_mm: list[float] | None = None


def antialias_sigma(affine: np.ndarray, spacing: tuple[float, float, float] | None,
                    interpolation: str = "cubic") -> np.ndarray:
    """Per-axis Gaussian sigma (in voxels of ``affine``) that brings the voxel size up to ``spacing``.

    A voxel of size ``v`` averages a box of width ``v`` (variance v²/12). With "cubic", which interpolates without
    blurring, the filter adds the variance a box of the target width has beyond it, (target² − v²)/12, so a scan at
    any finer voxel size reaches the target grid as a native one would. "linear" (older models) keeps the first
    rule, FWHM sqrt(target² − v²): its interpolation blurred by up to v²/4 more, depending on the grids' phase.
    A scan already at or above the target spacing is left alone.
    """
    vox = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    if spacing is None:
        return np.zeros(3)
    extra = np.clip(np.asarray(spacing) ** 2 - vox**2, 0.0, None)
    if interpolation == "linear":
        return np.sqrt(extra) / (2.0 * np.sqrt(2.0 * np.log(2.0))) / vox
    return np.sqrt(extra / 12.0) / vox


def _oblique(affine: np.ndarray, tol: float = 1e-4) -> bool:
    """Whether the voxel axes are rotated against the world axes (after reorientation to RAS)."""
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    rot = rot / np.linalg.norm(rot, axis=0)
    return not np.allclose(rot, np.diag(np.diag(rot)), atol=tol)


def _resample(mt: MetaTensor, spec: PreprocSpec, order: int) -> MetaTensor:
    """Onto ``spec.spacing``, on a grid aligned with the world axes whose voxel centres sit at whole multiples of
    the spacing in world coordinates. Anchored at the input's first voxel (MONAI's ``Spacing``), the grid's phase
    followed the field of view: the same head padded by 3, 6 or 9 mm was sampled elsewhere and DenseFormer read it
    as 1.6-3 years older or younger. World-aligned, an oblique acquisition or a registered image (whose world is
    MNI) also reaches the model in world orientation, the same array as an axis-aligned scan of the same anatomy.
    An axis-aligned grid without a target spacing is kept as it is."""
    aff = np.asarray(mt.affine, dtype=np.float64)
    if spec.spacing is None and not (spec.register or _oblique(aff)):
        return mt
    step = np.asarray(spec.spacing or np.linalg.norm(aff[:3, :3], axis=0), dtype=np.float64)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in mt.shape[1:4]], indexing="ij")).reshape(3, -1)
    world = aff[:3, :3] @ corners + aff[:3, 3:]
    lo = np.floor(world.min(1) / step + 1e-6) * step
    size = np.floor((world.max(1) - lo) / step + 1e-6).astype(int) + 1
    dst = np.diag([*step, 1.0])
    dst[:3, 3] = lo
    if order > 1:  # scipy's B-splines, kept off an exactly zero background (resample_to_grid)
        arr = np.stack([resample_to_grid(c, np.asarray(mt.affine, dtype=np.float64), tuple(size), dst, order)
                        for c in mt.as_tensor().numpy()])
        return MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(dst))
    return SpatialResample(mode="nearest" if order == 0 else "bilinear", padding_mode="zeros")(
        mt, dst_affine=torch.as_tensor(dst), spatial_size=tuple(int(n) for n in size))


def _spatial(mt: MetaTensor, spec: PreprocSpec, bbox: tuple | None) -> MetaTensor:
    """The resampled ``mt`` cropped to the foreground box ``bbox`` and padded/cropped to ``spec.shape``."""
    if bbox is not None and spec.shape is not None:
        # the output window is centred on the foreground box, taken whole even where its margin reaches past
        # the array (zeros there): clipping it at the edge moved the window when a scan's field of view ended
        # near the head, so the same head with a few more empty slices reached the model a voxel off
        start, end = (np.asarray(v) for v in bbox)
        size, shape = end - start, np.asarray(spec.shape)
        lo = start + np.where(size >= shape, (size - shape) // 2, -((shape - size) // 2))
        return _window(mt, lo, lo + shape)
    if bbox is not None:
        n = np.asarray(mt.shape[1:])
        mt = _window(mt, np.maximum(bbox[0], 0), np.minimum(bbox[1], n))
    if spec.shape is not None:
        mt = ResizeWithPadOrCrop(spec.shape)(mt)
    return mt


def _window(mt: MetaTensor, lo: np.ndarray, hi: np.ndarray) -> MetaTensor:
    """Voxels ``[lo, hi)`` of ``mt`` (zeros outside the array), with the affine of that window."""
    arr = mt.as_tensor()
    n = arr.shape[1:]
    sl = tuple(slice(int(max(a, 0)), int(min(b, d))) for a, b, d in zip(lo, hi, n, strict=True))
    pad = [int(p) for a, b, d in reversed(list(zip(lo, hi, n, strict=True))) for p in (max(-a, 0), max(b - d, 0))]
    shift = np.eye(4)
    shift[:3, 3] = lo
    return MetaTensor(torch.nn.functional.pad(arr[(slice(None), *sl)], pad).clone(),
                      affine=torch.as_tensor(np.asarray(mt.affine) @ shift))


def preprocess_image(image: Image | dict[str, Image], spec: PreprocSpec) -> Preprocessed:
    """Run ``spec`` on one image, or on several roles at once (on the first role's grid; ``mask`` nearest)."""
    images = image if isinstance(image, dict) else {"image": image}
    images = {r: img if r == "mask" else _without_offset(img) for r, img in images.items()}
    for role, img in images.items():
        _say_if_normalised(role, img)
    roles = list(images)
    ref = images[roles[0]]
    if spec.register:
        from neuromoe.data.registration import register_to_mni

        ref_aff = register_to_mni(ref)
    else:
        ref_aff = ref.affine
    _check_output_grid(ref, ref_aff, spec)
    chans = []
    for role in roles:
        img = images[role]
        _check_content(role, img)
        if role != roles[0]:
            _check_overlap(img, ref, role, roles[0])
        same = img.data.shape[:3] == ref.data.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-4)
        arr = img.data
        # each image is blurred on its own grid, for its own voxel size, before it joins the reference grid:
        # one blur from the reference's voxel size over-smoothed a coarser image and let a finer one alias
        # (`segment --reference flair` with a 1.5 mm FLAIR and a 3 mm T1 changed the lesion volume by 13 %)
        # (in the registered world of ``ref_aff``: registration may scale the head, and with it every voxel)
        own = ref_aff if same else ref_aff @ np.linalg.inv(ref.affine) @ img.affine
        sigma = antialias_sigma(own, spec.spacing, spec.interpolation) if spec.antialias else np.zeros(3)
        if role != "mask" and sigma.max() > 0.05:
            arr = ndimage.gaussian_filter(np.asarray(arr, dtype=np.float32), [*sigma, *[0.0] * (arr.ndim - 3)],
                                          mode="nearest")
        if not same:
            arr = resample_to_grid(arr, img.affine, ref.data.shape, ref.affine,
                                   order=0 if role == "mask" else INTERPOLATIONS[spec.interpolation])
        chans.append(arr)
    affine = torch.as_tensor(ref_aff, dtype=torch.float64)
    imgs = [i for i, r in enumerate(roles) if r != "mask"]
    masks = [i for i, r in enumerate(roles) if r == "mask"]
    out: dict[int, np.ndarray] = {}
    out_aff = None
    bbox = extent = None
    for group, mode in ((imgs, "bilinear"), (masks, "nearest")):
        if not group:
            continue
        mt = _resample(MetaTensor(torch.as_tensor(np.stack([chans[i] for i in group])), affine=affine), spec,
                       INTERPOLATIONS[spec.interpolation] if mode == "bilinear" else 0)
        full = mt.as_tensor().numpy()
        # each image's head threshold from its whole field of view, so the window and the statistics agree
        thresholds = [_head_threshold(c) if spec.head_mask or k == 0 else None for k, c in enumerate(full)] \
            if mode == "bilinear" else [None]
        if mode == "bilinear" and spec.bias_correct:
            full = _bias_corrected(mt, thresholds)
            thresholds = [_head_threshold(c) if t is not None else None for c, t in zip(full, thresholds, strict=True)]
        fg = _foreground(full[0], spec.head_mask, thresholds[0]) \
            if mode == "bilinear" or (spec.crop_foreground and bbox is None) else None
        if mode == "bilinear":  # the head of the first image, computed once when it is the foreground too
            head = fg if spec.head_mask else _foreground(full[0], True, thresholds[0])
            extent = _extent_mm(head, np.asarray(mt.affine, dtype=np.float64))
        if spec.crop_foreground and bbox is None:
            bbox = _box(fg & (full[0] > 0), spec.crop_margin)
        mt = _spatial(mt, spec, bbox if spec.crop_foreground else None)
        arr = mt.as_tensor().numpy().astype(np.float32)
        if mode == "bilinear":
            arr = np.stack([_normalise(c, spec, t) for c, t in zip(arr, thresholds, strict=True)])
        for k, i in enumerate(group):
            out[i] = arr[k]
        out_aff = np.asarray(mt.affine, dtype=np.float64)
    return Preprocessed(np.stack([out[i] for i in range(len(roles))]), out_aff, np.asarray(ref_aff, dtype=np.float64),
                        extent)


def _bias_corrected(mt: MetaTensor, thresholds: list[float | None]) -> np.ndarray:
    """Each channel of ``mt`` (in place) divided by its N4 field, fitted over its head (:func:`_foreground`)."""
    from neuromoe.data.n4 import n4_correct

    full = mt.as_tensor().numpy()  # shares ``mt``'s memory: the window is cut from the corrected images
    voxel = np.linalg.norm(np.asarray(mt.affine, dtype=np.float64)[:3, :3], axis=0)
    for k, c in enumerate(full):
        full[k] = n4_correct(c, _foreground(c, True, thresholds[k]), voxel)
    return full


# A flat background (at least this fraction of the voxels at exactly the image's minimum) at a non-zero level is an
# offset: a rescale intercept (scl_inter), a constant a converter added, a z-scoring. BACKGROUND_FRACTION alone
# made it a cliff: on the MNI template an intercept of 0.09 % of the peak was background, one of 0.11 % made the
# whole field of view foreground (crop and z-score statistics), and a predicted brain age moved by 2.6 years.
# A scanner's noise floor has no such plateau, and an exactly zero background needs no shift: an image that has
# one already (a brain-extracted scan z-scored and clipped low) keeps it, its plateau at the minimum is tissue.
PLATEAU_FRACTION = 0.01


def _without_offset(img: Image) -> Image:
    """``img`` with a flat background at a non-zero minimum moved to zero, so any offset gives the arrays the
    image without it gives (the z-score and rank normalisations are shift-invariant over the foreground)."""
    lo, enough = img.data.min(), PLATEAU_FRACTION * img.data.size
    if lo == 0 or np.count_nonzero(img.data == lo) < enough or np.count_nonzero(img.data == 0) >= enough:
        return img
    return replace(img, data=(img.data - lo).astype(img.data.dtype, copy=False))


_NEGATIVE_SAID: list[bool] = []  # said once per process: a cohort exported one way would repeat it per scan


def _say_if_normalised(role: str, img: Image) -> None:
    """Say, once, that an image with many negative voxels looks pre-normalised: MRI magnitudes are not negative,
    and preprocessing reads voxels above zero as the head (a z-scored scan lost its darker half from the crop box:
    MoME Dice 0.74 against 1.0 for the same scan as it came)."""
    if role == "mask" or _NEGATIVE_SAID:
        return
    negative = np.count_nonzero(img.data < 0) / img.data.size
    if negative < 0.05:
        return
    _NEGATIVE_SAID.append(True)
    print(f"neuromoe: {img.path or role}: {negative:.0%} of the voxels are "
          "negative, as in a pre-normalised (z-scored) image; preprocessing expects scans as they come from the "
          "scanner or brain-extracted, and may crop and normalise this one differently (said once)", file=sys.stderr)


def _check_output_grid(ref: Image, affine: np.ndarray, spec: PreprocSpec) -> None:
    """A header with wrong units (1000 mm voxels: metres written as mm) passes every header check, then
    resampling to ``spec.spacing`` asks for terabytes; refuse it here, naming the file."""
    if spec.spacing is None:
        return
    vox = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    out = np.ceil(np.asarray(ref.data.shape[:3]) * vox / np.asarray(spec.spacing, dtype=np.float64))
    if float(np.prod(out)) > MAX_VOXELS:
        raise InputError(f"{'×'.join(f'{v:g}' for v in vox.round(3))} mm voxels resampled to "
                         f"{'×'.join(f'{v:g}' for v in spec.spacing)} mm give {'×'.join(str(int(n)) for n in out)} "
                         "voxels", path=ref.path,
                         fix="check the header's voxel size and units (pixdim, xyzt_units): brain MRI voxels are "
                             "~0.5-5 mm")


def _check_content(role: str, img: Image) -> None:
    """A mask must be binary; an image must not be constant (nothing to normalise or learn from)."""
    lo, hi = float(img.data.min()), float(img.data.max())
    if role == "mask":
        labels = np.unique(img.data)
        if not np.isin(labels, (0.0, 1.0)).all():
            raise InputError(f"mask has labels {labels[:6].tolist()}{' …' if labels.size > 6 else ''}, expected 0/1",
                             path=img.path, fix="binarise the mask (e.g. fslmaths mask -bin mask_bin)")
    elif lo == hi:
        raise InputError(f"image is constant (every voxel = {lo:g})", path=img.path,
                         fix="check the export; the volume holds no image")


def _world_box(img: Image) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in img.data.shape[:3]], indexing="ij")).reshape(3, -1)
    world = img.affine[:3, :3] @ corners + img.affine[:3, 3:]
    return world.min(1), world.max(1)


def _check_overlap(img: Image, ref: Image, role: str, ref_role: str, min_fraction: float = 0.5) -> None:
    """Roles are resampled onto the reference grid in world space; that only makes sense if they are
    co-registered, i.e. their fields of view largely overlap."""
    (a0, a1), (b0, b1) = _world_box(img), _world_box(ref)
    inter = np.prod(np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None))
    frac = float(inter / max(min(np.prod(a1 - a0), np.prod(b1 - b0)), 1e-9))
    if frac < min_fraction:
        raise InputError(f"{role} field of view overlaps the {ref_role} by {frac:.0%} in world space: "
                         "the modalities are on different grids and not co-registered", path=img.path,
                         fix=f"co-register/resample the {role} onto the {ref_role} (e.g. FSL FLIRT, ANTs)")


def _extent_mm(head: np.ndarray, affine: np.ndarray) -> list[float]:
    """mm spanned by the ``head`` mask along each array axis; zeros if it is empty."""
    vox = np.linalg.norm(affine[:3, :3], axis=0)
    spans = []
    for axis in range(3):  # a projection per axis: np.argwhere held ~100 MB of indices for a 1 mm scan
        hit = np.flatnonzero(head.any(axis=tuple(b for b in range(3) if b != axis)))
        spans.append(float(hit[-1] - hit[0] + 1) * float(vox[axis]) if hit.size else 0.0)
    return spans


def _box(mask: np.ndarray, margin: int) -> tuple[list[int], list[int]] | None:
    """Bounding box of ``mask`` plus ``margin``; it may reach past the array."""
    nz = np.argwhere(mask)
    if nz.size == 0:
        return None
    return (nz.min(0) - margin).tolist(), (nz.max(0) + 1 + margin).tolist()


# Below a thousandth of the peak magnitude there is no MRI signal, only what lies on an exactly zero
# background: interpolation dust (~1e-15, which moved the box by a voxel between grids), a rescale intercept or
# a rounding offset. Counted as foreground, an offset of 2e-6 on the MNI template switched the crop from the
# head to the whole field of view and put the background into the z-score (a predicted brain age moved by
# 14 years). Scanner noise floors (a few % of white matter) stay above it.
BACKGROUND_FRACTION = 1e-3


def _above_dust(a: np.ndarray) -> np.ndarray:
    """Voxels above ``BACKGROUND_FRACTION`` of the peak magnitude (all False for an all-zero array). The peak is
    the 99.9th percentile of the non-zero magnitudes, not the maximum: one hot voxel at 1e6 on a brain of
    ~1,000 made every brain voxel background."""
    peak = _peak(a)
    return np.abs(a) > BACKGROUND_FRACTION * peak if peak > 0 else np.zeros(a.shape, bool)


def _peak(a: np.ndarray) -> float:
    """The 99.9th percentile of the non-zero magnitudes (0 for an all-zero array)."""
    mag = np.abs(a)
    nonzero = mag[mag > 0]
    return float(np.percentile(nonzero, 99.9)) if nonzero.size else 0.0


# The head stands well above this fraction of the peak (scalp, grey matter and even T1's CSF at 20-30 % of white
# matter); a scanner's noise floor (1-3 %) and the dust below BACKGROUND_FRACTION do not.
HEAD_FRACTION = 0.1


# A noise floor's magnitudes are Rayleigh-distributed (median 1.18 sigma). At HEAD_FRACTION of the peak alone, a
# floor of 7 % of the peak (a FLAIR at 1.25x the synthetic cohort's noisiest site) put a third of the background
# above the threshold, connected to the head: the mask spread over the field of view (MoME lesion volume +75 %, a
# brain age 20 y off; docs/reliability.md). At NOISE_SIGMAS sigma ~4 % of the background passes, specks too sparse
# to join the head; at the cohort's noise levels (2-4 % of the peak) the threshold stays HEAD_FRACTION.
NOISE_SIGMAS = 2.5
# The noise is read in the field of view's corners (a head is round, its box's corners are air), an eighth of each
# axis: a brain-extracted scan's corners are exactly zero, so no floor; corners above this fraction of the peak are
# tissue (a field of view cut inside the head), not noise.
NOISE_CORNER_LIMIT = 0.25


def _head_threshold(a: np.ndarray) -> float:
    """``HEAD_FRACTION`` of the peak, raised to ``NOISE_SIGMAS`` times the noise floor read in the corners when
    most corner voxels carry one."""
    mag = np.abs(a)
    peak = _peak(mag)
    sides = [(slice(0, max(2, n // 8)), slice(n - max(2, n // 8), n)) for n in mag.shape]
    corners = np.concatenate([mag[x, y, z].ravel() for x in sides[0] for y in sides[1] for z in sides[2]])
    base = HEAD_FRACTION * peak
    if np.count_nonzero(corners) < 0.5 * corners.size:
        return base
    median = float(np.median(corners))
    return max(base, NOISE_SIGMAS * median / 1.1774) if median < NOISE_CORNER_LIMIT * peak else base


def _foreground(a: np.ndarray, head: bool, threshold: float | None = None) -> np.ndarray:
    """The non-zero voxels above the dust (:func:`_above_dust`), or with ``head`` the head: the largest connected
    region above ``threshold`` (default :func:`_head_threshold` of ``a``; noise specks that pass it stay out), opened
    and its holes filled (ventricles, skull and sinuses inside it stay in)."""
    if not head:
        return _above_dust(a)
    if _peak(a) == 0:
        return np.zeros(a.shape, bool)
    labels, n = ndimage.label(np.abs(a) > (_head_threshold(a) if threshold is None else threshold))
    if n == 0:
        return np.zeros(a.shape, bool)
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    # opened: a noise speck touching the surface moved the box, and with it the window, by a voxel
    return ndimage.binary_fill_holes(ndimage.binary_opening(labels == largest))


def _normalise(chan: np.ndarray, spec: PreprocSpec, threshold: float | None = None) -> np.ndarray:
    # dust and offsets on a zero background (``BACKGROUND_FRACTION``) are background: counted as foreground they
    # entered the statistics and came out as strongly negative voxels, on one grid but not another
    chan = np.where(_foreground(chan, spec.head_mask, threshold), chan, 0.0).astype(np.float32)
    t = torch.as_tensor(chan[None])
    if spec.norm == "zscore":
        t = NormalizeIntensity(nonzero=True)(t)
    elif spec.norm == "rank":
        out = np.zeros_like(chan, dtype=np.float32)
        fg = chan != 0
        if fg.any():
            u = (stats.rankdata(chan[fg]) - 0.5) / fg.sum()
            out[fg] = special.ndtri(u)
        return out
    elif spec.norm == "percentile":
        lo, hi = spec.percentiles
        t = ScaleIntensityRangePercentiles(lo, hi, 0.0, 1.0, clip=True)(t)
    return np.asarray(t[0], dtype=np.float32)


# bumped whenever loading or preprocessing gives other arrays for the same file and spec, or refuses a file it
# used to take (v2: the header's spatial unit is honoured; v3: single slices stored as 3-D are refused; v4:
# registered scans are resampled onto an MNI-aligned grid; v5: a 4-D DWI's trace keeps a zero background; v6:
# oblique grids are resampled onto world axes; v7: registration searches its start rotation and is seeded; v8:
# the output window is centred on the whole foreground box and interpolation dust is background; v9: offsets
# below BACKGROUND_FRACTION are background, each image is anti-aliased on its own grid; v10: a flat background at a
# non-zero level is shifted to zero; v11: entries keep the head's extent, so a scan too small to hold a brain is
# refused behind a noise floor too, and the output grid is anchored in world coordinates; v12: N4 is fitted over the
# head's box, not the field of view), so an existing cache is never served stale by a newer version
CACHE_VERSION = 12


def default_cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$NEUROMOE_CACHE``, else ``~/.cache/neuromoe/preprocess``."""
    return Path(cache_dir or os.environ.get("NEUROMOE_CACHE") or Path.home() / ".cache" / "neuromoe" / "preprocess")


def _read_number(path: Path) -> float | None:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, or "max" (no limit)
        return None


def _stat_value(path: Path, key: str) -> float:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return float(value)
    except (OSError, ValueError):
        pass
    return 0.0


def cgroup_memory_left(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float:
    """Bytes left under the tightest memory limit of this process's cgroup and its ancestors (a SLURM job's
    --mem sits in a nested cgroup named in ``/proc/self/cgroup``, not at the root); reclaimable page cache
    (inactive files) counts as free. v2: ``memory.max − (memory.current − inactive_file)``; v1:
    ``memory.limit_in_bytes − (memory.usage_in_bytes − total_inactive_file)``. ``inf`` without a limit."""
    left = math.inf
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return left
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        if controllers == "":
            base, files = Path(root), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = Path(root) / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        rel = Path(group.strip().lstrip("/"))
        for d in [base / rel, *(base / q for q in rel.parents)]:  # the job's cgroup, then each ancestor
            cap, used = _read_number(d / files[0]), _read_number(d / files[1])
            if cap is None or used is None or cap >= 2**60:  # v1 writes ~2**63 for "no limit"
                continue
            left = min(left, max(cap - (used - _stat_value(d / "memory.stat", files[2])), 0.0))
    return left


def available_memory() -> float:
    """Bytes this process can still allocate: Linux's MemAvailable (free memory plus reclaimable page cache),
    capped by :func:`cgroup_memory_left` (a SLURM job's --mem, a container's limit: the node's free memory says
    nothing about those); elsewhere the free pages, or unbounded where the OS does not say."""
    meminfo = {}
    with contextlib.suppress(OSError):
        meminfo = {k: v for k, v in (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())}
    if "MemAvailable" in meminfo:
        free = float(meminfo["MemAvailable"].split()[0]) * 1024
    else:
        try:
            free = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return math.inf
    return min(free, cgroup_memory_left())


def memory_budget() -> float:
    """Bytes of preprocessed volumes one process may hold: a quarter of :func:`available_memory`, shared by the
    processes torchrun started on this machine. Past it, training reads volumes back from the cache (DenseFormer
    per item, MoME where a patch or a volume is cut)."""
    return 0.25 * available_memory() / max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


class PreprocCache:
    """On-disk cache of preprocessed cases keyed by (path, size, mtime_ns, content sample, role order, spec hash).

    A cache that cannot be written or read (read-only home in an inference container, a full disk, a folder of
    another user) is said once and then skipped: inference must not fail, nor blame the scans, for want of a cache. ``required`` (the
    ``preprocess`` command, whose output the cache is) makes that an error instead.
    """

    def __init__(self, root: str | Path, *, required: bool = False):
        self.root = Path(root)
        self.required = required
        self.usable = True
        self.hits = 0
        self.misses = 0

    def key(self, paths: dict[str, str], spec: PreprocSpec) -> str:
        h = hashlib.sha256(f"v{CACHE_VERSION}|{spec.digest()}".encode())
        h.update(("order:" + "|".join(paths)).encode())  # the first role is the reference grid and crop
        for role in sorted(paths):
            p = Path(paths[role])
            try:
                st = p.stat()
                h.update(f"{role}|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
                h.update(content_sample(p, st.st_size))
                if role == "dwi" and bval_path(p).is_file():  # a 4-D series' b-values choose its volumes
                    h.update(bval_path(p).read_bytes())
            except OSError:
                raise InputError("file not found or unreadable", path=p, fix="check the path") from None
        return h.hexdigest()[:32]

    def get(self, key: str, *, mmap: bool = False) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The entry, or None; ``mmap``: a read-only memory map of it (nothing read until touched)."""
        if not self.usable:
            return None
        npy, meta = self.root / f"{key}.npy", self.root / f"{key}.json"
        try:
            if not (npy.exists() and meta.exists()):  # exists() raises on a folder it may not search
                return None
            return np.load(npy, mmap_mode="r" if mmap else None), json.loads(meta.read_text())
        except PermissionError as err:
            self._unusable("read", err)
        except (OSError, ValueError):
            pass  # a damaged entry: computed again and replaced
        return None

    def put(self, key: str, data: np.ndarray, meta: dict[str, Any]) -> None:
        if not self.usable:
            return
        try:
            with atomic_path(self.root / f"{key}.npy") as tmp:
                np.save(tmp, data)
            with atomic_path(self.root / f"{key}.json") as tmp:
                tmp.write_text(json.dumps(meta))
        except OSError as err:
            self._unusable("write", err)

    def _unusable(self, what: str, err: OSError) -> None:
        fix = "give a writable folder as --out" if self.required else \
            "give a writable folder with --cache or NEUROMOE_CACHE"
        if self.required:
            raise InputError(f"cannot {what} the preprocessing cache: {err.strerror or err}", path=self.root,
                             fix=fix) from None
        self.usable = False
        say_cache_skipped(self.root, f"cannot {what} the preprocessing cache", err, fix)


_WARNED: set[str] = set()


def say_cache_skipped(root: Path, what: str, err: OSError, fix: str) -> None:
    """One warning per cache folder and process (a command opens a cache several times) that it goes on without it."""
    if str(root) not in _WARNED:
        _WARNED.add(str(root))
        print(f"neuromoe: warning: {root}: {what} ({err.strerror or err}); going on without it — {fix}",
              file=sys.stderr)


class CachedChannel:
    """One channel of a preprocessing-cache entry, read from its file when indexed (a memory map opened, sliced
    and closed per access; ``np.asarray`` reads it whole). A map held open keeps a file descriptor: one per case
    (1,251 BraTS cases, in every torchrun process and loader worker) ran past the open-file limit (often 1,024)."""

    def __init__(self, file: Path, index: int, shape: Sequence[int], dtype: Any):
        self.file, self.index, self.shape, self.dtype = Path(file), index, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        entry = np.load(self.file, mmap_mode="r")
        return np.array(entry[self.index][key], dtype=self.dtype)  # a copy: the map closes with ``entry``

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[...] if dtype is None else self[...].astype(dtype)


class CaseResult(dict):
    """Role → array on the common output grid, with the grid's ``affine`` and the reference input grid's
    ``ref_affine`` and ``extent_mm`` (see :class:`Preprocessed`)."""

    affine: np.ndarray
    ref_affine: np.ndarray | None
    extent_mm: list[float] | None


def preprocess_case(paths: dict[str, str], spec: PreprocSpec, cache: PreprocCache | None = None, *,
                    loaded: dict[str, Image] | None = None, lazy: bool = False) -> CaseResult:
    """Load and preprocess every role of one case onto one grid (reference = first role), cached.

    ``loaded``: images the caller has already read (used on a cache miss instead of reading them again).
    ``lazy``: with a usable cache, each role is a :class:`CachedChannel` of the entry, read when indexed.
    """
    paths = {r: str(p) for r, p in paths.items()}
    loaded = loaded or {}
    key = cache.key(paths, spec) if cache is not None else None
    hit = cache.get(key, mmap=lazy) if cache is not None else None
    if hit is not None and spec.register and "ref_affine" not in hit[1]:
        hit = None  # written before entries kept the registered world of the input grid
    if hit is not None:
        cache.hits += 1
        data, meta = hit
    else:
        pre = preprocess_image({r: loaded[r] if r in loaded else load_role(p, r) for r, p in paths.items()}, spec)
        data, meta = pre.data, {"roles": list(paths), "affine": pre.affine.tolist(), "paths": paths,
                                "ref_affine": None if pre.ref_affine is None else pre.ref_affine.tolist(),
                                "extent_mm": pre.extent_mm}
        if cache is not None:
            cache.misses += 1
            cache.put(key, data, meta)
            if lazy:  # keep a reference to the entry, not the array just computed
                data = (cache.get(key, mmap=True) or (data,))[0]
    if isinstance(data, np.memmap):  # lazy: only the entry's header was read
        file, shape, dtype = Path(data.filename), data.shape[1:], data.dtype
        del data  # the map, and its file descriptor, closed
        res = CaseResult({r: CachedChannel(file, i, shape, dtype) for i, r in enumerate(meta["roles"])})
    else:
        res = CaseResult({r: data[i] for i, r in enumerate(meta["roles"])})
    res.affine = np.asarray(meta["affine"])
    res.ref_affine = None if meta.get("ref_affine") is None else np.asarray(meta["ref_affine"])
    res.extent_mm = meta.get("extent_mm")
    return res


def shard_rows(table: pd.DataFrame, shard: tuple[int, int]) -> pd.DataFrame:
    """Rows of shard ``i`` of ``n``: by a stable hash of the subject id, independent of row order."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"shard {i}/{n} invalid", fix="use --shard i/n with 0 <= i < n")
    keep = [zlib.crc32(str(s).encode()) % n == i for s in table["subject"]]
    return table[keep]


def _row_paths(row: pd.Series) -> dict[str, str]:
    return {r: row[r] for r in (*IMAGE_ROLES, "mask") if r in row and isinstance(row[r], str) and row[r]}


def fmri_only_rows(table: pd.DataFrame, roles: tuple[str, ...]) -> pd.Series:
    """Rows with a BOLD / ROI time series and none of ``roles`` (an all-empty row stays: a manifest error)."""

    def has(cols: tuple[str, ...]) -> pd.Series:
        present = [c for c in cols if c in table.columns]
        if not present:
            return pd.Series(False, index=table.index)
        return table[present].map(lambda v: isinstance(v, str) and bool(v)).any(axis=1)

    return has(("bold", "timeseries")) & ~has(roles)


def _work(paths: dict[str, str], spec: PreprocSpec, cache_dir: str) -> str:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    cache = PreprocCache(cache_dir, required=True)
    preprocess_case(paths, spec, cache)
    return "cached" if cache.hits else "done"


def preprocess_cohort(table: pd.DataFrame, spec: PreprocSpec, cache_dir: str | Path, *, workers: int = 1,
                      shard: tuple[int, int] = (0, 1), progress: bool = True) -> dict[str, Any]:
    """Preprocess every row into the cache; failures go to ``failures.csv`` and the rest finish."""
    from rich.progress import Progress

    roles = (*IMAGE_ROLES, "mask")
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():  # found now, not after the whole cohort ran
        raise InputError("output folder is an existing file", path=cache_dir, fix="give a folder as --out")
    if not any(r in table.columns for r in roles):
        raise InputError(f"no image column to preprocess (one of {', '.join(roles)})", path=table.attrs.get("source"),
                         fix="point --data at a structural or lesion manifest / BIDS folder with anat images")
    # checked once here, not found again for every row; nothing is created before the rows are read
    here = Path(cache_dir).absolute()
    while not here.exists():
        here = here.parent
    if not (here.is_dir() and os.access(here, os.W_OK | os.X_OK)):
        raise InputError("cannot write the output folder", path=cache_dir, fix="give a writable folder as --out")
    # a BIDS root also lists its func/ scans: those rows are not this command's input, not failures
    fmri = fmri_only_rows(table, roles)
    rows = shard_rows(table[~fmri], shard)
    counts = {"done": 0, "cached": 0, "failed": 0, "skipped_fmri": int(fmri.sum())}
    failures: list[dict[str, str]] = []
    # a failure row names the scan, not only the subject: sessions/states/runs of one subject differ there
    ident = [c for c in ("subject", "session", "state", "run") if c in rows.columns]
    jobs = [({c: "" if pd.isna(r[c]) else str(r[c]) for c in ident}, _row_paths(r)) for _, r in rows.iterrows()]
    with Progress(disable=not progress) as bar, ProcessPoolExecutor(max(1, workers)) as pool:
        task = bar.add_task("preprocess", total=len(jobs))
        futs = {pool.submit(_work, paths, spec, str(cache_dir)): who for who, paths in jobs if paths}
        for who, paths in jobs:
            if not paths:
                counts["failed"] += 1
                failures.append({**who, "error": "no image columns"})
        for fut in as_completed(futs):
            try:
                counts[fut.result()] += 1
            except Exception as exc:  # one bad file must not stop the cohort
                counts["failed"] += 1
                failures.append({**futs[fut], "error": str(exc)})
            bar.advance(task)
    # shards share the cache dir: one failures table per shard, and none left over from an earlier run
    fail_csv = Path(cache_dir) / ("failures.csv" if shard[1] == 1 else f"failures_shard{shard[0]}of{shard[1]}.csv")
    for stale in [fail_csv, *(Path(cache_dir).glob("failures_shard*of*.csv") if shard[1] == 1 else [])]:
        stale.unlink(missing_ok=True)
    write_failures(fail_csv, sorted(failures, key=lambda f: [f[c] for c in ident]))
    return {**counts, "failures_csv": str(fail_csv) if failures else ""}
