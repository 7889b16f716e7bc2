"""Affine registration to MNI152: a shifted copy of the template is brought back onto it."""

import numpy as np
from nilearn.datasets import load_mni152_template

from neuromoe.data.registration import register_to_mni
from neuromoe.io.nifti import Image


def test_shifted_template_registers_back():
    tpl = load_mni152_template(resolution=2)
    data = np.asarray(tpl.get_fdata(), dtype=np.float32)[::2, ::2, ::2]
    aff = tpl.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    shifted = aff.copy()
    shifted[:3, 3] += [8.0, -6.0, 4.0]  # the image claims a wrong position by a known shift
    img = Image(data, shifted, shifted, data.shape, np.array([[0, 1], [1, 1], [2, 1]]))
    est = register_to_mni(img, iterations=40)
    centre = np.array([*(np.array(data.shape) / 2), 1.0])
    err = np.linalg.norm((est @ centre)[:3] - (aff @ centre)[:3])
    assert err < 3.0, (err, est)
