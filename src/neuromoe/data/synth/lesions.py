"""SynthSeg-style multi-modal lesion cases: random per-tissue contrasts and typed lesions with masks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from neuromoe.data.synth.anatomy import Anatomy, Pose, index_grid, load_anatomy, smooth_field, warp
from neuromoe.data.synth.structural import DEFORM_SMOOTH_MM, apply_site

MODALITIES = ("t1", "t1c", "t2", "flair", "dwi")
LESION_DEFORM_MM = 3.0  # sd of a case's smooth displacement (was 1 voxel at any spacing)
# Where lesion centres may sit, as distances (mm) from tissue boundaries measured on a 1.5 mm grid and interpolated
# onto the cohort's. Whole erosions/dilations of the cohort's own voxels made these regions 128-231 mL (deep white
# matter) and 100-162 mL (periventricular) at 1-4 mm; now 234-252 and 104-119 mL. The values keep the 3 mm regions of
# the earlier cohorts (231, 100, 901 mL then; 252, 111, 891 mL now).
DEEP_WM_MM = 2.0  # deep white matter: further than this inside the white matter
PERIVENTRICULAR_MM = 4.5  # periventricular white matter: within this of the ventricles (CSF)
CHRONIC_STROKE_DEPTH_MM = 4.5  # a chronic stroke's centre: cortex at least this deep inside the brain
_FINE_MM = 1.5  # finer costs more than it gains: 1 mm takes 5.6 s per process against 1.1 s
BLOB_ROUGH_MM = 6.0  # smoothness of the field that roughens a lesion's outline (was 2 voxels)
# Dataset per lesion type and the modalities such datasets provide.
DATASETS = {
    "tumour": ("brats", ("t1", "t1c", "t2", "flair")),
    "stroke_chronic": ("atlas", ("t1",)),
    "stroke_acute": ("isles", ("dwi", "flair")),
    "wmh": ("wmh", ("t1", "flair")),
    "ms": ("msseg", ("t1", "t1c", "t2", "flair")),
}
# Intensity ranges (lo, hi) for tissue classes per modality, chosen so the physical ordering holds:
# classes: wm, gm, csf, core(necrosis/cavity), rim(enhancing), oedema/lesion.
_RANGES = {
    "t1": {"wm": (0.85, 1.0), "gm": (0.55, 0.7), "csf": (0.1, 0.25)},
    "t1c": {"wm": (0.85, 1.0), "gm": (0.55, 0.7), "csf": (0.1, 0.25)},
    "t2": {"wm": (0.3, 0.4), "gm": (0.45, 0.55), "csf": (0.9, 1.0)},
    "flair": {"wm": (0.35, 0.45), "gm": (0.5, 0.6), "csf": (0.05, 0.15)},
    "dwi": {"wm": (0.4, 0.5), "gm": (0.5, 0.6), "csf": (0.1, 0.2)},
}
# Lesion-compartment intensities relative to the modality (multiplier range on the WM level).
_LESION = {
    "oedema": {"t1": (0.6, 0.7), "t1c": (0.6, 0.7), "t2": (2.2, 2.6), "flair": (2.0, 2.4), "dwi": (1.1, 1.2)},
    "core": {"t1": (0.25, 0.35), "t1c": (0.25, 0.35), "t2": (2.6, 2.9), "flair": (0.5, 0.8), "dwi": (0.5, 0.6)},
    "enh": {"t1": (0.65, 0.75), "t1c": (1.5, 1.8), "t2": (1.8, 2.1), "flair": (1.8, 2.1), "dwi": (1.0, 1.1)},
    "acute": {"t1": (0.75, 0.85), "t1c": (0.75, 0.85), "t2": (1.8, 2.2), "flair": (1.6, 2.0), "dwi": (2.2, 2.8)},
    "cavity": {"t1": (0.12, 0.25), "t1c": (0.12, 0.25), "t2": (2.4, 2.8), "flair": (0.2, 0.4), "dwi": (0.3, 0.4)},
    "plaque": {"t1": (0.6, 0.75), "t1c": (0.6, 0.75), "t2": (2.0, 2.4), "flair": (2.0, 2.4), "dwi": (1.0, 1.1)},
    "plaque_enh": {"t1": (0.6, 0.75), "t1c": (1.4, 1.7), "t2": (2.0, 2.4), "flair": (2.0, 2.4), "dwi": (1.0, 1.1)},
}


def _blob(anat: Anatomy, rng: np.random.Generator, centre_vox: np.ndarray, radius_mm: float,
          rough: float = 0.3) -> np.ndarray:
    """Irregular ellipsoid: distance threshold perturbed by a smooth field."""
    sp = float(anat.affine[0, 0])
    idx = index_grid(anat.shape)
    axes = radius_mm / sp * rng.uniform(0.7, 1.3, 3)
    d = np.sqrt(sum(((idx[i] - centre_vox[i]) / axes[i]) ** 2 for i in range(3)))
    return d < 1.0 + rough * smooth_field(rng, anat.shape, BLOB_ROUGH_MM / sp)


def _pick(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    vox = np.argwhere(mask)
    return vox[rng.integers(len(vox))].astype(np.float32)


def _signed_depth(anat: Anatomy, key: str, inside: Callable[[Anatomy], np.ndarray]) -> np.ndarray:
    """Signed distance (mm) of each voxel centre to the boundary of ``inside(anatomy)``: positive within, negative
    outside. Computed on a 1.5 mm rendering of the template, as the distance to the nearest voxel centre across the
    boundary less half a voxel, and interpolated onto ``anat``'s grid: at the cohort's own voxels a 3 mm grid only
    knows distances of 3, 4.2, 5.2, 6 mm..."""

    def make() -> np.ndarray:
        sp = float(anat.affine[0, 0])
        fine = anat if sp <= _FINE_MM else load_anatomy(_FINE_MM)
        fsp = float(fine.affine[0, 0])
        m = inside(fine)
        sd = np.where(m, ndimage.distance_transform_edt(m, sampling=fsp),
                      -ndimage.distance_transform_edt(~m, sampling=fsp)) - np.where(m, fsp / 2, -fsp / 2)
        if fine is anat:
            return sd.astype(np.float32)
        vox = np.linalg.inv(fine.affine) @ anat.affine  # anat voxel -> fine voxel
        return ndimage.affine_transform(sd.astype(np.float32), vox[:3, :3], vox[:3, 3], output_shape=anat.shape,
                                        order=1, mode="nearest")

    return anat.memo(("signed_depth", key), make)


def placement_regions(anat: Anatomy) -> dict[str, np.ndarray]:
    """Where lesion centres are drawn: deep and periventricular white matter, deep cortex (chronic stroke)."""
    wm = _signed_depth(anat, "wm", lambda a: a.wm > 0.5)
    csf = _signed_depth(anat, "csf", lambda a: a.csf > 0.5)
    brain = _signed_depth(anat, "brain", lambda a: a.brain)
    return {
        "wm_deep": anat.memo("wm_deep", lambda: wm > DEEP_WM_MM),
        "periventricular": anat.memo("periventricular", lambda: (csf > -PERIVENTRICULAR_MM) & (anat.wm > 0.4)),
        "deep_cortex": anat.memo("deep_cortex", lambda: (anat.gm > 0.4) & (brain > CHRONIC_STROKE_DEPTH_MM)),
    }


def lesion_compartments(anat: Anatomy, rng: np.random.Generator, lesion_type: str) -> dict[str, np.ndarray]:
    """Boolean maps of each lesion compartment, all inside the brain."""
    regions = placement_regions(anat)
    wm_deep, periv = regions["wm_deep"], regions["periventricular"]
    brain = anat.brain
    out: dict[str, np.ndarray] = {}
    if lesion_type == "tumour":
        c = _pick(rng, wm_deep)
        r = rng.uniform(14, 24)
        whole = _blob(anat, rng, c, r * 1.6) & brain
        tumour = _blob(anat, rng, c, r) & brain
        core = _blob(anat, rng, c, r * 0.55, 0.2) & tumour
        out = {"oedema": whole & ~tumour, "enh": tumour & ~core, "core": core}
    elif lesion_type == "stroke_acute":
        # Vascular-territory shape: wedge from the MCA stem outwards, within one hemisphere.
        side = rng.choice([-1, 1])
        g = anat.mm_grid()
        ang = np.arctan2(g[2] - 5.0, side * g[0])
        centre_ang = rng.uniform(-0.6, 0.6)
        wedge = (np.abs(ang - centre_ang) < rng.uniform(0.25, 0.5)) & (side * g[0] > rng.uniform(20, 40))
        ybox = np.abs(g[1] - rng.uniform(-40, 10)) < rng.uniform(15, 30)
        out = {"acute": wedge & ybox & brain & (anat.gm + anat.wm > 0.5)}
    elif lesion_type == "stroke_chronic":
        c = _pick(rng, regions["deep_cortex"])
        out = {"cavity": _blob(anat, rng, c, rng.uniform(10, 20), 0.4) & brain}
    elif lesion_type in ("wmh", "ms"):
        n = rng.integers(4, 9) if lesion_type == "wmh" else rng.integers(5, 11)
        plaques = np.zeros(anat.shape, bool)
        enh = np.zeros(anat.shape, bool)
        for _ in range(n):
            site = periv if rng.random() < 0.7 else wm_deep
            b = _blob(anat, rng, _pick(rng, site), rng.uniform(6, 11), 0.2) & brain & (anat.wm > 0.2)
            if lesion_type == "ms" and rng.random() < 0.3:
                enh |= b
            else:
                plaques |= b
        out = {"plaque": plaques & ~enh, "plaque_enh": enh}
    else:
        raise ValueError(lesion_type)
    return out


def synth_lesion_case(anat: Anatomy, rng: np.random.Generator, lesion_type: str, modalities: tuple[str, ...],
                      site: str = "site-A", pose: Pose | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Images for the modalities this case has (∩ requested) and the binary lesion mask, all in one ``pose``; every
    image gets the scanner effects of ``site`` (as the structural T1s do), so the manifest's site column means
    something."""
    comps = lesion_compartments(anat, rng, lesion_type)
    mask = np.zeros(anat.shape, bool)
    for m in comps.values():
        mask |= m
    scale = 1.0 + 0.03 * rng.standard_normal()
    sp = float(anat.affine[0, 0])
    disp = np.stack([LESION_DEFORM_MM / sp * smooth_field(rng, anat.shape, DEFORM_SMOOTH_MM / sp) for _ in range(3)])
    head = anat.t1 * ~anat.brain
    images: dict[str, np.ndarray] = {}
    for mod in modalities:
        lv = {k: rng.uniform(*v) for k, v in _RANGES[mod].items()}
        img = anat.wm * lv["wm"] + anat.gm * lv["gm"] + anat.csf * lv["csf"]
        if mod in ("t2", "flair"):
            img = img + head * 0.5
        else:
            img = img + head
        for comp, m in comps.items():
            val = lv["wm"] * rng.uniform(*_LESION[comp][mod])
            soft = ndimage.gaussian_filter(m.astype(np.float32), 0.5)
            img = img * (1 - soft) + val * soft
        images[mod] = apply_site(warp(img.astype(np.float32), disp, scale, pose=pose), rng, site, sp)
    mask_w = warp(mask.astype(np.float32), disp, scale, order=0, pose=pose) > 0.5
    return images, mask_w
