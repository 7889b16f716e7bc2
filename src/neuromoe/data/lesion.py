"""Lesion-segmentation datasets for MoME (one modality per sample) and MoME+ (all modalities + availability).

Cases are preprocessed once (through the shared preprocessing/cache) and kept in memory; every item is
a random patch: with probability ``fg_fraction`` (~1/3, as nnU-Net) centred on a lesion voxel, otherwise
anywhere, so tiny lesions are still seen often. Augmentation is MONAI's (flip, rotation, scaling, gamma,
noise) applied jointly to image and mask, after a bias field on the raw scale (:mod:`neuromoe.data.intensity`).
MoME+ items randomly drop modalities (never all).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data.utils import get_random_patch, get_valid_patch_size
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandZoomd,
)
from torch.utils.data import Dataset

from neuromoe.data.intensity import RandBiasFieldRaw, raw_offset
from neuromoe.data.preprocess import memory_budget
from neuromoe.errors import InputError
from neuromoe.models.mome import DEFAULT_MODALITIES

__all__ = ["LesionCase", "LesionPatchDataset", "augmentation", "crop", "load_lesion_cases", "patch_corner",
           "sample_patch"]

LesionCase = dict[
    str, Any
]  # {"images": {modality: (*S) float32}, "mask": (*S) uint8, "meta": {...}, "affine"}


_MAPPED: set[str] = set()  # tables whose images were said to be read from the cache


def load_lesion_cases(
    table: pd.DataFrame,
    spec: Any,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    cache: Any = None,
    source: str = "table",
    *,
    in_memory: bool | None = True,
    n_cases: int | None = None,
) -> list[LesionCase]:
    """Preprocess every row's available modalities and mask onto one grid (A's ``preprocess_case``).

    The images are held in memory (``in_memory=True``), or are read from the preprocessing cache entries when a
    patch or a volume is cut from them (``False``; ``None``: when the ``n_cases`` cases of the caller, estimated
    from the first, would exceed :func:`~neuromoe.data.preprocess.memory_budget`; a
    :class:`~neuromoe.data.preprocess.CachedChannel` each): BraTS at the ``paper`` grid is ~100 MB a case, and
    torchrun's processes each held their own copy. The masks (one byte a voxel) stay in memory."""
    from neuromoe.data.preprocess import preprocess_case

    if "mask" not in table.columns:
        raise InputError("no 'mask' column", path=source, fix="add a mask column with lesion-mask paths")
    mapped = in_memory is False and cache is not None and cache.usable
    cases = []
    for _, row in table.iterrows():
        paths = {
            m: str(row[m]) for m in modalities if m in row and isinstance(row[m], str | Path) and str(row[m])
        }
        if not paths:
            raise InputError(
                f"subject {row.get('subject', '?')} has none of {list(modalities)}",
                path=source,
                fix="fill at least one modality column",
            )
        roles = {**paths, "mask": str(row["mask"])}
        out = preprocess_case(roles, spec, cache=cache, lazy=mapped)
        usable = cache is not None and cache.usable  # a write that failed on the first case makes it unusable
        if not cases and usable and in_memory is not True:  # decide (or say) on the first case's size
            need = sum(4 * math.prod(out[m].shape) for m in paths) * (n_cases or len(table))  # float32, unread
            mapped = in_memory is False or need > memory_budget()
            if mapped:
                if source not in _MAPPED:  # once per table, not per split
                    _MAPPED.add(source)
                    print(f"neuromoe: the lesion images of {source} (~{need / 2**30:.1f} GiB) are read from the "
                          "preprocessing cache where patches and volumes are cut, not held in memory", file=sys.stderr)
                out = preprocess_case(roles, spec, cache=cache, lazy=True)
        cases.append(
            {
                # read from the cache when indexed, or in memory each channel copied out, so the cached array's
                # float32 mask channel is not kept beside the uint8 mask (1.3x what the budget counted for BraTS)
                "images": {m: out[m] if mapped else np.array(out[m], dtype=np.float32) for m in paths},
                "mask": (np.asarray(out["mask"]) > 0.5).astype(np.uint8),
                "meta": {k: row[k] for k in ("subject", "session", "run", "lesion_type", "dataset", "site") if k in row},
                "affine": np.asarray(out.affine, dtype=np.float64),
            }
        )
    if in_memory is False and not (cache is not None and cache.usable) and cases:
        print(f"neuromoe: the lesion images of {source} are held in memory: there is no usable preprocessing cache "
              "to read them back from (give --cache DIR)", file=sys.stderr)
    return cases


