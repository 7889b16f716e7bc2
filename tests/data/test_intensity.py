"""Bias-field augmentation on the raw scale: what a biased scan looks like after the pipeline's normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from neuromoe.data.intensity import RandBiasFieldRaw, raw_offset


def _head(spatial_dims: int = 3, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A raw head (bright tissue, a darker core, a near-zero skull, scalp) in a zero background, and its mask."""
    g = np.indices((n,) * spatial_dims).astype(np.float32) - (n - 1) / 2
    r = np.sqrt((g**2).sum(0))
    raw = np.where(r < 5, 0.3, np.where(r < 9, 1.0, np.where(r < 12, 0.02, np.where(r < 14, 0.6, 0.0))))
    raw = ndimage.gaussian_filter(raw.astype(np.float32), 0.5)
    head = r < 14
    return np.where(head, raw, 0.0).astype(np.float32), head


def _zscore(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.where(m, (a - a[m].mean()) / a[m].std(), 0.0).astype(np.float32)


def _drawn(strength: float, seed: int = 3, spatial_dims: int = 3) -> RandBiasFieldRaw:
    t = RandBiasFieldRaw(prob=1.0, strength=(strength, strength))
    t.set_random_state(seed)
    t.randomize(spatial_dims)
    return t


def test_raw_offset_undoes_a_zscore_up_to_scale() -> None:
    raw, head = _head()
    x = _zscore(raw, head)
    c = raw_offset(x)
    assert np.all(x[head] + c >= -1e-6)
    # raw ∝ x + c over the head, to the extent the darkest head voxel is near zero raw
    k = (x[head] + c) / np.maximum(raw[head], 1e-3)
    bright = raw[head] > 0.25
    assert np.ptp(k[bright]) / k[bright].mean() < 0.1
    assert raw_offset(np.zeros((4, 4))) == 0.0


@pytest.mark.parametrize("strength", [0.1, 0.3])
def test_field_on_the_raw_scale_matches_a_biased_scan_normalised_again(strength: float) -> None:
    """The scanner multiplies raw intensities; the pipeline then z-scores the head. Acting on the z-scored image
    with its raw offset reproduces that; multiplying the z-scored image (MONAI's RandBiasField) does not."""
    raw, head = _head()
    t = _drawn(strength)
    field = np.exp(t.log_field(raw.shape))
    truth = _zscore(raw * field, head)
    x = _zscore(raw, head)
    ours = _zscore(t(x[None], [raw_offset(x)], randomize=False)[0], head)
    stretched = _zscore(x * field, head)
    err = np.abs(ours - truth)[head].mean()
    assert err < 0.05
    assert np.abs(stretched - truth)[head].mean() > 4 * err


def test_background_stays_zero_and_raw_input_is_multiplied() -> None:
    raw, head = _head()
    t = _drawn(0.2)
    field = np.exp(t.log_field(raw.shape))
    x = _zscore(raw, head)[None]
    out = t(x, [raw_offset(x)], randomize=False)
    assert np.all(out[0][~head] == 0) and not np.allclose(out[0][head], x[0][head])
    np.testing.assert_allclose(t(raw[None], randomize=False)[0], raw * field, rtol=1e-6)


def test_strength_is_the_log_fields_rms_and_draws_are_seeded() -> None:
    for dims in (2, 3):
        lf = _drawn(0.25, spatial_dims=dims).log_field((20,) * dims)
        assert lf.shape == (20,) * dims
        assert np.sqrt(np.mean(lf**2)) == pytest.approx(0.25, rel=1e-4)
    a, b, c = (_drawn(0.2, seed=s).log_field((8, 9, 10)) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    x = np.ones((1, 6, 6, 6), np.float32)
    assert np.array_equal(RandBiasFieldRaw(prob=0.0)(x), x)
    with pytest.raises(ValueError, match="strength"):
        RandBiasFieldRaw(strength=(0.3, 0.1))
