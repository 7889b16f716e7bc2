"""Structural T1 subjects: head size by sex, age atrophy, AD/MCI/PD regional patterns, site effects."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from neuromoe.data.synth.anatomy import Anatomy, Pose, smooth_field, warp

# MNI centres (mm) and radii of the regions the diagnosis patterns act on, both hemispheres.
MEDIAL_TEMPORAL = [((s * 26.0, -22.0, -14.0), (7.0, 14.0, 8.0)) for s in (-1, 1)] + \
    [((s * 22.0, -4.0, -20.0), (7.0, 7.0, 7.0)) for s in (-1, 1)] + \
    [((s * 24.0, -8.0, -32.0), (7.0, 10.0, 6.0)) for s in (-1, 1)]
VENTRICLES = [((s * 14.0, -8.0, 16.0), (9.0, 28.0, 10.0)) for s in (-1, 1)]
TEMPORAL_HORNS = [((s * 30.0, -18.0, -10.0), (5.0, 12.0, 5.0)) for s in (-1, 1)]
PD_REGIONS = [((s * 25.0, 2.0, 2.0), (7.0, 12.0, 8.0)) for s in (-1, 1)] + \
    [((s * 10.0, -18.0, -12.0), (5.0, 6.0, 5.0)) for s in (-1, 1)]
AD_SEVERITY = {"CN": 0.0, "MCI": 0.5, "AD": 1.0}

# Site effects: (bias strength, noise sd, gamma, blur sigma in voxels). Noise and blur are the scanner's at the
# cohort's voxel size; the bias field is a coil's, smooth over BIAS_SMOOTH_MM whatever the voxel size.
SITES = {"site-A": (0.05, 0.02, 1.0, 0.0), "site-B": (0.08, 0.04, 0.9, 0.5), "site-C": (0.06, 0.03, 1.1, 0.3)}
BIAS_SMOOTH_MM = 75.0
# Anatomical variation: a smooth displacement of DEFORM_MM sd, correlated over DEFORM_SMOOTH_MM (as 1.2 voxels it
# was 3.6 mm at 3 mm voxels and 2.4 mm at 2 mm).
DEFORM_MM, DEFORM_SMOOTH_MM = 3.6, 20.0


def region_union(anat: Anatomy, regions) -> np.ndarray:
    return anat.memo(("regions", tuple(regions)),
                     lambda: np.clip(sum(anat.region(c, r) for c, r in regions), 0, 1))


# Depth (mm) of the outer band of the brain that age thins. As a whole number of erosions, round(9 / voxel), the
# band held 330 mL of grey matter at 2 mm voxels and 355 at 3 mm, and the same subjects rendered at 2 mm read 4.2 y
# younger to a model trained at 3 mm (docs/experiments.md, "Voxel size"). Measured in mm, 6.5 mm holds 347-351 mL at
# 1.5-4 mm, within 3 % of the former 3 mm band.
CORTEX_DEPTH_MM = 6.5


def cortex_band(anat: Anatomy) -> np.ndarray:
    """Weight in [0, 1] of the grey matter (> 0.3) within ``CORTEX_DEPTH_MM`` of the brain's edge: the Euclidean
    distance to the nearest voxel outside the brain, in mm; a voxel spans depths ``d - voxel .. d``, so the one
    the limit cuts is weighted by its share. Voxels outside the brain mask count as edge."""

    def make() -> np.ndarray:
        sp = np.linalg.norm(anat.affine[:3, :3], axis=0)
        d = ndimage.distance_transform_edt(anat.brain, sampling=sp)
        share = np.clip((CORTEX_DEPTH_MM + sp.mean() - d) / sp.mean(), 0.0, 1.0)
        return (share * (anat.gm > 0.3)).astype(np.float32)

    return anat.memo("cortex", make)


def synth_t1(anat: Anatomy, rng: np.random.Generator, *, age: float, sex: str, dx_ad: str, dx_pd: str,
             site: str, pose: Pose | None = None) -> np.ndarray:
    """One subject's T1 (float32, template grid; the head in the template's pose unless ``pose`` moves it);
    effects act on tissue maps before contrast is applied."""
    gm, wm, csf = anat.gm.copy(), anat.wm.copy(), anat.csf.copy()
    cortex = cortex_band(anat)
    age_z = (age - 45.0) / 30.0  # 0 at 45 y, 1 at 75 y
    # Age: cortical thinning, WM loss, ventricle growth (per-subject variability in rate).
    rate = max(0.0, 1.0 + 0.1 * rng.standard_normal())
    thin = 0.45 * age_z * rate * cortex
    lost_gm = gm * np.clip(thin, -0.2, 0.6)
    vent = region_union(anat, VENTRICLES) * anat.brain
    lost_wm = wm * np.clip(0.9 * age_z * rate, -0.2, 0.9) * vent
    lost_wm += wm * np.clip(0.06 * age_z * rate, -0.1, 0.2)
    # AD-like: medial temporal GM loss + ventricle / temporal horn enlargement.
    sev = AD_SEVERITY.get(dx_ad, 0.0) * max(0.3, 1.0 + 0.2 * rng.standard_normal())
    mtl = region_union(anat, MEDIAL_TEMPORAL)
    lost_gm += gm * np.clip(0.8 * sev * mtl, 0, 0.9)
    lost_wm += wm * np.clip(0.12 * sev * vent + 0.7 * sev * region_union(anat, TEMPORAL_HORNS), 0, 0.9)
    gm, wm = gm - lost_gm, wm - lost_wm
    csf = csf + lost_gm + lost_wm
    # PD-like: subtle putamen/SN signal change (iron, neuronal loss) without volume change.
    pd_w = region_union(anat, PD_REGIONS) * (0.25 if dx_pd == "PD" else 0.0)
    # Tissue contrast with small per-subject jitter.
    i_wm, i_gm, i_csf = 1.0 + 0.015 * rng.standard_normal(), 0.62 + 0.015 * rng.standard_normal(), 0.18
    brain = wm * i_wm + gm * i_gm * (1.0 - pd_w) + csf * i_csf
    head = anat.t1 * (~anat.brain) + brain * anat.brain
    # Anatomy: sex-dependent head size and a smooth random deformation.
    scale = (1.04 if sex == "M" else 0.97) * (1.0 + 0.05 * rng.standard_normal())
    sp = float(anat.affine[0, 0])
    disp = np.stack([DEFORM_MM / sp * smooth_field(rng, anat.shape, DEFORM_SMOOTH_MM / sp) for _ in range(3)])
    img = warp(head.astype(np.float32), disp, scale, pose=pose)
    return apply_site(img, rng, site, sp)


def apply_site(img: np.ndarray, rng: np.random.Generator, site: str, spacing: float) -> np.ndarray:
    """Scanner effects on an image of ``spacing`` mm voxels: bias field, blur, contrast gamma, Rician-like noise."""
    bias, noise, gamma, blur = SITES[site]
    img = img * np.exp(bias * smooth_field(rng, img.shape, BIAS_SMOOTH_MM / spacing))
    if blur > 0:
        img = ndimage.gaussian_filter(img, blur)
    img = np.clip(img, 0, None) ** gamma
    re = img + noise * rng.standard_normal(img.shape)
    im = noise * rng.standard_normal(img.shape)
    return np.sqrt(re**2 + im**2).astype(np.float32)