def augmentation(spatial_dims: int = 3, seed: int = 0) -> Compose:
    """Joint image/mask augmentation (the issue's list but the bias field, which
    :class:`LesionPatchDataset` applies on the raw scale; masks use nearest interpolation).

    The zoom resizes with ``F.interpolate``, whose plain ``nearest`` uses the legacy ``floor(dst·scale)``
    sampling while ``bilinear`` uses voxel centres: the mask would sit ~0.4 voxel off its image, so masks
    are zoomed with ``nearest-exact`` (centre-aligned like the image).
    """
    keys = ["image", "mask"]
    rot = 0.26  # ±15°
    t = Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandRotated(
                keys,
                range_x=rot,
                range_y=rot if spatial_dims == 3 else 0.0,
                range_z=rot if spatial_dims == 3 else 0.0,
                prob=0.2,
                mode=("bilinear", "nearest"),
            ),
            RandZoomd(keys, min_zoom=0.85, max_zoom=1.15, prob=0.2, mode=("bilinear", "nearest-exact")),
            RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
            RandGaussianNoised("image", prob=0.15, std=0.1),
        ]
    )
    t.set_random_state(seed=seed)
    return t


def patch_corner(
    shape: Sequence[int],
    patch: Sequence[int],
    rng: np.random.Generator,
    fg_fraction: float = 1 / 3,
    fg: np.ndarray | None = None,
) -> tuple[int, ...]:
    """Lowest corner, in the volume's voxels, of a ``patch`` window in a volume of ``shape`` whose lesion voxels
    are ``fg`` (flat indices, ``np.flatnonzero(mask > 0)``); centred near a lesion voxel with probability
    ``fg_fraction``, else uniform. Axes shorter than the patch are zero-padded symmetrically (the corner is then
    negative there), as MONAI's SpatialPad + RandSpatialCrop do: the draws are theirs, without padding or
    copying the volume."""
    before = [max(p - s, 0) // 2 for s, p in zip(shape, patch, strict=True)]
    padded = [max(s, p) for s, p in zip(shape, patch, strict=True)]
    if fg is not None and len(fg) and rng.random() < fg_fraction:
        centre = np.unravel_index(fg[rng.integers(len(fg))], tuple(shape)) + np.asarray(before)
        start = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                 for c, p, s in zip(centre, patch, padded, strict=True)]
    else:
        state = np.random.RandomState(int(rng.integers(2**31)))
        start = [w.start for w in get_random_patch(padded, get_valid_patch_size(padded, patch), state)]
    return tuple(a - b for a, b in zip(start, before, strict=True))


