"""T1 structural cohorts as a torch Dataset: preprocessing replay, multi-task labels with masks, augmentation.

The structural table (``manifests/structural.csv`` or any manifest/BIDS folder read by
:func:`neuromoe.io.table.load_table`) has one row per subject with a ``t1`` path and label columns that
are often missing by design (UK-Biobank-like subjects have age/sex but no diagnosis; ADNI-like have
CN/MCI/AD; PPMI-like have HC/PD). Labels are therefore encoded per task with a *missing* code
(``-1`` for classes, ``NaN`` for values) and the loss is masked per task per subject.

Every volume goes through the model's stored :class:`~neuromoe.data.preprocess.PreprocSpec` (through
the shared cache, so a second run does not redo it) and is then centre-cropped/padded to the model's
input grid, so training, evaluation and prediction see identical inputs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandomizableTransform,
    RandScaleIntensity,
    RandShiftIntensity,
    ResizeWithPadOrCrop,
)
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from neuromoe.data.intensity import RandBiasFieldRaw, raw_offset
from neuromoe.data.preprocess import memory_budget
from neuromoe.data.splits import assign_splits  # moved there; importable from here as before
from neuromoe.errors import InputError

__all__ = [
    "StructuralDataset",
    "TaskSpec",
    "assign_splits",
    "encode_labels",
    "load_t1",
]

MISSING_CLASS = -1


@dataclass
class TaskSpec:
    """One prediction task: ``classes`` for classification (label values in the column, in order)."""

    name: str
    type: Literal["classification", "regression"] = "classification"
    column: str = ""
    classes: list[str] = field(default_factory=list)
    weight: float = 1.0

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.type == "classification" else 1

    @property
    def label_column(self) -> str:
        return self.column or self.name

    def model_dict(self) -> dict[str, Any]:
        """What the model needs to build its output head."""
        return {"name": self.name, "type": self.type, "num_outputs": self.num_outputs}


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())


def encode_labels(table: pd.DataFrame, tasks: Sequence[TaskSpec], source: str = "table") -> dict[str, np.ndarray]:
    """Per task: class indices (``-1`` = missing) or float values (``NaN`` = missing).

    An unknown class or a non-numeric value is a user error naming the column and the offending value;
    a task whose column is absent entirely is all-missing (a cohort may simply not have that label).
    """
    out: dict[str, np.ndarray] = {}
    for t in tasks:
        col = t.label_column
        if col not in table.columns:
            out[t.name] = np.full(len(table), MISSING_CLASS if t.type == "classification" else np.nan)
            continue
        values = table[col].tolist()
        if t.type == "classification":
            index = {str(c): i for i, c in enumerate(t.classes)}
            codes = np.full(len(values), MISSING_CLASS, dtype=np.int64)
            for i, v in enumerate(values):
                if _blank(v):
                    continue
                # a numeric column with blanks is read as float: 1.0 must match class "1" (as 1 does)
                key = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()
                if key not in index:
                    raise InputError(
                        f"column '{col}' has value '{key}' that is not a class of task '{t.name}' {t.classes}",
                        path=source, fix=f"recode the column to {', '.join(map(str, t.classes))} (a trained model's "
                        f"classes are fixed), or, before training, set the task's classes to include '{key}'",
                    )
                codes[i] = index[key]
            out[t.name] = codes
        else:
            vals = np.full(len(values), np.nan, dtype=np.float64)
            for i, v in enumerate(values):
                if _blank(v):
                    continue
                try:
                    vals[i] = float(v)
                except (TypeError, ValueError):
                    raise InputError(f"column '{col}' has non-numeric value '{v}'", path=source,
                                     fix="write a number or leave the cell empty") from None
            out[t.name] = vals
    return out


def load_t1(path: str | Path, spec: Any, img_size: Sequence[int], cache: Any = None) -> np.ndarray:
    """Preprocess one T1 with ``spec`` (through ``cache``) and crop/pad it to ``img_size``: ``(1, *img_size)``."""
    from neuromoe.data.preprocess import preprocess_case

    out = preprocess_case({"t1": str(path)}, spec, cache=cache)
    _check_coverage(out["t1"], out.affine, path, out.extent_mm)
    return _fit(out["t1"], img_size)


# No adult brain spans less than ~100 mm along any axis; 80 leaves room for tight skull-stripping and atrophy.
MIN_BRAIN_EXTENT_MM = 80.0


def _check_coverage(volume: Any, affine: np.ndarray, path: str | Path, extent_mm: Sequence[float] | None) -> None:
    """Refuse a scan whose content cannot hold a brain (a slab, a crop, a localiser): the model gave a 60 mm cube
    a brain age, sex and diagnosis without a word. Measured per axis on the head preprocessing found
    (``extent_mm``: the non-zero voxels of the output, as before, took a noise floor for content), against the
    smaller of the bound and the output window's own extent (a small configured window crops every brain)."""
    if extent_mm is None:  # a cache entry of a version that did not keep it: not served (CACHE_VERSION)
        return
    voxel = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    extent = np.asarray(extent_mm, dtype=np.float64)
    # one output voxel of slack: resampling leaves an edge voxel empty (a field of view of exactly 80 mm measured 78)
    need = np.minimum(MIN_BRAIN_EXTENT_MM, np.asarray(np.shape(volume)[-3:]) * voxel) - voxel - 1e-6
    if (extent < need).any():
        raise InputError(f"the image's content spans {'×'.join(f'{v:.0f}' for v in extent)} mm: not a whole brain (at "
                         f"least {MIN_BRAIN_EXTENT_MM:.0f} mm along every axis), so a brain age or diagnosis from it "
                         "would mean nothing", path=path, fix="give a whole-brain T1 (not a slab, crop or localiser)")


