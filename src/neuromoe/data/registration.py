"""Affine registration to the nilearn MNI152 template with SimpleITK (Mattes MI, multi-resolution)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from neuromoe.io.nifti import Image


def _to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """RAS+ array + affine → SimpleITK image (LPS physical space)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    img.SetSpacing(zooms.tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    img.SetDirection((lps[:3, :3] / zooms).flatten().tolist())
    return img


def register_to_mni(image: Image, *, iterations: int = 100) -> np.ndarray:
    """Return the affine that maps ``image``'s voxels to MNI space (voxel → MNI world)."""
    from nilearn.datasets import load_mni152_template

    tpl = load_mni152_template(resolution=2)
    fixed = _to_sitk(np.asarray(tpl.get_fdata(), dtype=np.float32), tpl.affine)
    moving = _to_sitk(image.data, image.affine)
    tx = sitk.AffineTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=0)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, iterations)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(fixed, moving)
    # tx maps fixed (MNI, LPS) points to moving points; its inverse maps the image's world into MNI.
    m = np.eye(4)
    m[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c = np.asarray(tx.GetCenter())
    m[:3, 3] = np.asarray(tx.GetTranslation()) + c - m[:3, :3] @ c
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.linalg.inv(m) @ flip @ image.affine
