"""DenseFormer-MoE: a DenseNet + ViT backbone for T1 MRI, its MAE pretraining and a task-routed MoE head.

After Ding, Lu & Liu (IEEE TMI 2025). The paper is public at abstract level only, so every choice below
is ours and is documented here and in ``docs/denseformer.md``:

* **How DenseNet and ViT are joined — ``stem="volume"`` or ``stem="patch"``.** Both use MONAI dense
  blocks (BN-ReLU-Conv1×1-BN-ReLU-Conv3×3 with growth rate) and compression transitions with 2× average
  pooling. ``volume`` (:class:`DenseNetVolumeStem`) runs them over the whole volume down to the token
  grid and projects each final-map cell to one token; receptive fields cross patch borders, and for
  MAE the voxels of masked patches are zeroed *before* the stem so masked content cannot reach a
  visible token (``stem_masking="zero"``), or, with ``stem_masking="sparse"`` (SparK, Tian et al. 2023),
  masked patches stay empty at every layer and BatchNorm sees visible voxels only, so the stem is not
  trained on volumes that are 75 % zeros. ``patch`` (:class:`DenseNetPatchStem`, the default so that models saved before the
  option load unchanged) runs one small DenseNet on every ``patch_size``³ patch independently and
  flattens its final map into one token: no receptive field crosses a patch border and the MAE
  encoder embeds visible patches only (cheaper), but on small cohorts the ViT then has to learn all
  context itself, and age was not learned at demo scale (docs/experiments.md).
* Tokens get fixed 3D sin-cos position embeddings (a third of the channels per axis) and a CLS token;
  the encoder is a pre-norm ViT using ``F.scaled_dot_product_attention`` (MONAI's transformer block
  needs ``einops``, which is not a dependency, and applies attention dropout in eval mode).
* **MAE**: mask ratio 0.75, per-sample uniform random masking of patches, encoder on visible tokens
  only, light decoder (narrower, shallower pre-norm ViT), MSE on per-patch normalised voxels of masked
  patches only (``norm_pix_loss``), as in He et al. 2022.
* **Multi-task MoE head**: the pooled CLS feature goes through one shared :class:`MoELayer` (default 8
  experts, top-2) *once per task*; its router sees the pooled feature concatenated with a learned task
  embedding, so routing is task-conditioned while all experts are shared; a residual connection and
  per-task linear output heads follow. Ablations ``shared`` (one MLP for all tasks) and ``separate``
  (one MLP per task) use the same expert MLP so only the routing differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets.densenet import _DenseBlock, _DenseLayer, _Transition
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from neuromoe.engine.utils import decays, no_decay_names
from neuromoe.models.registry import register_model

__all__ = [
    "PRESETS",
    "DenseFormer",
    "DenseFormerMAE",
    "DenseFormerMoE",
    "DenseNetPatchStem",
    "DenseNetVolumeStem",
    "MultiTaskHead",
    "MultiTaskOutput",
    "layerwise_lr_groups",
    "random_masking",
    "sincos_pos_embed",
]


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (int(v),) * n


def sincos_pos_embed(grid: Sequence[int], dim: int) -> Tensor:
    """Fixed sin-cos position embedding of a 2D/3D token grid, ``(prod(grid), dim)``.

    Each axis gets an equal, even share of the channels (sin half, cos half); leftover channels are zero.
    """
    nd = len(grid)
    per_axis = (dim // (2 * nd)) * 2
    if per_axis == 0:
        raise ValueError(f"embed dim {dim} too small for a {nd}D sin-cos embedding")
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis / 2))
    parts = []
    for c in coords:
        out = c.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.float()


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernels on CPU/GPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _dense_trunk(
    in_channels: int, block_layers: Sequence[int], *, init_features: int, growth_rate: int, bn_size: int,
    compression: float, stem_stride: int, spatial_dims: int, norm: str | tuple, transition_after_last: bool,
) -> tuple[list[nn.Module], int]:
    """Strided conv k3 → MONAI dense blocks with compression transitions (2× average pool) → norm-ReLU.

    Shared by both stems; returns the layers and their output channels. The patch stem puts no
    transition after the last block (its map is flattened), the volume stem one after every block.
    """
    conv = Conv[Conv.CONV, spatial_dims]
    layers: list[nn.Module] = [
        conv(in_channels, init_features, kernel_size=3, stride=stem_stride, padding=1, bias=False)
    ]
    ch = init_features
    for i, n in enumerate(block_layers):
        layers.append(_DenseBlock(spatial_dims, n, ch, bn_size, growth_rate, 0.0, norm=norm))
        ch += n * growth_rate
        if transition_after_last or i < len(block_layers) - 1:
            out = max(1, int(ch * compression))
            layers.append(_Transition(spatial_dims, ch, out, norm=norm))
            ch = out
    layers += [get_norm_layer(norm, spatial_dims, ch), nn.ReLU(inplace=True)]
    return layers, ch


class DenseNetPatchStem(nn.Module):
    """3D DenseNet applied to each patch independently: ``(M, C, p, p, p) -> (M, embed_dim)``.

    Conv k3 (stride ``stem_stride``, as DenseNet's strided stem; most of the FLOPs are spent at full
    patch resolution otherwise) → dense blocks (``block_layers``) with a compression transition (2×
    average pool) between consecutive blocks → BN-ReLU → flatten the final grid → linear to
    ``embed_dim``. Flattening (rather than global pooling) keeps where inside the patch a feature was.

    ``norm`` is any MONAI norm spec (``"batch"``, ``("group", {"num_groups": 4})``, ``"instance"``, ...)
    used in every dense layer, transition and the final norm. BatchNorm normalises over all patches
    of the batch, so train-mode and eval-mode (running-statistics) outputs differ; a per-patch norm
    (group/instance) behaves identically in both modes.
    """

    def __init__(
        self,
        in_channels: int,
        patch_size: int,
        embed_dim: int,
        *,
        init_features: int = 16,
        growth_rate: int = 12,
        block_layers: Sequence[int] = (4,),
        bn_size: int = 4,
        compression: float = 0.5,
        stem_stride: int = 2,
        spatial_dims: int = 3,
        norm: str | tuple = "batch",
    ):
        super().__init__()
        n_down = len(block_layers) - 1
        if patch_size % (stem_stride * 2**n_down):
            raise ValueError(f"patch_size {patch_size} not divisible by stem_stride·2**{n_down} "
                             "(one halving per transition)")
        layers, ch = _dense_trunk(
            in_channels, block_layers, init_features=init_features, growth_rate=growth_rate, bn_size=bn_size,
            compression=compression, stem_stride=stem_stride, spatial_dims=spatial_dims, norm=norm,
            transition_after_last=False,
        )
        self.features = nn.Sequential(*layers, nn.Flatten(1))
        self.out_channels = ch
        self.final_size = patch_size // (stem_stride * 2**n_down)
        self.proj = nn.Linear(ch * self.final_size**spatial_dims, embed_dim)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(self.features(patches))


class DenseNetVolumeStem(nn.Module):
    """3D DenseNet over the whole volume down to the token grid: ``(B, C, *img) -> (B, N, embed_dim)``.

    Conv k3 (stride ``stem_stride``) → dense blocks with a compression transition (2× average pool)
    after *every* block, so the total stride ``stem_stride·2**len(block_layers)`` must equal
    ``patch_size`` → BN-ReLU → 1×1 conv to ``embed_dim``: one token per cell of the final map, in the
    same row-major order as :meth:`DenseFormer.patchify`. Why: receptive fields cross patch borders
    (overlapping, growing context before tokenisation), which the patch-local stem lacks; on 114
    training subjects the ViT alone did not learn that context fast enough (docs/experiments.md).
    Masked content is kept out of visible tokens by zeroing masked patches *before* the stem
    (:meth:`DenseFormer.embed_patches`), at the price of running the stem on the whole volume in MAE.
    """

    def __init__(
        self,
        in_channels: int,
        patch_size: int,
        embed_dim: int,
        *,
        init_features: int = 16,
        growth_rate: int = 12,
        block_layers: Sequence[int] = (4, 4),
        bn_size: int = 4,
        compression: float = 0.5,
        stem_stride: int = 2,
        spatial_dims: int = 3,
        norm: str | tuple = "batch",
    ):
        super().__init__()
        if stem_stride * 2 ** len(block_layers) != patch_size:
            raise ValueError(f"volume stem: stem_stride·2**len(block_layers) = {stem_stride * 2 ** len(block_layers)} "
                             f"must equal patch_size {patch_size} (one halving per dense block)")
        layers, ch = _dense_trunk(
            in_channels, block_layers, init_features=init_features, growth_rate=growth_rate, bn_size=bn_size,
            compression=compression, stem_stride=stem_stride, spatial_dims=spatial_dims, norm=norm,
            transition_after_last=True,
        )
        self.features = nn.Sequential(*layers)
        self.out_channels = ch
        self.proj = Conv[Conv.CONV, spatial_dims](ch, embed_dim, kernel_size=1)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """``keep`` ``(B, 1, *grid)`` (1 = visible patch) runs the trunk sparsely (:func:`_sparse_apply`)."""
        feats = self.features(x) if keep is None else _sparse_apply(self.features, x, keep)
        return self.proj(feats).flatten(2).transpose(1, 2)


class _MaskedBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm over the voxels where ``m`` is 1, for ``x`` that is zero where ``m`` is 0.

    Why a Function: written with autograd ops it took ≈ 20× native BatchNorm. Here the statistics are
    the all-voxel ones (one native pass) rescaled to the visible voxels, the output is native eval-mode
    BatchNorm with them, and the backward is native eval-mode BatchNorm backward plus the closed-form
    per-channel terms of the batch statistics (``tests/models/test_denseformer.py`` checks it against autograd).
    ``n`` is the number of visible voxels. Returns ``(y, mean, var)`` with ``y`` zero where ``m`` is 0 and the
    biased visible-voxel statistics.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, m: Tensor, n: float, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        mean_all, var_all = torch.batch_norm_update_stats(x.float() if x.element_size() < 4 else x, None, None, 0.0)
        r = (x.numel() / x.shape[1]) / n
        mean = mean_all * r
        var = ((var_all + mean_all.square()) * r - mean.square()).clamp_min(0.0)
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps).mul_(m)
        ctx.save_for_backward(x, m, weight, mean, var)
        ctx.eps, ctx.n = eps, n
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x, m, weight, mean, var = ctx.saved_tensors
        dy = dy * m
        dx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        istd = torch.rsqrt(var + ctx.eps)
        w = weight if weight is not None else torch.ones_like(istd)  # gw = Σ dy·x̂, gb = Σ dy
        a = -w * istd.square() * gw / ctx.n
        c = -(w * istd / ctx.n) * (gb - mean * istd * gw)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        dx = torch.addcmul(dx + c.to(dx.dtype).view(shape), x, a.to(dx.dtype).view(shape)).mul_(m)
        return dx, None, None, gw if ctx.needs_input_grad[3] else None, gb if ctx.needs_input_grad[4] else None, None


def _masked_batch_norm(bn: _BatchNorm, x: Tensor, m: Tensor) -> Tensor:
    """BatchNorm with batch statistics (and running-statistics update) over the voxels where ``m`` is 1.

    ``x`` must be zero where ``m`` is 0, as every tensor inside :func:`_sparse_apply` is.
    """
    if not bn.training:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps) * m
    n = float(m.sum(dtype=torch.float32))  # visible voxels (m is (B, 1, *spatial))
    y, mean, var = _MaskedBatchNorm.apply(x, m, n, bn.weight, bn.bias, bn.eps)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            mom = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean, mom)
            bn.running_var.lerp_(var * n / max(n - 1.0, 1.0), mom)
    return y


def _sparse_apply(trunk: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """Run a DenseNet trunk so that masked patches stay empty at every layer (SparK-style).

    Why: zeroing masked patches only at the input trains the stem on volumes that are mostly zeros with
    sharp patch edges, and BatchNorm statistics then mix those zeros in; fine-tuning feeds full volumes.
    Here every tensor is kept zero on masked patches (re-masked after each spatial or biased convolution;
    bias-free 1×1 convolutions, ReLU and the patch-aligned 2× average pools keep zeros zero) and
    BatchNorm normalises with visible voxels only, so visible regions are processed as in a full volume,
    up to the empty border around them. Masked content never enters, so no leak either.
    """
    masks: dict[tuple[int, ...], Tensor] = {}

    def mask_for(t: Tensor) -> Tensor:
        size = tuple(t.shape[2:])
        if size not in masks:
            masks[size] = F.interpolate(keep, size=size, mode="nearest")
        return masks[size].to(t.dtype)

    def run(module: nn.Module, h: Tensor) -> Tensor:
        if isinstance(module, _DenseLayer):
            return torch.cat([h, run(module.layers, h)], 1)
        if isinstance(module, nn.Sequential):
            for child in module:
                h = run(child, h)
            return h
        if isinstance(module, _BatchNorm):
            return _masked_batch_norm(module, h, mask_for(h))
        if isinstance(module, (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AvgPool2d, nn.AvgPool3d)):
            return module(h)
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            y = module(h)
            local = all(k == 1 for k in module.kernel_size) and module.bias is None
            return y if local else y * mask_for(y)
        raise ValueError(f"stem_masking='sparse' supports BatchNorm DenseNet stems; got a {type(module).__name__} "
                         "layer (use stem_masking='zero' with other norms)")

    return run(trunk, x)


class DenseFormer(nn.Module):
    """DenseNet stem (patch-local or whole-volume) + ViT encoder on a fixed input grid (``img_size``, multiple of ``patch_size``).

    ``forward_features(x)`` → normalised tokens ``(B, 1+N, D)`` (CLS first); ``forward_head(feats)`` →
    pooled feature (``num_outputs=0``) or logits. ``embed_patches`` takes an optional ``ids_keep`` so
    the MAE encoder embeds visible patches only.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 64,
        patch_size: int = 8,
        in_channels: int = 1,
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        init_features: int = 16,
        growth_rate: int = 12,
        block_layers: Sequence[int] = (4,),
        bn_size: int = 4,
        compression: float = 0.5,
        stem_stride: int = 2,
        spatial_dims: int = 3,
        norm: str | tuple = "batch",
        pool: Literal["cls", "mean"] = "mean",
        num_outputs: int = 0,
        stem: Literal["patch", "volume"] = "patch",
        stem_masking: Literal["zero", "sparse"] = "zero",
    ):
        super().__init__()
        if stem_masking not in ("zero", "sparse"):
            raise ValueError(f"unknown stem_masking '{stem_masking}' (zero, sparse)")
        if stem_masking == "sparse" and stem != "volume":
            raise ValueError("stem_masking='sparse' is for the volume stem (the patch stem embeds visible patches only)")
        self.stem_masking = stem_masking
        self.img_size = _tuple(img_size, spatial_dims)
        self.patch_size = int(patch_size)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {patch_size}")
        self.grid = tuple(s // self.patch_size for s in self.img_size)
        self.num_patches = math.prod(self.grid)
        self.embed_dim = embed_dim
        self.pool = pool
        stems = {"patch": DenseNetPatchStem, "volume": DenseNetVolumeStem}
        if stem not in stems:
            raise ValueError(f"unknown stem '{stem}' (patch, volume)")
        self.stem_type = stem
        self.stem = stems[stem](
            in_channels, self.patch_size, embed_dim, init_features=init_features, growth_rate=growth_rate,
            block_layers=block_layers, bn_size=bn_size, compression=compression, stem_stride=stem_stride,
            spatial_dims=spatial_dims, norm=_norm_spec(norm),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, embed_dim).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_outputs) if num_outputs else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[2:]) != self.img_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {self.img_size}), got {tuple(x.shape)}; "
                "preprocess to the model's grid first"
            )

    def patchify(self, x: Tensor) -> Tensor:
        """``(B, C, *img_size)`` → ``(B, N, C, p, p[, p])`` in row-major grid order."""
        self._check_input(x)
        b, c, p, nd = x.shape[0], x.shape[1], self.patch_size, self.spatial_dims
        shape = [b, c]
        for g in self.grid:
            shape += [g, p]
        x = x.reshape(shape)
        grid_axes = [2 + 2 * i for i in range(nd)]
        patch_axes = [3 + 2 * i for i in range(nd)]
        return x.permute(0, *grid_axes, 1, *patch_axes).reshape(b, self.num_patches, c, *([p] * nd))

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of :meth:`patchify` for ``(B, N, C, p, ...)`` or flattened ``(B, N, C·p^d)``."""
        b, p, nd, c = patches.shape[0], self.patch_size, self.spatial_dims, self.in_channels
        x = patches.reshape(b, *self.grid, c, *([p] * nd))
        perm = [0, nd + 1]
        for i in range(nd):
            perm += [1 + i, nd + 2 + i]
        return x.permute(*perm).reshape(b, c, *self.img_size)

    def embed_patches(self, x: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Tokens with position embedding for all patches, or only ``ids_keep`` ``(B, n)`` of them.

        The patch stem embeds the kept patches only; the volume stem sees the whole volume with the
        voxels of every patch not in ``ids_keep`` set to zero, so masked content cannot reach a token.
        """
        if self.stem_type == "volume":
            return self._embed_volume(x, ids_keep)
        patches = self.patchify(x)
        pos = self.pos_embed.expand(x.shape[0], -1, -1)
        if ids_keep is not None:
            patches = _gather(patches, ids_keep)
            pos = _gather(pos, ids_keep)
        b, n = patches.shape[:2]
        tokens = self.stem(patches.reshape(b * n, *patches.shape[2:])).reshape(b, n, -1)
        return tokens + pos.to(tokens.dtype)

    def _embed_volume(self, x: Tensor, ids_keep: Tensor | None) -> Tensor:
        self._check_input(x)
        keep = None
        if ids_keep is not None:
            keep = x.new_zeros(x.shape[0], self.num_patches).scatter_(1, ids_keep, 1.0).view(-1, 1, *self.grid)
            x = x * F.interpolate(keep, size=x.shape[2:], mode="nearest").to(x.dtype)
        tokens = self.stem(x, keep if self.stem_masking == "sparse" else None)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        return tokens if ids_keep is None else _gather(tokens, ids_keep)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Prepend CLS, run the transformer, final LayerNorm."""
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.encode_tokens(self.embed_patches(x))

    def pool_features(self, features: Tensor) -> Tensor:
        return features[:, 0] if self.pool == "cls" else features[:, 1:].mean(dim=1)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.pool_features(features)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def layer_id(self, name: str) -> int:
        """Depth index for layer-wise lr decay: embeddings 0, block i → i+1, final norm/head → depth+1."""
        if name.startswith(("stem.", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1


def _norm_spec(norm: str | Sequence[Any]) -> str | tuple:
    """A MONAI norm spec from a config value: ``"batch"`` or ``["group", {"num_groups": 4}]`` (YAML/JSON lists)."""
    return norm if isinstance(norm, str) else tuple(norm)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _gather(x: Tensor, ids: Tensor) -> Tensor:
    """``x[b, ids[b]]`` for ``x`` of shape ``(B, N, ...)`` and ``ids`` ``(B, n)``."""
    idx = ids.reshape(*ids.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def random_masking(
    num_patches: int, batch: int, mask_ratio: float, *, noise: Tensor | None = None,
    device: torch.device | str | None = None, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample uniform random masking by argsort of noise.

    Returns ``ids_keep (B, n_keep)``, ``mask (B, N)`` (1 = masked, in original patch order) and
    ``ids_restore (B, N)`` (to unshuffle the decoder sequence). Pass ``noise`` to fix the mask.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n_keep = max(1, round(num_patches * (1 - mask_ratio)))
    if noise is None:  # drawn where the generator lives (a CPU generator cannot fill a CUDA tensor)
        noise = torch.rand(batch, num_patches, device=generator.device if generator else device, generator=generator)
    if device is not None:  # a fixed or generator-drawn mask follows the images to their device
        noise = noise.to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :n_keep] = 0
    return ids_keep, torch.gather(mask, 1, ids_restore), ids_restore


class DenseFormerMAE(nn.Module):
    """Masked autoencoder around a :class:`DenseFormer` encoder (``self.encoder``, loadable as backbone).

    ``forward(imgs) -> (loss, pred, mask)``: ``pred`` ``(B, N, C·p^d)`` holds the decoder's patch
    predictions (in normalised units if ``norm_pix_loss``), ``mask`` ``(B, N)`` is 1 on masked patches.
    """

    def __init__(
        self,
        *,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        **encoder_kwargs: Any,
    ):
        super().__init__()
        encoder_kwargs.pop("num_outputs", None)
        self.encoder = DenseFormer(**encoder_kwargs)
        enc = self.encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_dim = enc.in_channels * enc.patch_size**enc.spatial_dims
        self.decoder_embed = nn.Linear(enc.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(enc.grid, decoder_dim).unsqueeze(0),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(_init_linear)

    def target_patches(self, imgs: Tensor) -> Tensor:
        """Reconstruction target ``(B, N, C·p^d)``, per-patch normalised if ``norm_pix_loss``."""
        target = self.encoder.patchify(imgs).flatten(2)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode visible patches only → ``(latent (B, 1+n_keep, D), mask, ids_restore)``."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        enc = self.encoder
        ids_keep, mask, ids_restore = random_masking(
            enc.num_patches, imgs.shape[0], ratio, noise=noise, device=imgs.device
        )
        latent = enc.encode_tokens(enc.embed_patches(imgs, ids_keep))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        n_vis = x.shape[1] - 1
        seq = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, n - n_vis, -1)], dim=1)
        seq = _gather(seq, ids_restore) + self.decoder_pos_embed.to(x.dtype)
        x = torch.cat([x[:, :1], seq], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the voxels of masked patches only."""
        per_patch = ((pred.float() - self.target_patches(imgs).float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self, imgs: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(masked input, reconstruction)`` volumes for figures.

        With ``norm_pix_loss`` the prediction is mapped back with each patch's true mean/std — this
        uses masked content, so it is for display only (as in the MAE paper's figures).
        """
        _, pred, mask = self.forward(imgs, noise=noise)
        enc = self.encoder
        target = enc.patchify(imgs).flatten(2)
        if self.norm_pix_loss:
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        m = mask.unsqueeze(-1)
        masked = enc.unpatchify(target * (1 - m))
        recon = enc.unpatchify(target * (1 - m) + pred.to(target.dtype) * m)
        return masked, recon


@dataclass
class MultiTaskOutput:
    """Per-task outputs (logits or values) plus the head's auxiliary loss and routing."""

    outputs: dict[str, Tensor]
    aux_loss: Tensor
    topk_idx: Tensor | None = None  # (T, B, k) experts chosen per task and subject (MoE head only)
    topk_weights: Tensor | None = None  # (T, B, k) their gate weights


class ExpertMLP(nn.Module):
    """The expert network (also the ``shared``/``separate`` ablation blocks): Linear-GELU-Linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TaskAttentionPool(nn.Module):
    """One learned query per task attends over the patch tokens, so each task reads its own regions.

    Why: a mean over all tokens dilutes focal signals (the medial temporal lobe for AD is a few of 216
    tokens); a probe of the token grid separates AD from CN better than one of the pooled feature
    (docs/experiments.md). The output is ``mean(tokens) + attention read-out`` with the read-out's
    projection zero-initialised, so training starts exactly as mean pooling.
    """

    no_weight_decay_params = ("query",)  # per-task embeddings like task_embed (decay pulls to mean pooling)

    def __init__(self, dim: int, num_tasks: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.randn(num_tasks, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, N, D)`` patch tokens → ``(B, T, D)``, one pooled feature per task."""
        (b, n, d), h, t = tokens.shape, self.num_heads, self.query.shape[0]
        k, v = self.kv(self.norm(tokens)).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        q = self.query.to(k.dtype).reshape(1, t, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)
        read = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return tokens.mean(dim=1, keepdim=True) + self.proj(read)


class MultiTaskHead(nn.Module):
    """Task-routed head over a pooled feature ``(B, D)``, or one per task ``(B, T, D)``.

    ``head="moe"``: one shared :class:`neuromoe.layers.moe.MoELayer`, evaluated once per task with the
    task's learned embedding concatenated to the router input; ``"shared"``: one MLP for all tasks;
    ``"separate"``: one MLP per task. All variants: ``h = x + block(LN(x))`` then a per-task linear head.
    ``tasks`` is a list of ``{"name", "type", "num_outputs"}`` dicts.
    """

    def __init__(
        self,
        dim: int,
        tasks: Sequence[dict[str, Any]],
        *,
        head: Literal["moe", "shared", "separate"] = "moe",
        num_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int | None = None,
        task_embed_dim: int = 32,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
        router_noise: float = 0.0,
        drop: float = 0.1,
    ):
        super().__init__()
        if not tasks:
            raise ValueError("at least one task is required")
        self.task_names = [t["name"] for t in tasks]
        self.head_type = head
        self.num_experts = num_experts if head == "moe" else 0
        hidden = expert_hidden or 2 * dim
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(drop)
        if head == "moe":
            from neuromoe.layers.moe import MoELayer

            self.task_embed = nn.Embedding(len(tasks), task_embed_dim)
            self.moe = MoELayer(
                dim, num_experts, lambda *_a, **_k: ExpertMLP(dim, hidden), k=top_k,
                balance_coef=balance_coef, z_coef=z_coef, cond_dim=task_embed_dim, cond_mode="concat",
                noise_std=router_noise,
            )
        elif head == "shared":
            self.block = ExpertMLP(dim, hidden)
        elif head == "separate":
            self.blocks = nn.ModuleDict({t["name"]: ExpertMLP(dim, hidden) for t in tasks})
        else:
            raise ValueError(f"unknown head '{head}' (moe, shared, separate)")
        self.out = nn.ModuleDict({t["name"]: nn.Linear(dim, int(t["num_outputs"])) for t in tasks})
        # Optional TaskAttentionPool, set by DenseFormerMoE(head_pool="task_attention"); used there, before
        # ``forward``, but owned here so it is trained at the head's lr.
        self.pool: TaskAttentionPool | None = None

    def forward(self, x: Tensor) -> MultiTaskOutput:
        per_task, aux, topk, weights = self.task_features(x)
        return MultiTaskOutput({n: self.out[n](h) for n, h in per_task.items()}, aux, topk, weights)

    def task_features(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor | None, Tensor | None]:
        """Each task's representation (the input of its output layer), the aux loss and the routing.

        ``x``: ``(B, D)`` shared by all tasks or ``(B, T, D)`` per task (:class:`TaskAttentionPool`).
        """
        t = len(self.task_names)
        if x.dim() == 2:
            x = x.unsqueeze(1).expand(-1, t, -1)
        if x.shape[1] != t:
            raise ValueError(f"per-task features for {x.shape[1]} tasks, head has {t}")
        b, d = x.shape[0], x.shape[2]
        xt = x.transpose(0, 1)  # (T, B, D), task-major like the MoE rows below
        xn = self.norm(xt)
        topk = weights = None
        aux = x.new_zeros(())
        if self.head_type == "moe":
            task_ids = torch.arange(t, device=x.device).repeat_interleave(b)
            out = self.moe(xn.reshape(t * b, d), cond=self.task_embed(task_ids).to(xn.dtype))
            h = xt.reshape(t * b, d) + self.drop(out.output.to(x.dtype))
            aux = out.aux_loss
            topk = out.stats.topk_idx.reshape(t, b, -1)
            weights = out.stats.topk_weights.reshape(t, b, -1)
            per_task = h.reshape(t, b, d).unbind(0)
        elif self.head_type == "shared":
            per_task = (xt + self.drop(self.block(xn))).unbind(0)
        else:
            per_task = [xt[i] + self.drop(self.blocks[n](xn[i])) for i, n in enumerate(self.task_names)]
        return dict(zip(self.task_names, per_task, strict=True)), aux, topk, weights


class DenseFormerMoE(nn.Module):
    """DenseFormer backbone (``self.backbone``) + :class:`MultiTaskHead` (``self.head``)."""

    def __init__(
        self,
        tasks: Sequence[dict[str, Any]] = ({"name": "age", "type": "regression", "num_outputs": 1},),
        *,
        head: Literal["moe", "shared", "separate"] = "moe",
        num_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int | None = None,
        task_embed_dim: int = 32,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
        head_drop: float = 0.1,
        head_pool: Literal["backbone", "task_attention"] = "backbone",
        **backbone_kwargs: Any,
    ):
        super().__init__()
        backbone_kwargs.pop("num_outputs", None)
        self.tasks = [dict(t) for t in tasks]
        self.backbone = DenseFormer(**backbone_kwargs)
        self.head = MultiTaskHead(
            self.backbone.embed_dim, self.tasks, head=head, num_experts=num_experts, top_k=top_k,
            expert_hidden=expert_hidden, task_embed_dim=task_embed_dim, balance_coef=balance_coef,
            z_coef=z_coef, drop=head_drop,
        )
        if head_pool not in ("backbone", "task_attention"):
            raise ValueError(f"unknown head_pool '{head_pool}' (backbone, task_attention)")
        self.head.pool = (
            TaskAttentionPool(self.backbone.embed_dim, len(self.tasks), self.backbone.blocks[0].attn.num_heads)
            if head_pool == "task_attention" else None
        )

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)

    def pool_features(self, features: Tensor) -> Tensor:
        """Head input: the backbone's pooled feature ``(B, D)`` or, with ``head_pool="task_attention"``,
        one feature per task ``(B, T, D)``."""
        if self.head.pool is None:
            return self.backbone.pool_features(features)
        return self.head.pool(features[:, 1:])

    def forward_head(self, features: Tensor) -> MultiTaskOutput:
        return self.head(self.pool_features(features))

    def forward(self, x: Tensor) -> MultiTaskOutput:
        return self.forward_head(self.forward_features(x))

    def layer_id(self, name: str) -> int:
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return len(self.backbone.blocks) + 1


def layerwise_lr_groups(
    model: DenseFormerMoE, lr: float, weight_decay: float, layer_decay: float = 0.75, head_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Optimiser param groups with lr ``lr·decay^(L+1−layer)`` (BEiT/MAE fine-tuning recipe); the multi-task
    head (MoE layer, task embeddings, output layers) gets ``lr·head_lr_scale``.

    Biases, norms, CLS token and embeddings get no weight decay; frozen parameters are skipped.
    """
    n_layers = len(model.backbone.blocks) + 1
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    exempt = no_decay_names(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = model.layer_id(name)
        no_wd = not decays(name, p, exempt) or name.endswith(("cls_token", "task_embed.weight"))
        head = name.startswith("head.")
        key = (layer, no_wd, head)
        if key not in groups:
            scale = layer_decay ** (n_layers - layer) * (head_lr_scale if head else 1.0)
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_wd else weight_decay}
        groups[key]["params"].append(p)
    return list(groups.values())


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: 32³, 64 tokens
    "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, init_features=8,
                 growth_rate=8, block_layers=(2,)),
    # CPU demo: 64³ at 3 mm (192 mm field of view), 512 tokens
    "demo": dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, init_features=16,
                 growth_rate=12, block_layers=(4,)),
    # paper scale: 160×192×160 at 1 mm, patch 16 → 1200 tokens, ViT-B width
    "base": dict(img_size=(160, 192, 160), patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 init_features=32, growth_rate=16, block_layers=(4, 4)),
}
MAE_DECODER = {
    "tiny": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "demo": dict(decoder_dim=96, decoder_depth=1, decoder_heads=3),
    "base": dict(decoder_dim=512, decoder_depth=4, decoder_heads=16),
}


def _preset_factory(preset: str) -> Callable[..., DenseFormerMoE]:
    def factory(**kwargs: Any) -> DenseFormerMoE:
        return DenseFormerMoE(**{**PRESETS[preset], **kwargs})

    factory.__name__ = f"denseformer_{preset}"
    factory.__doc__ = f"DenseFormer-MoE, '{preset}' preset: {PRESETS[preset]} (kwargs override)."
    return factory


for _name in PRESETS:
    register_model(f"denseformer_{_name}", family="denseformer")(_preset_factory(_name))


@register_model("denseformer_mae", family="denseformer")
def denseformer_mae(preset: str = "demo", **kwargs: Any) -> DenseFormerMAE:
    """MAE pretraining model of a preset backbone; ``model.encoder`` loads into ``DenseFormerMoE.backbone``."""
    return DenseFormerMAE(**{**PRESETS[preset], **MAE_DECODER[preset], **kwargs})