def _fit(volume: np.ndarray, img_size: Sequence[int]) -> np.ndarray:
    """A preprocessed T1 cropped / padded (centred) to ``img_size``: ``(1, *img_size)`` float32."""
    arr = np.asarray(volume, dtype=np.float32)
    if arr.ndim == len(img_size):
        arr = arr[None]
    return np.asarray(ResizeWithPadOrCrop(tuple(img_size))(arr), dtype=np.float32)


def _load_volumes(paths: list[str], spec: Any, img_size: tuple[int, ...], cache: Any, in_memory: bool | None,
                  source: str) -> np.ndarray | DiskVolumes:
    """Preprocess every scan now (errors name the file before training; the cache fills) and keep the volumes in
    one preallocated float16 array, or, past the memory budget, only in the cache (:class:`DiskVolumes`)."""
    need = 2.0 * len(paths) * math.prod(img_size)
    if in_memory is None:
        in_memory = need <= memory_budget()
    if not in_memory and cache is not None:
        for p in paths:
            load_t1(p, spec, img_size, cache)
        if cache.usable:  # every entry written, or read from a filled (perhaps read-only) cache
            print(f"neuromoe: {len(paths)} volumes of {source} ({need / 2**30:.1f} GiB as float16) are read back from "
                  "the preprocessing cache per item, not held in memory", file=sys.stderr)
            return DiskVolumes(paths, spec, img_size, cache)
    if not in_memory:  # preprocessing every scan again each epoch would be far slower than holding them
        print(f"neuromoe: the volumes of {source} ({need / 2**30:.1f} GiB as float16) are held in memory: there is "
              "no usable preprocessing cache to read them back from (give --cache DIR)", file=sys.stderr)
    images = np.empty((len(paths), 1, *img_size), np.float16)  # not a float32 list then a stack: 5x the peak
    for i, p in enumerate(paths):
        images[i] = load_t1(p, spec, img_size, cache)
    return images


