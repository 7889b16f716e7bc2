"""Instance normalisation computed as a per-channel group norm: the same function, faster on CPU."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Norm
from torch import Tensor, nn

__all__ = ["INSTANCE_NORM", "InstanceNormGN"]


class InstanceNormGN(nn.GroupNorm):
    """``InstanceNorm{1,2,3}d(num_features, affine=True)`` computed as ``GroupNorm(num_features, num_features)``.

    Why: the same function (statistics per sample and channel over the spatial axes, biased variance, the same
    ``eps`` and per-channel affine; the same state-dict keys, so weights saved with either load into the
    other), but PyTorch's CPU ``instance_norm`` runs batch norm on a reshaped copy: on a 2-core AVX2 CPU it
    took 8× longer forward and 2.6× longer forward + backward than ``group_norm`` on a (4, 8, 32³) tensor.
    Any number of spatial axes, so a 3-D block is tested in 2-D. No running statistics, as InstanceNorm's default.

    A channels-last CPU input (``channels_last_3d`` / ``channels_last``, as the CPU trainers and inference use
    for oneDNN's convolutions) is normalised in the default layout and handed back channels-last: PyTorch's CPU
    ``group_norm`` on channels-last bf16 was 5× slower forward + backward than the two copies and the contiguous
    kernel (a (4, 8, 32³) tensor: 21 → 4.4 ms), which made a demo MoME training step 1.10 → 0.46 s
    (docs/benchmarks.md, "Instance norm in channels-last"). GPU inputs keep PyTorch's path (not measured there).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_features, num_features, eps=eps, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        fmt = _channels_last_format(x)
        if fmt is None:
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=fmt)


def _channels_last_format(x: Tensor) -> torch.memory_format | None:
    """The channels-last format of a CPU ``x``, or None (GPU, default layout, or both, as for 1×1 maps)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    if fmt is None or x.device.type != "cpu" or x.is_contiguous() or not x.is_contiguous(memory_format=fmt):
        return None
    return fmt


Norm.add_factory_callable("INSTANCE_GN", lambda dim: InstanceNormGN)  # MONAI blocks take it by name
INSTANCE_NORM = ("INSTANCE_GN", {"affine": True})
