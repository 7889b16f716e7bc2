"""Instance normalisation computed as a per-channel group norm: the same function, faster on CPU."""

from __future__ import annotations

from monai.networks.layers.factories import Norm
from torch import nn

__all__ = ["INSTANCE_NORM", "InstanceNormGN"]


class InstanceNormGN(nn.GroupNorm):
    """``InstanceNorm{1,2,3}d(num_features, affine=True)`` computed as ``GroupNorm(num_features, num_features)``.

    Why: the same function (statistics per sample and channel over the spatial axes, biased variance, the same
    ``eps`` and per-channel affine; the same state-dict keys, so weights saved with either load into the
    other), but PyTorch's CPU ``instance_norm`` runs batch norm on a reshaped copy: on a 2-core AVX2 CPU it
    took 8× longer forward and 2.6× longer forward + backward than ``group_norm`` on a (4, 8, 32³) tensor.
    Any number of spatial axes, so a 3-D block is tested in 2-D. No running statistics, as InstanceNorm's default.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_features, num_features, eps=eps, affine=affine)


Norm.add_factory_callable("INSTANCE_GN", lambda dim: InstanceNormGN)  # MONAI blocks take it by name
INSTANCE_NORM = ("INSTANCE_GN", {"affine": True})