def crop(volume: np.ndarray, corner: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``volume[..., corner : corner + patch]`` (leading axes kept), zeros where the window leaves the volume; a
    memory-mapped volume is read only where the window is."""
    lead = volume.shape[: volume.ndim - len(patch)]
    out = np.zeros((*lead, *patch), dtype=volume.dtype)
    src, dst = [], []
    for c, p, s in zip(corner, patch, volume.shape[len(lead):], strict=True):
        lo, hi = max(c, 0), min(c + p, s)
        src.append(slice(lo, hi))
        dst.append(slice(lo - c, hi - c))
    out[(..., *dst)] = volume[(..., *src)]
    return out


def sample_patch(
    image: np.ndarray,
    mask: np.ndarray,
    patch: Sequence[int],
    rng: np.random.Generator,
    fg_fraction: float = 1 / 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop ``image (C, *S)`` / ``mask (*S)`` to ``patch``; foreground-centred with prob ``fg_fraction``
    (:func:`patch_corner` and :func:`crop`, as the training dataset draws its patches)."""
    corner = patch_corner(mask.shape, patch, rng, fg_fraction, np.flatnonzero(mask > 0))
    return crop(image, corner, patch), crop(mask, corner, patch)


class LesionPatchDataset(Dataset):
    """Random patches of in-memory cases.

    ``multimodal=False`` (MoME): one item per (case, available modality) pair: ``image (1, *P)``,
    ``mask (1, *P)``, ``modality`` (expert index, used only by the curriculum's expert loss).
    ``multimodal=True`` (MoME+): ``image (M, *P)`` zero-filled, ``available (M,)`` after random dropout
    of each present modality with prob ``modality_dropout`` (at least one kept).
    """

    def __init__(
        self,
        cases: Sequence[LesionCase],
        patch_size: Sequence[int],
        *,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        multimodal: bool = False,
        fg_fraction: float = 1 / 3,
        augment: bool = False,
        modality_dropout: float = 0.0,
        samples_per_epoch: int | None = None,
        seed: int = 0,
    ):
        self.cases, self.patch = list(cases), tuple(patch_size)
        self.modalities, self.multimodal = tuple(modalities), multimodal
        self.fg_fraction, self.modality_dropout = fg_fraction, modality_dropout
        self.pairs = [(i, m) for i, c in enumerate(self.cases) for m in self.modalities if m in c["images"]]
        base = len(self.cases) if multimodal else len(self.pairs)
        self.length = samples_per_epoch or base
        self.seed, self.epoch = seed, 0
        self.transform = augmentation(len(self.patch), seed) if augment else None
        self.bias = RandBiasFieldRaw() if augment else None
        self._offsets: dict[tuple[int, str], float] = {}  # (case, modality) → raw_offset of the whole image
        # each case's lesion voxels, flat int32, found once here (per item it cost 10 ms at 1 mm); loader workers
        # inherit them
        self.lesion_voxels = [np.flatnonzero(c["mask"] > 0).astype(np.int32) for c in self.cases]

    def _offset(self, ci: int, modality: str) -> float:
        """The whole image's raw offset, not the patch's: a patch need not hold the head's darkest voxel."""
        key = (ci, modality)
        if key not in self._offsets:
            self._offsets[key] = raw_offset(self.cases[ci]["images"][modality])
        return self._offsets[key]

    def set_epoch(self, epoch: int) -> None:
        """Reseed per epoch so workers and resumed runs draw the same patches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.multimodal:
            ci = index % len(self.cases)
            case = self.cases[ci]
            present = np.array([m in case["images"] for m in self.modalities])
            keep = present & (rng.random(len(present)) >= self.modality_dropout)
            if not keep.any():
                keep[rng.choice(np.flatnonzero(present))] = True
            mods = [m if k else None for m, k in zip(self.modalities, keep, strict=True)]
            modality = -1
        else:
            ci, mod = self.pairs[index % len(self.pairs)]
            case, mods, keep = self.cases[ci], [mod], None
            modality = self.modalities.index(mod)
        # the window first, then each modality cut to it: stacking whole volumes per item read every modality whole
        corner = patch_corner(case["mask"].shape, self.patch, rng, self.fg_fraction, self.lesion_voxels[ci])
        img = np.stack([crop(case["images"][m], corner, self.patch) if m else np.zeros(self.patch, np.float32)
                        for m in mods])
        msk = crop(case["mask"], corner, self.patch)
        if self.bias is not None:  # first, while the background is exactly zero
            self.bias.set_random_state(int(rng.integers(2**31)))
            img = self.bias(img, [self._offset(ci, m) if m else 0.0 for m in mods])
        if self.transform is not None:
            self.transform.set_random_state(int(rng.integers(2**31)))
            out = self.transform({"image": img, "mask": msk[None].astype(np.float32)})
            img, msk = np.asarray(out["image"]), np.asarray(out["mask"])[0]
            if keep is not None:  # augmentation must not bring a dropped modality back
                img = img * keep.reshape(-1, *([1] * len(self.patch)))
        item = {
            "image": torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32),
            "mask": torch.as_tensor(np.ascontiguousarray(msk > 0.5)[None], dtype=torch.float32),
            "modality": torch.tensor(modality),
        }
        if keep is not None:
            item["available"] = torch.as_tensor(keep, dtype=torch.float32)
        return item
