"""N4 bias-field correction (Tustison et al. 2010, SimpleITK's implementation) of one image within its head.

A receive coil's smooth sensitivity multiplies every intensity, and the models read intensities: a field of
``exp(0.3·g)`` moved the demo models' lesion volumes by +93 to +220 % and brain ages by 8.9 y on average
(docs/reliability.md, "Bias fields"). Augmentation with such fields (:mod:`neuromoe.data.intensity`) trims that;
correcting the field removes most of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["FIT_MM", "n4_correct"]

# The field is fitted on a grid this coarse (shrunk by whole factors): it is smooth on that scale, and the fit's
# cost is that grid's size. On a 3 mm synthetic T1 a full-resolution fit took 14-25 s, a 6 mm one 3.7 s (residual
# log-field RMS 0.016 of 0.25, four levels), a 9 mm one 1.2 s (0.034).
FIT_MM = 9.0
# Three fitting levels (a B-spline mesh of 4 elements across the fitted box at the last): with four, the field
# followed large lesions and took 11 % of their contrast to normal brain on average (33 % at worst) on synthetic
# FLAIR / T1c / T2 test cases; with three it takes 4 % (20 % at worst) and leaves a log-RMS of 0.055 of a 0.25
# field (docs/reliability.md, "Bias fields").
LEVELS, ITERATIONS = 3, 50
# Voxels of background kept around the head's box in the fit (the mask leaves them out; they pad the mesh's domain).
BOX_MARGIN = 2
# The fit leaves out the head's voxels darker than this fraction of its peak (scalp edge, dark CSF): with them, one
# edge voxel more or less (zero padding, another noise floor) changed the log-histogram N4 sharpens and the field by
# a log-RMS of ~0.015 on synthetic T1s; without them by ~0.003 (docs/reliability.md, "Bias fields").
FIT_FLOOR = 0.2


def n4_correct(a: np.ndarray, head: np.ndarray, voxel_mm: Sequence[float]) -> np.ndarray:
    """``a`` (3-D, intensities ≥ 0) divided by the N4 field fitted over ``head``'s voxels above ``FIT_FLOOR``.

    One thread, like the registration: a cached and a replayed preprocessing must agree on any machine, and ITK
    does not promise threaded reductions independent of the core count (1 and 4 threads agreed here). The field
    is fitted over the bounding box of those voxels (plus ``BOX_MARGIN``), so the same head gets the same field
    whatever field of view holds it; the background outside the box is divided by the field at the box's nearest
    face (a noise floor keeps its level relative to the head nearby)."""
    import SimpleITK as sitk

    mask = head & (a > FIT_FLOOR * np.percentile(a[head], 99.9)) if head.any() else head
    if mask.sum() < 100:  # nothing to fit the field to
        return a
    # The B-spline mesh spans the image it is given, so the fit sees only the fitted voxels' box: over the whole
    # field of view, zero padding or another position of the same head moved the mesh and the field (~0.1 z)
    box = tuple(slice(max(int(i.min()) - BOX_MARGIN, 0), min(int(i.max()) + BOX_MARGIN + 1, n))
                for i, n in zip(np.nonzero(mask), a.shape, strict=True))
    img = sitk.GetImageFromArray(np.ascontiguousarray(a[box], dtype=np.float32))  # SimpleITK's axes are (z, y, x)
    img.SetSpacing([float(v) for v in voxel_mm[::-1]])
    msk = sitk.GetImageFromArray(mask[box].astype(np.uint8))
    msk.CopyInformation(img)
    shrink = [max(1, round(FIT_MM / float(v))) for v in voxel_mm[::-1]]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([ITERATIONS] * LEVELS)
    n4.SetNumberOfThreads(1)
    n4.Execute(sitk.Shrink(img, shrink), sitk.Shrink(msk, shrink))
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img))
    # outside the box (background only) the field is continued from the box's faces
    log_field = np.pad(log_field, [(s.start, n - s.stop) for s, n in zip(box, a.shape, strict=True)], mode="edge")
    return (a / np.exp(log_field)).astype(np.float32)
