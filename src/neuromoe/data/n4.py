"""N4 bias-field correction (Tustison et al. 2010, SimpleITK's implementation) of one image within its head.

A receive coil's smooth sensitivity multiplies every intensity; the models read intensities, and a field of
``exp(0.25·g)`` moved MoME's lesion volumes by up to +220 % and brain ages by 9 y (docs/reliability.md, "Bias
fields"). Augmentation with such fields (:mod:`neuromoe.data.intensity`) only trims that; correcting the field
removes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from neuromoe.errors import ConfigError

__all__ = ["FIT_MM", "n4_correct"]

# The field is fitted on a grid this coarse (shrunk by whole factors): it is smooth on that scale, and the fit's
# cost is that grid's size. At 3 mm a full-resolution fit took 14-25 s an image; at ~9 mm ~1 s, and its residual
# log-field (RMS 0.03 of 0.25 on a synthetic T1) was as small as the 6 mm fit's.
FIT_MM = 9.0
LEVELS, ITERATIONS = 4, 50


def _sitk() -> Any:
    """SimpleITK, imported only where the correction is asked for (an optional dependency)."""
    try:
        import SimpleITK
    except ModuleNotFoundError as exc:
        raise ConfigError("preprocessing.bias_correct needs SimpleITK, which is not installed",
                          fix="pip install SimpleITK, or set preprocessing.bias_correct: false") from exc
    return SimpleITK


def n4_correct(a: np.ndarray, head: np.ndarray, voxel_mm: Sequence[float]) -> np.ndarray:
    """``a`` (3-D, intensities ≥ 0) divided by the N4 field fitted over ``head``'s positive voxels.

    One thread: ITK's threaded sums differ in the last bits from run to run, and a cached and a replayed
    preprocessing must agree. The field is smooth everywhere, so the background is divided by its extrapolation
    (a noise floor keeps its level relative to the head nearby)."""
    sitk = _sitk()
    mask = head & (a > 0)
    if mask.sum() < 100:  # nothing to fit the field to
        return a
    img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))  # SimpleITK's axes are (z, y, x)
    img.SetSpacing([float(v) for v in voxel_mm[::-1]])
    msk = sitk.GetImageFromArray(mask.astype(np.uint8))
    msk.CopyInformation(img)
    shrink = [max(1, round(FIT_MM / float(v))) for v in voxel_mm[::-1]]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([ITERATIONS] * LEVELS)
    n4.SetNumberOfThreads(1)
    n4.Execute(sitk.Shrink(img, shrink), sitk.Shrink(msk, shrink))
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img))
    return (a / np.exp(log_field)).astype(np.float32)
