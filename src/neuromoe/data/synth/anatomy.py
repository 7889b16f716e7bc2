"""MNI152 2009 anatomy resampled to the cohort grid (bundled with nilearn, works offline)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

# MNI bounding box (mm) that holds the whole head of the 2009 template.
_BOX_MIN = np.array([-90.0, -126.0, -72.0])
_BOX_MAX = np.array([90.0, 90.0, 108.0])


@dataclass(frozen=True)
class Anatomy:
    """Template T1 and tissue probabilities on a grid of ``spacing`` mm (RAS affine)."""

    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape  # type: ignore[return-value]

    def memo(self, key: object, make: Callable[[], np.ndarray]) -> np.ndarray:
        """A map that depends on the template only (regions, eroded masks), computed once per anatomy.

        Every subject of a cohort needs the same few maps; recomputing them was half of the generation
        time. The array is returned read-only, so a caller cannot alter what the next subject gets.
        """
        if key not in self._memo:
            arr = make()
            arr.flags.writeable = False
            self._memo[key] = arr
        return self._memo[key]

    def mm_grid(self) -> np.ndarray:
        """(3, X, Y, Z) MNI coordinates of every voxel centre, for coordinate-defined regions."""

        def make() -> np.ndarray:
            idx = np.indices(self.shape).reshape(3, -1)
            xyz = self.affine[:3, :3] @ idx + self.affine[:3, 3:4]
            return xyz.reshape((3, *self.shape))

        return self.memo("mm_grid", make)

    def region(self, centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
        """Soft ellipsoid weight (1 inside, smooth edge) around an MNI coordinate."""
        g = self.mm_grid()
        d2 = sum(((g[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
        return np.exp(-0.5 * d2**2).astype(np.float32)


@lru_cache(maxsize=4)
def load_anatomy(spacing: float = 3.0) -> Anatomy:
    """Resample the nilearn MNI152 T1 and GM/WM/CSF maps; cached because every subject starts here."""
    from nilearn import datasets, image

    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = _BOX_MIN
    shape = tuple(int(np.ceil((_BOX_MAX - _BOX_MIN)[i] / spacing)) + 1 for i in range(3))

    def res(img) -> np.ndarray:
        out = image.resample_img(img, target_affine=affine, target_shape=shape, interpolation="continuous",
                                 force_resample=True, copy_header=True)
        return np.nan_to_num(np.asarray(out.get_fdata(), dtype=np.float32))

    t1 = res(datasets.load_mni152_template(resolution=2))
    gm = np.clip(res(datasets.load_mni152_gm_template(resolution=2)), 0, 1)
    wm = np.clip(res(datasets.load_mni152_wm_template(resolution=2)), 0, 1)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing((gm + wm) > 0.2, iterations=2))
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0, 1)
    t1 = t1 / max(float(np.percentile(t1[brain], 99)), 1e-6)
    return Anatomy(affine, t1, gm, wm, csf, brain.astype(bool))


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Unit-variance low-frequency random field (deformations, bias fields)."""
    sigma_vox = min(sigma_vox, min(shape) / 4.0)  # keep some variation on coarse test grids
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    f -= f.mean()
    return f / max(float(f.std()), 1e-6)


@dataclass(frozen=True)
class Pose:
    """Where a head lies in the scanner's field of view: a rotation about the centre (3×3, of voxel axes that are
    the world's axes, as on the template's grid) then a shift (voxels). The template's pose is the identity."""

    rotation: np.ndarray
    shift: np.ndarray


def draw_pose(rng: np.random.Generator, deg: float, shift_mm: float, spacing: float) -> Pose:
    """Rotation angles about the three axes ~ N(0, ``deg``°) and a shift ~ N(0, ``shift_mm``) per axis, each cut at
    2.5 sd (a head tilted in the coil, off the scanner's centre)."""
    a = np.deg2rad(deg * np.clip(rng.standard_normal(3), -2.5, 2.5))
    t = shift_mm * np.clip(rng.standard_normal(3), -2.5, 2.5) / spacing
    cx, cy, cz, sx, sy, sz = *np.cos(a), *np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Pose(rz @ ry @ rx, t)


def warp(vol: np.ndarray, disp: np.ndarray, scale: float, order: int = 1, pose: Pose | None = None) -> np.ndarray:
    """Resample ``vol`` under a global scale about the centre plus a smooth displacement (voxels), then place the
    result in ``pose`` (the head moved by it; one resampling)."""
    shape = vol.shape
    c = (np.array(shape) - 1) / 2.0
    idx = index_grid(shape)
    if pose is None:
        coords = [(idx[i] - c[i]) / scale + c[i] + disp[i] for i in range(3)]
    else:  # an output voxel p shows the posed head's point R⁻¹(p − c − t) + c, and the displacement there
        rel = np.tensordot(pose.rotation.T, idx - (c + pose.shift)[:, None, None, None], axes=1) + c[:, None, None, None]
        at = ndimage.map_coordinates  # the displacement field is read where that point was before the pose
        coords = [(rel[i] - c[i]) / scale + c[i] + at(disp[i], rel, order=1, mode="nearest") for i in range(3)]
    return ndimage.map_coordinates(vol, coords, order=order, mode="constant").astype(vol.dtype)


@lru_cache(maxsize=4)
def index_grid(shape: tuple[int, ...]) -> np.ndarray:
    """Voxel index grid as float32 (read-only), shared by every warp of a cohort."""
    idx = np.indices(shape).astype(np.float32)
    idx.flags.writeable = False
    return idx
