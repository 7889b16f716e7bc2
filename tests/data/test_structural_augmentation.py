"""Structural augmentation: the scanner-style contrast block changes contrast, not the intensity scale."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from neuromoe.data.structural import RandHeadNoise, augmentation


def _phantom() -> torch.Tensor:
    """A z-scored two-tissue ball: contrast and edges for the augmentation to act on."""
    g = np.indices((24, 24, 24)).astype(np.float32) - 11.5
    r = np.sqrt((g**2).sum(0))
    img = np.where(r < 6, 1.0, np.where(r < 10, 0.6, 0.05)).astype(np.float32)
    img = ndimage.gaussian_filter(img, 0.5)
    return torch.from_numpy((img - img.mean()) / img.std())[None]


def test_contrast_augmentation_keeps_moments_and_changes_contrast() -> None:
    x = _phantom()
    t = augmentation(0, spatial=False, contrast=True)
    outs = [torch.as_tensor(t(x)).float() for _ in range(12)]
    inner, outer = x[0, 12, 12, 12], x[0, 12, 12, 20]
    ratios = []
    for y in outs:
        # intensity scale/shift and noise come after the contrast block, so moments stay close, not exact
        assert abs(float(y.mean() - x.mean())) < 0.2 and abs(float(y.std() / x.std()) - 1) < 0.2
        ratios.append(float((y[0, 12, 12, 12] - y[0, 12, 12, 20]) / (inner - outer)))
    assert np.ptp(ratios) > 0.05  # tissue contrast varies between draws


def test_augmentation_is_a_function_of_its_seed() -> None:
    x = _phantom()
    a, b = augmentation(5, contrast=True), augmentation(5, contrast=True)
    for _ in range(3):
        assert torch.equal(torch.as_tensor(a(x)), torch.as_tensor(b(x)))
    plain = augmentation(5, spatial=False)
    assert [type(s).__name__ for s in plain.transforms] == ["RandScaleIntensity", "RandShiftIntensity",
                                                           "RandGaussianNoise"]


def test_an_items_augmentation_does_not_depend_on_what_was_fetched_before() -> None:
    """The Trainer seeds the RNGs per (epoch, item); the MONAI transforms' own RNG used to carry state from item to
    item, so a resumed run (or another worker / rank) augmented the same item differently: inexact resume."""
    import pandas as pd

    from neuromoe.data.structural import StructuralDataset
    from neuromoe.engine.trainer import _SeededSamples

    images = np.stack([_phantom().numpy() * (1 + 0.1 * k) for k in range(3)]).astype(np.float16)
    table = pd.DataFrame({"subject": ["a", "b", "c"], "t1": ["a.nii", "b.nii", "c.nii"]})
    for contrast in (False, True):
        ds = _SeededSamples(StructuralDataset(table, [], None, (24, 24, 24), augment=True, contrast=contrast,
                                              images=images), base=7)
        after_others = [ds[i]["image"] for i in (0, 1, 2)][2]
        alone = _SeededSamples(StructuralDataset(table, [], None, (24, 24, 24), augment=True, contrast=contrast,
                                                 images=images), base=7)[2]["image"]
        assert torch.equal(after_others, alone)
        assert not torch.equal(ds[2]["image"], torch.from_numpy(images[2].astype(np.float32)))  # it does augment
        # a plain float tensor, not MONAI's MetaTensor: its __torch_function__ wrapped every op of the model's
        # forward and backward pass (8 % of a demo fine-tuning step)
        assert type(alone) is torch.Tensor and alone.dtype == torch.float32


def test_scanner_effects_leave_the_background_at_zero() -> None:
    """Gamma, bias field and blur act on the raw scale of the head and the head is normalised again: applied to the
    z-scored image, gamma (which maps its min..max) lifted the zero background to a level of its own."""
    g = np.indices((24, 24, 24)).astype(np.float32) - 11.5
    r = np.sqrt((g**2).sum(0))
    head = r < 10
    raw = np.where(r < 6, 1.0, 0.5) * head
    x = torch.from_numpy(np.where(head, (raw - raw[head].mean()) / raw[head].std(), 0).astype(np.float32))[None]
    scanner = augmentation(0, spatial=False, contrast=True).transforms[0]
    changed = 0
    for _ in range(8):
        y = torch.as_tensor(scanner(x)).float()
        assert torch.all(y[0][torch.from_numpy(~head)] == 0)
        inside = y[0][torch.from_numpy(head)]
        assert abs(float(inside.mean())) < 1e-4 and abs(float(inside.std()) - 1) < 1e-3
        changed += not torch.allclose(y, x, atol=1e-3)
    assert changed >= 4


def test_head_noise_leaves_the_background_zero_and_stays_within_its_sd() -> None:
    x = _phantom()
    x[:, :4] = 0.0  # a background slab
    t = RandHeadNoise(0.2, prob=1.0)
    t.set_random_state(0)
    sds = []
    for _ in range(8):
        y = t(x)
        assert torch.equal(y[:, :4], x[:, :4])
        sds.append(float((y - x)[:, 4:].std()))
    assert min(sds) > 0.0 and max(sds) < 0.21 and np.ptp(sds) > 0.02  # a new sd per draw, up to 0.2
    assert [type(s).__name__ for s in augmentation(0, spatial=False, noise=0.2).transforms] == ["RandHeadNoise"]
