"""Scanner intensity effects for augmentation, applied on the raw scale the scanner acts on.

A receive-coil bias field multiplies the *raw* intensities. The images a model trains on are already normalised
(z-scored over the head, zero outside), and multiplying those by a field — what MONAI's ``RandBiasField`` does to
whatever it is given — only stretches contrast about zero. After the pipeline's normalisation a biased scan
looks different: a region the field brightens by a factor ``f`` is shifted by ``(f - 1)·c`` as well, where
``c = μ/σ`` of the head. Trained on the wrong effect, the demo MoME's predicted lesion volumes rose by 25-89 %
under a field of ``exp(0.15·g)`` (+8-69 % trained on the right one; docs/reliability.md, "Bias fields").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.transforms import RandomizableTransform
from numpy.polynomial import legendre

__all__ = ["RandBiasFieldRaw", "raw_offset"]


def raw_offset(x: np.ndarray) -> float:
    """``c`` with ``x + c`` proportional to the raw intensities of an image normalised over its non-zero voxels.

    Raw MR magnitudes are ≥ 0 and a head holds voxels near zero (air in sinuses, skull, CSF on a T1), so the
    darkest normalised voxel sits at ``-μ/σ``: an affine normalisation (z-score, percentile) is undone up to a
    scale, which a multiplicative field does not see."""
    a = np.asarray(x)
    fg = a[a != 0]
    return max(0.0, -float(fg.min())) if fg.size else 0.0


class RandBiasFieldRaw(RandomizableTransform):
    """A smooth multiplicative field ``exp(g)``, ``g`` a random Legendre polynomial of ``degree`` whose RMS over
    the image is drawn from ``strength`` (its mean, a gain, included: on a patch, the field's level there relative
    to the head's is part of what a biased scan shows).

    ``img`` is ``(C, *spatial)``, one field for every channel (one coil). With ``offset`` (one per channel; see
    :func:`raw_offset`) the channels are normalised images: the field acts on ``img + offset`` over their non-zero
    voxels and the offset is taken off again, so the result is on the input's normalisation, as the same scan
    biased and normalised by the pipeline would be (up to the head's mean gain); the background stays zero.
    Without ``offset`` the image is taken as raw and multiplied."""

    def __init__(self, prob: float = 0.3, strength: tuple[float, float] = (0.05, 0.3), degree: int = 3):
        super().__init__(prob)
        if not 0 <= strength[0] <= strength[1]:
            raise ValueError(f"strength must be an increasing pair of RMS log-gains >= 0, got {strength}")
        self.strength, self.degree = tuple(strength), degree
        self._coeffs: np.ndarray | None = None
        self._rms = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._rms = float(self.R.uniform(*self.strength))
            self._coeffs = self.R.standard_normal((self.degree + 1,) * int(data))

    def log_field(self, shape: Sequence[int]) -> np.ndarray:
        """The drawn field's logarithm on a grid of ``shape`` spanning [-1, 1] per axis."""
        assert self._coeffs is not None, "randomize() first"
        order = np.indices(self._coeffs.shape).sum(0)
        coeffs = np.where(order <= self.degree, self._coeffs, 0.0)  # total degree ≤ degree
        g = coeffs
        for n in shape:  # contract one axis at a time with its Legendre values: (deg+1, n)
            basis = legendre.legvander(np.linspace(-1.0, 1.0, n), self.degree).T
            g = np.tensordot(g, basis, axes=([0], [0]))
        rms = float(np.sqrt(np.mean(g**2)))
        return (g * (self._rms / rms if rms > 0 else 0.0)).astype(np.float32)

    def __call__(self, img: Any, offset: Sequence[float] | None = None, randomize: bool = True) -> np.ndarray:
        x = np.asarray(img, dtype=np.float32)
        if randomize:
            self.randomize(x.ndim - 1)
        if not self._do_transform:
            return x
        field = np.exp(self.log_field(x.shape[1:]))
        if offset is None:
            return x * field
        out = x.copy()
        for ch, c in enumerate(offset):
            fg = x[ch] != 0
            out[ch][fg] = field[fg] * (x[ch][fg] + c) - c
        return out