class _OnRawScale(Compose):
    """Scanner effects act on raw intensities, before the pipeline's normalisation: the head's normalised voxels
    are put back on a raw scale (:func:`~neuromoe.data.intensity.raw_offset`), the effects applied, and the result
    normalised again to the input's moments over the same voxels. The background stays zero: applied to the
    normalised image, gamma (which maps the image's min..max) moved it to a non-zero level and a bias field only
    stretched contrast about zero (docs/reliability.md, "Bias fields")."""

    def __call__(self, img: Any, *args: Any, **kwargs: Any) -> Any:
        x = torch.as_tensor(img).float()
        fg = x != 0
        if not fg.any():
            return x
        raw = torch.where(fg, x + raw_offset(x.numpy()), 0.0)
        y = torch.as_tensor(super().__call__(raw, *args, **kwargs)).float()
        ys, xs = y[fg], x[fg]
        out = torch.zeros_like(x)
        out[fg] = (ys - ys.mean()) / ys.std().clamp_min(1e-6) * xs.std() + xs.mean()
        return out


class RandHeadNoise(RandomizableTransform):
    """Gaussian noise of a random sd in ``[0, max_std]`` (z units) on the head's voxels, the background left zero:
    a scanner twice as noisy moved the demo DenseFormer's brain ages by −9 y (docs/experiments.md, "Voxel size")."""

    def __init__(self, max_std: float, prob: float = 0.5):
        super().__init__(prob)
        self.max_std = float(max_std)
        self._std = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._std = float(self.R.uniform(0.0, self.max_std))

    def __call__(self, img: Any) -> Any:
        self.randomize()
        x = torch.as_tensor(img).float()
        if not self._do_transform or self._std == 0.0:
            return x
        noise = torch.from_numpy(self.R.standard_normal(tuple(x.shape)).astype(np.float32)) * self._std
        return torch.where(x != 0, x + noise, x)


def augmentation(seed: int = 0, *, spatial: bool = True, contrast: bool = False, noise: float = 0.0) -> Compose:
    """Mild, label-preserving augmentation: small affine (±5°, ±5 %, ±3 voxels), intensity and noise.

    ``contrast`` adds what differs between scanners: contrast gamma (0.7–1.5), a smooth bias field and
    blur (σ ≤ 0.7 voxel). Without it a model may read age from tissue contrast or sharpness, and a scan
    from another site shifts its prediction (docs/experiments.md, "Site shifts").
    ``noise`` (z units) adds :class:`RandHeadNoise` — alone, without the intensity block, when neither of the
    others is on. No left-right flip: brain-age and atrophy cues in real data are lateralised enough that a flip
    is not guaranteed label-preserving.
    """
    steps: list = []
    if spatial:
        steps.append(RandAffine(prob=0.8, rotate_range=(0.09, 0.09, 0.09), scale_range=(0.05, 0.05, 0.05),
                                translate_range=(3, 3, 3), padding_mode="zeros"))
    if contrast:
        steps.append(_OnRawScale([
            RandAdjustContrast(prob=0.8, gamma=(0.7, 1.5)),
            RandBiasFieldRaw(prob=0.5),
            RandGaussianSmooth(prob=0.3, sigma_x=(0.0, 0.7), sigma_y=(0.0, 0.7), sigma_z=(0.0, 0.7)),
        ]))
    if spatial or contrast or not noise:
        steps += [RandScaleIntensity(factors=0.1, prob=0.5),
                  RandShiftIntensity(offsets=0.1, prob=0.5),
                  RandGaussianNoise(prob=0.3, std=0.03)]
    if noise:
        steps.append(RandHeadNoise(noise))
    t = Compose(steps)
    t.set_random_state(seed=seed)
    return t


