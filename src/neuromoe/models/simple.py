"""A small 3D CNN encoder with the shared MoE head: the core demo's brain-age model.

It is deliberately simple (strided conv stages → global pooling → one :class:`MoELayer` → linear), so
it trains in well under a minute on two CPU cores and exercises the whole core path (registry, MoE
layer, Trainer, model format, report) before any of the larger families is involved. The MoE head is
residual: with a collapsed router the model degrades to a plain CNN regressor instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from monai.networks.blocks import Convolution
from torch import Tensor, nn

from neuromoe.models.registry import PretrainedMixin, register_model

__all__ = ["PRESETS", "SimpleCNNMoE", "SimpleOutput"]


class SimpleOutput(NamedTuple):
    """Prediction plus what the training loop and the report need from the MoE head."""

    prediction: Tensor  # (B, out_dim)
    aux_loss: Tensor  # scalar: load-balancing + router z-loss, already weighted
    stats: Any  # neuromoe.layers.moe.RouterStats: per-subject top-k experts, load, importance


class SimpleCNNMoE(PretrainedMixin, nn.Module):
    """Strided conv encoder → global average pool → residual MoE block → linear head.

    ``widths`` gives one stride-2 stage per entry (conv 3³ + norm + GELU, then a stride-1 conv), so the
    receptive field covers a whole 32³–64³ brain after 4 stages. BatchNorm is used because a
    volume's overall tissue contrast carries age information that instance normalisation would erase.
    """

    def __init__(self, in_channels: int = 1, out_dim: int = 1, widths: Sequence[int] = (8, 16, 32, 64),
                 dim: int = 64, num_experts: int = 4, top_k: int = 2, expert_hidden: int = 128,
                 balance_coef: float = 0.01, z_coef: float = 0.001, router_noise: float = 0.0,
                 dispatch: str = "sparse", dropout: float = 0.0, spatial_dims: int = 3):
        super().__init__()
        from neuromoe.layers.moe import MoELayer

        stages: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            stages += [
                Convolution(spatial_dims, prev, width, strides=2, kernel_size=3, act="GELU", norm="BATCH"),
                Convolution(spatial_dims, width, width, strides=1, kernel_size=3, act="GELU", norm="BATCH"),
            ]
            prev = width
        self.encoder = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1) if spatial_dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(prev, dim)
        self.norm = nn.LayerNorm(dim)
        self.moe = MoELayer(dim, num_experts, None, k=top_k, dispatch=dispatch, balance_coef=balance_coef,
                            z_coef=z_coef, expert_hidden=expert_hidden, noise_std=router_noise)
        self.drop = nn.Dropout(dropout)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) → pooled features (B, dim)."""
        return self.proj(self.pool(self.encoder(x)).flatten(1))

    def forward_head(self, features: Tensor) -> SimpleOutput:
        out = self.moe(self.norm(features))
        h = features + self.drop(out.output.to(features.dtype))
        pred = self.head(self.head_norm(h))
        return SimpleOutput(pred, out.aux_loss, out.stats)

    def forward(self, x: Tensor) -> SimpleOutput:
        return self.forward_head(self.forward_features(x))


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: a few thousand parameters, 16³ inputs
    "tiny": {"widths": (4, 8), "dim": 16, "num_experts": 4, "top_k": 2, "expert_hidden": 32},
    # CPU demo: ~20–40 s of training on 2 cores at 32³
    "demo": {"widths": (8, 16, 32, 64), "dim": 64, "num_experts": 8, "top_k": 2, "expert_hidden": 128},
    # a GPU-sized variant for 96³–128³ inputs
    "base": {"widths": (16, 32, 64, 128, 256), "dim": 256, "num_experts": 8, "top_k": 2, "expert_hidden": 512},
}


def _preset_factory(preset: str) -> Callable[..., SimpleCNNMoE]:
    def factory(**kwargs: Any) -> SimpleCNNMoE:
        return SimpleCNNMoE(**{**PRESETS[preset], **kwargs})

    factory.__doc__ = f"Tiny CNN + MoE head, '{preset}' preset: {PRESETS[preset]} (kwargs override)."
    factory.__qualname__ = f"simple_cnn_moe_{preset}"
    return factory


for _name in PRESETS:
    register_model(f"simple_cnn_moe_{_name}", family="core")(_preset_factory(_name))
