"""N4 bias-field correction in preprocessing: a biased scan reaches the model as the unbiased one would."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from neuromoe.data.intensity import RandBiasFieldRaw
from neuromoe.data.preprocess import PreprocSpec, preprocess_image
from neuromoe.io.nifti import load_nifti


def _on_common_voxels(p, q) -> tuple[np.ndarray, np.ndarray]:
    """Two outputs on the same world lattice, cut to the voxels both windows hold."""
    off = np.round(np.linalg.solve(p.affine, q.affine)[:3, 3]).astype(int)
    x, y = p.data[0], q.data[0]
    sp = tuple(slice(max(o, 0), min(n, o + m)) for o, n, m in zip(off, x.shape, y.shape, strict=True))
    sq = tuple(slice(max(-o, 0), max(-o, 0) + s.stop - s.start) for o, s in zip(off, sp, strict=True))
    return x[sp], y[sq]


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, str]:
    """The MNI template (bundled with nilearn) and a copy under a smooth coil field, RMS 0.25 in log."""
    from nilearn.datasets import load_mni152_template

    tpl = load_mni152_template(resolution=2)
    a = np.asarray(tpl.get_fdata(), np.float32)
    t = RandBiasFieldRaw(prob=1.0, strength=(0.25, 0.25))
    t.set_random_state(0)
    t.randomize(3)
    out = tmp_path_factory.mktemp("n4")
    paths = {}
    for name, data in (("clean", a), ("biased", t(a[None])[0])):
        paths[name] = str(out / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, tpl.affine), paths[name])
    return paths


def test_a_biased_scan_reaches_the_model_as_the_unbiased_one(scans) -> None:
    err = {}
    for correct in (False, True):
        spec = PreprocSpec(spacing=(4.0, 4.0, 4.0), shape=(48, 56, 48), head_mask=True, bias_correct=correct)
        x, y = _on_common_voxels(*(preprocess_image(load_nifti(scans[k]), spec) for k in ("clean", "biased")))
        both = (x != 0) & (y != 0)
        err[correct] = float(np.abs(x - y)[both].mean())  # z units
    assert err[True] < 0.1 and err[True] < 0.3 * err[False]


def test_the_correction_is_the_same_on_every_run(scans) -> None:
    spec = PreprocSpec(spacing=(4.0, 4.0, 4.0), shape=(48, 56, 48), head_mask=True, bias_correct=True)
    a, b = (preprocess_image(load_nifti(scans["biased"]), spec).data for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_specs_stored_without_the_key_replay_without_it() -> None:
    assert PreprocSpec.from_dict({"spacing": [2, 2, 2]}).bias_correct is False


def test_a_wider_field_of_view_of_the_same_head_gets_the_same_correction(scans, tmp_path) -> None:
    """N4's B-spline mesh spans the image it is given: fitted over the whole field of view, 24 mm of zero padding
    on two sides moved the corrected head by up to ~0.1 z (99th percentile). Over the head's box: 0.005."""
    img = nib.load(scans["biased"])
    a = np.asarray(img.get_fdata(), np.float32)
    padded = np.pad(a, ((12, 0), (0, 0), (0, 12)))  # 24 mm more below x and above z (2 mm voxels)
    aff = img.affine.copy()
    aff[:3, 3] -= aff[:3, 0] * 12
    path = str(tmp_path / "padded.nii.gz")
    nib.save(nib.Nifti1Image(padded, aff), path)
    spec = PreprocSpec(spacing=(4.0, 4.0, 4.0), shape=None, head_mask=True, bias_correct=True)
    x, y = _on_common_voxels(*(preprocess_image(load_nifti(p), spec) for p in (scans["biased"], path)))
    assert x.shape == y.shape and x.size > 1000
    d = np.abs(x - y)[(x != 0) | (y != 0)]  # z units; without N4 one head-edge voxel differs, nothing else
    assert float(np.percentile(d, 99)) < 0.02 and float(d.mean()) < 2e-3  # before: 0.10 and 0.014


def test_a_head_that_touches_the_field_of_view_is_corrected() -> None:
    """The head's box is clipped to the array (a scan cut at the top of the head)."""
    from neuromoe.data.n4 import n4_correct

    z = np.linspace(-1, 1, 24)
    field = np.exp(0.2 * z)[None, None, :] * np.ones((20, 22, 24))
    head = np.zeros((20, 22, 24), bool)
    head[3:17, 3:19, 4:] = True  # up to the last slice
    a = np.where(head, 100.0 * field, 0.0).astype(np.float32)
    out = n4_correct(a, head, (4.0, 4.0, 4.0))
    assert out.shape == a.shape and np.isfinite(out).all()
    assert out[head].std() / out[head].mean() < 0.5 * a[head].std() / a[head].mean()