class DiskVolumes:
    """Preprocessed volumes read back one at a time (from the preprocessing cache), for a cohort whose float16
    stack does not fit in memory: a UK Biobank table at 1 mm is ~10 MB per scan. ``volumes[i]`` is what row
    ``i`` of the in-memory ``(N, 1, *img_size)`` float16 array it replaces would be."""

    def __init__(self, paths: Sequence[str], spec: Any, img_size: Sequence[int], cache: Any):
        self.paths, self.spec, self.img_size, self.cache = [str(p) for p in paths], spec, tuple(img_size), cache
        # keyed once: a key reads the scan (an uncompressed .nii whole) to tell versions apart, and per item that
        # read every scan again each epoch beside its cache entry; the run trains on the scans as they were here
        self.keys = [cache.key({"t1": p}, spec) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        hit = self.cache.get(self.keys[i])
        if hit is None:  # the entry was removed or damaged since: preprocessed (and cached) again
            return load_t1(self.paths[i], self.spec, self.img_size, self.cache).astype(np.float16)
        return _fit(hit[0][0], self.img_size).astype(np.float16)


class StructuralDataset(Dataset):
    """Subjects of a structural table: ``{"image": (1, *img_size), "labels": {task: value}, "index": i}``.

    Volumes are preprocessed once at construction, so a file that cannot be read raises :class:`InputError`
    naming it before any training, and kept in memory as float16 (64³ ≈ 0.5 MB each) so epochs do not re-read
    NIfTI files. ``in_memory=False``, or ``None`` when the stack would exceed :func:`memory_budget`, reads each
    volume back from the preprocessing cache when an item is fetched instead (:class:`DiskVolumes`).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        tasks: Sequence[TaskSpec],
        spec: Any,
        img_size: Sequence[int],
        *,
        cache: Any = None,
        augment: bool = False,
        contrast: bool = False,
        noise: float = 0.0,
        seed: int = 0,
        source: str = "table",
        images: np.ndarray | DiskVolumes | None = None,
        in_memory: bool | None = None,
        rows: np.ndarray | None = None,
    ):
        if "t1" not in table.columns:
            raise InputError("no 't1' column", path=source, fix="add a t1 column with image paths")
        self.table = table.reset_index(drop=True)
        self.tasks = list(tasks)
        self.labels = encode_labels(self.table, self.tasks, source)
        self.img_size = tuple(img_size)
        if images is None:
            images = _load_volumes(self.table["t1"].tolist(), spec, self.img_size, cache, in_memory, source)
        # a subset shares its parent's volumes and indexes them by ``rows``: copying them tripled the memory the
        # budget had approved (train and validation copies beside the stack, then another for the head refit)
        self.images = images
        self.rows = np.arange(len(self.table)) if rows is None else np.asarray(rows)
        self.transform = augmentation(seed, spatial=augment, contrast=contrast, noise=noise) \
            if augment or contrast or noise > 0 else None

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, mask: np.ndarray, *, augment: bool = False, contrast: bool = False, noise: float = 0.0,
               seed: int = 0) -> StructuralDataset:
        """A view on some rows that reuses the already preprocessed volumes."""
        idx = np.flatnonzero(mask)
        return StructuralDataset(self.table.iloc[idx], self.tasks, None, self.img_size, augment=augment,
                                 contrast=contrast, noise=noise, seed=seed, images=self.images, rows=self.rows[idx])

    def volumes(self) -> Iterator[np.ndarray]:
        """This dataset's preprocessed volumes in order, ``(1, *img_size)`` float16 each."""
        return (self.images[r] for r in self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = torch.from_numpy(self.images[self.rows[i]].astype(np.float32))
        if self.transform is not None:
            # MONAI transforms keep their own RNG, which would carry state from item to item (fetch order,
            # workers, ranks, resume): reseed it from the global RNG, which the Trainer seeds per (epoch, item)
            self.transform.set_random_state(int(np.random.randint(2**31)))
            # a plain tensor: a MONAI MetaTensor batch sent every op of the forward and backward pass through
            # MetaTensor.__torch_function__ (8 % of a demo fine-tuning step)
            img = convert_to_tensor(self.transform(img), dtype=torch.float32, track_meta=False)
        labels = {t.name: torch.tensor(self.labels[t.name][i]) for t in self.tasks}
        return {"image": img, "labels": labels, "index": i}
