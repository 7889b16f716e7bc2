"""MoME / MoME+: modality-expert U-Nets fused by a hierarchical per-voxel gate (Zhang et al. 2024/2025).

Every expert is an nnU-Net-style U-Net (two conv-InstanceNorm-LeakyReLU per stage, strided-conv down,
transposed-conv up, one deep-supervision head per decoder scale) built from MONAI blocks. A gating U-Net
sees the image plus every expert's first-stage features and emits one weight map over experts at *every*
decoder scale; the fused logits are ``Σ_k gate_k ⊙ expert_k`` per scale. The modality is never passed in:
the gate has to infer it from the image.

MoME+ (``multimodal=True``) takes all modalities of a case at once with an availability vector. A
dispatch network turns the availability into a constrained soft matrix ``D`` (identity rows for present
modalities, learned mixtures of present ones for missing modalities) that fills each expert's input.

Sparse experts (``top_k > 0``, beyond the reference): a light router over a downsampled input (and the
availability) selects ``top_k`` experts for each input it sees — a training patch, a sliding window at
inference — and only they run, so inference costs ~k/E of the dense model. The router is trained through the fused output (its weights enter the gate's log-space) and a
load-balancing loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import Tensor, nn

from neuromoe.errors import ConfigError
from neuromoe.layers.moe import TopKRouter, load_balancing_loss
from neuromoe.layers.norm import INSTANCE_NORM
from neuromoe.models.registry import PretrainedMixin, register_model

__all__ = [
    "DEFAULT_MODALITIES",
    "PRESETS",
    "ExpertUNet",
    "MoME",
    "MoMEOutput",
    "curriculum_weight",
    "deep_supervision_weights",
    "dice_ce_from_sums",
    "dice_ce_sums",
    "gate_supervision_loss",
    "mome_loss",
    "unet_widths",
]

DEFAULT_MODALITIES = ("t1", "t1c", "t2", "flair", "dwi")
NORM = INSTANCE_NORM  # instance norm computed as a per-channel group norm: the same function, faster on CPU
ACT = ("LEAKYRELU", {"negative_slope": 0.01, "inplace": True})


def unet_widths(depth: int, base: int = 32, cap: int = 320) -> tuple[int, ...]:
    """nnU-Net widths ``min(base·2^i, cap)`` for ``depth`` resolution stages."""
    return tuple(min(base * 2**i, cap) for i in range(depth))


class ExpertUNet(PretrainedMixin, nn.Module):
    """nnU-Net ``PlainConvUNet``-style U-Net returning logits at every decoder scale (full res first).

    ``forward_features`` also returns the first encoder stage's output, which the MoME gate consumes.
    Used alone (``unet_*`` presets) it is the pooled single-U-Net baseline.

    ``logit_skip=True`` adds each coarser head's upsampled logits to the next finer head's (the finer head
    learns a residual). Why: a head is a 1×1 conv on LeakyReLU (≈ non-negative) features, so with few
    full-resolution channels whose lesion weights all start negative the full-resolution logit stays
    below the decision boundary for hundreds of steps while the coarser heads already segment; a
    T1-only demo U-Net scored Dice 0.00 after 300 steps without it and 0.40 with it
    (docs/experiments.md). ``False`` is nnU-Net's plain head.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        widths: Sequence[int] = (32, 64, 128, 256),
        spatial_dims: int = 3,
        kernel_size: int = 3,
        logit_skip: bool = False,
    ):
        super().__init__()
        if len(widths) < 2:
            raise ConfigError(
                f"a U-Net needs at least 2 stages, got widths={list(widths)}", fix="give two or more widths"
            )
        self.widths = tuple(int(w) for w in widths)
        self.spatial_dims, self.out_channels, self.logit_skip = spatial_dims, out_channels, logit_skip
        self.encoder = nn.ModuleList(
            UnetBasicBlock(
                spatial_dims,
                in_channels if i == 0 else self.widths[i - 1],
                w,
                kernel_size,
                1 if i == 0 else 2,
                NORM,
                ACT,
            )
            for i, w in enumerate(self.widths)
        )
        # decoder[j] upsamples stage (L-1-j) to stage (L-2-j)
        self.decoder = nn.ModuleList(
            UnetUpBlock(spatial_dims, self.widths[i], self.widths[i - 1], kernel_size, 2, 2, NORM, ACT)
            for i in range(len(self.widths) - 1, 0, -1)
        )
        self.heads = nn.ModuleList(
            UnetOutBlock(spatial_dims, self.widths[i - 1], out_channels)
            for i in range(len(self.widths) - 1, 0, -1)
        )

    @property
    def stem_channels(self) -> int:
        return self.widths[0]

    def forward_features(self, x: Tensor, channels: Sequence[int] | None = None) -> list[Tensor]:
        """Encoder skips, full resolution first (``[0]`` is the first-stage feature map).

        ``channels``: ``x`` holds only these of the ``in_channels`` inputs, the others being zero; the
        first convolution then uses just their weight slice instead of convolving zeros (exact; the sparse
        MoME gate's input has zero channels for every expert that did not run).
        """
        skips = []
        for i, block in enumerate(self.encoder):
            if i == 0 and channels is not None:
                conv = block.conv1.conv
                x = conv._conv_forward(x, conv.weight[:, list(channels)], conv.bias)
                x = block.lrelu(block.norm2(block.conv2(block.lrelu(block.norm1(x)))))
            else:
                x = block(x)
            skips.append(x)
        return skips

    def forward_head(self, skips: list[Tensor]) -> list[Tensor]:
        """Decoder + deep-supervision heads → logits per scale, full resolution first."""
        h = skips[-1]
        outs: list[Tensor] = []
        for j, (up, head) in enumerate(zip(self.decoder, self.heads, strict=True)):
            h = up(h, skips[-2 - j])
            out = head(h)
            if self.logit_skip and outs:
                mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
                out = out + F.interpolate(outs[-1], size=out.shape[2:], mode=mode, align_corners=False)
            outs.append(out)
        return outs[::-1]

    def forward(self, x: Tensor, channels: Sequence[int] | None = None) -> list[Tensor]:
        return self.forward_head(self.forward_features(x, channels))


@dataclass
class MoMEOutput:
    """Fused logits per scale (full res first) and what losses, reports and the sidecar need."""

    logits: list[Tensor]
    expert_logits: dict[int, list[Tensor]]  # expert index → its logits per scale (only experts that ran)
    gates: list[Tensor]  # (B, E, *scale) per scale; zeros for experts that did not run
    aux_loss: Tensor
    router_probs: Tensor | None = None  # (B, E) router probabilities per input (sparse mode)
    selected: Tensor | None = None  # (B, k) selected experts (sparse mode)
    dispatch: Tensor | None = None  # (B, E, M) MoME+ dispatch matrix
    extra: dict[str, Any] = field(default_factory=dict)


class MoME(PretrainedMixin, nn.Module):
    """Modality experts + hierarchical gate (+ MoME+ dispatch, + optional sparse top-k router).

    Inputs: ``x`` is ``(B, 1, *S)`` (MoME: one image of unknown modality, every expert sees it) or
    ``(B, M, *S)`` zero-filled for missing modalities (MoME+, ``multimodal=True``) with ``available``
    ``(B, M)`` in {0, 1}. ``gate_norm="softmax"`` normalises gate weights over experts (default);
    ``"raw"`` multiplies raw gate outputs like the reference code. ``logit_skip`` is passed to every expert
    and to the gate (see :class:`ExpertUNet`).
    """

    def __init__(
        self,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        out_channels: int = 2,
        widths: Sequence[int] = (32, 64, 128, 256),
        gate_widths: Sequence[int] | None = None,
        spatial_dims: int = 3,
        gate_norm: Literal["softmax", "raw"] = "softmax",
        multimodal: bool = False,
        top_k: int = 0,
        router_size: int = 8,
        router_hidden: int = 64,
        balance_coef: float = 0.01,
        logit_skip: bool = False,
    ):
        super().__init__()
        if gate_norm not in ("softmax", "raw"):
            raise ConfigError(f"gate_norm must be 'softmax' or 'raw', got {gate_norm!r}", fix="set gate_norm")
        self.modalities = tuple(modalities)
        E = len(self.modalities)
        if E < 1:
            raise ConfigError("MoME needs at least one modality expert", fix="set modalities")
        if not 0 <= top_k <= E:
            raise ConfigError(f"top_k must be in [0, {E}], got {top_k}", fix="0 = dense, else 1..num experts")
        self.num_experts, self.spatial_dims = E, spatial_dims
        self.gate_norm, self.multimodal, self.top_k = gate_norm, multimodal, top_k
        self.balance_coef = balance_coef
        widths = tuple(widths)
        gate_widths = tuple(gate_widths) if gate_widths is not None else widths
        if len(gate_widths) != len(widths):
            raise ConfigError(
                "gate_widths must have as many stages as widths (one gate map per decoder scale)",
                fix="give gate_widths the same length as widths",
            )
        self.experts = nn.ModuleList(
            ExpertUNet(1, out_channels, widths, spatial_dims, logit_skip=logit_skip) for _ in range(E)
        )
        in_img = E if multimodal else 1
        cond = E if multimodal else 0
        self.gate = ExpertUNet(in_img + cond + E * widths[0], E, gate_widths, spatial_dims, logit_skip=logit_skip)
        # MoME+: availability → logits of the soft dispatch matrix (E × M, here M == E).
        self.dispatcher = (
            nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E * E)) if multimodal else None
        )
        self.router_size = router_size
        if top_k:
            feat = in_img * router_size**spatial_dims
            self.router_encoder = nn.Sequential(nn.Linear(feat, router_hidden), nn.GELU())
            self.router = TopKRouter(router_hidden, E, top_k, cond_dim=cond)
        else:
            self.router_encoder, self.router = None, None

    # -------------------------------------------------------------------------------------------- parts
    def dispatch_matrix(self, available: Tensor) -> Tensor:
        """(B, M) availability → (B, E, M): identity rows if present, soft mix of present ones if missing."""
        assert self.dispatcher is not None
        B, M = available.shape
        avail = available.float()
        if (avail.sum(1) == 0).any():
            raise ValueError("every case needs at least one available modality")
        logits = self.dispatcher(avail).view(B, M, M).float()
        logits = logits.masked_fill(avail[:, None, :] == 0, float("-inf"))
        mix = logits.softmax(-1)
        eye = torch.eye(M, device=available.device, dtype=mix.dtype).expand(B, M, M)
        present = avail[:, :, None]
        return present * eye + (1 - present) * mix

    def expert_inputs(self, x: Tensor, available: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Per-expert single-channel inputs ``(B, E, *S)`` and the dispatch matrix (MoME+ only)."""
        if not self.multimodal:
            return x.expand(-1, self.num_experts, *x.shape[2:]), None
        assert available is not None
        D = self.dispatch_matrix(available)
        masked = x * available.to(x.dtype).view(*available.shape, *([1] * self.spatial_dims))
        return torch.einsum("bem,bm...->be...", D.to(x.dtype), masked), D

    def route(self, x: Tensor, available: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top-k router per input (patch or window) → (probs (B,E), topk idx, topk weights, balance loss)."""
        assert self.router is not None and self.router_encoder is not None
        pool = F.adaptive_avg_pool3d if self.spatial_dims == 3 else F.adaptive_avg_pool2d
        h = self.router_encoder(pool(x.float(), self.router_size).flatten(1).to(x.dtype))
        out = self.router(h, available.float() if self.multimodal else None)
        bal = load_balancing_loss(out.probs, out.topk_idx, self.num_experts)
        return out.probs, out.topk_idx, out.topk_weights, bal

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, available: Tensor | None = None) -> MoMEOutput:
        B, E = x.shape[0], self.num_experts
        if self.multimodal:
            if x.shape[1] != E:
                raise ValueError(f"MoME+ expects {E} modality channels {self.modalities}, got {x.shape[1]}")
            if available is None:
                available = torch.ones(B, E, device=x.device)
            # zero-filled here, not only in the expert inputs: the gate and the router must not see a channel
            # marked missing either (content left in it changed the fused output and the chosen experts)
            x = torch.where(available.bool().view(B, E, *([1] * self.spatial_dims)), x, 0.0)  # NaN too
        elif x.shape[1] != 1:
            raise ValueError(f"MoME expects one image channel, got {x.shape[1]} (use multimodal=True)")
        xin, D = self.expert_inputs(x, available)
        aux = x.new_zeros((), dtype=torch.float32)
        probs = sel = None
        active = list(range(E))
        prior = log_prior = st = None
        if self.top_k:
            probs, sel, w, bal = self.route(x, available)
            aux = aux + self.balance_coef * bal
            active = sorted(set(sel.flatten().tolist()))
            prior = torch.zeros(B, E, device=x.device, dtype=torch.float32).scatter(1, sel, w)
            log_prior = prior.clamp_min(1e-9).log()  # not selected → effectively -inf in the gate softmax
            if self.top_k == 1:
                # top-1: softmax(g + log w) with every other expert at log(1e-9) is saturated, so no task
                # gradient reaches the router through log_prior; multiply by p / p.detach() (exactly 1)
                p_sel = probs.gather(1, sel)
                st = (p_sel / p_sel.detach()).view(B, 1, *([1] * self.spatial_dims))
        skips = {k: self.experts[k].forward_features(xin[:, k : k + 1]) for k in active}
        gate_in = [x]
        if self.multimodal:
            gate_in.append(
                available.to(x.dtype).view(B, E, *([1] * self.spatial_dims)).expand(B, E, *x.shape[2:])
            )
        # The gate's input is [image, availability, stem_0 … stem_{E-1}]; the stems of experts that did not
        # run are zero, so only the active ones are passed, with their channel indices. An expert runs on the
        # whole batch when any case picked it; the cases that did not pick it see its stem as zeros, so a
        # case's output does not depend on what else shares its batch (sliding-window pairs, training batches).
        base, w0 = sum(t.shape[1] for t in gate_in), self.experts[0].stem_channels
        channels = None
        stems = [skips[k][0] for k in active]
        if len(active) < E:
            channels = [*range(base), *(base + k * w0 + c for k in active for c in range(w0))]
            assert sel is not None
            picked = torch.zeros(B, E, device=x.device, dtype=stems[0].dtype).scatter(1, sel, 1.0)
            stems = [s * picked[:, k].view(B, *([1] * (s.dim() - 1))) for s, k in zip(stems, active, strict=True)]
        gate_logits = self.gate(torch.cat([*gate_in, *stems], 1), channels)
        expert_logits = {k: self.experts[k].forward_head(skips[k]) for k in active}
        fused, gates = [], []
        for s, g in enumerate(gate_logits):
            g = g.float()
            if self.gate_norm == "softmax":
                if log_prior is not None:
                    g = g + log_prior.view(B, E, *([1] * self.spatial_dims))
                g = g.softmax(1)
                if st is not None:  # value unchanged; the log-space prior is saturated at top-1
                    g = g * st
            elif prior is not None:
                g = g * prior.view(B, E, *([1] * self.spatial_dims))
            gates.append(g)
            out = sum(g[:, k : k + 1].to(expert_logits[k][s].dtype) * expert_logits[k][s] for k in active)
            fused.append(out)
        return MoMEOutput(fused, expert_logits, gates, aux, probs, sel, D)


# ------------------------------------------------------------------------------------------------ losses
def curriculum_weight(
    epoch: int,
    epochs: int,
    schedule: Literal["quadratic", "linear", "constant"] = "quadratic",
    constant: float = 0.2,
) -> float:
    """Weight of the own-modality expert loss; the fused loss gets ``1 − weight``.

    ``quadratic`` is the paper's ``(1 − r)²`` with ``r = epoch / epochs``; ``linear`` is ``1 − r``;
    ``constant`` keeps a fixed expert share (the paper's 0.2/0.8 variant).
    """
    r = min(max(epoch / max(epochs, 1), 0.0), 1.0)
    if schedule == "quadratic":
        return (1 - r) ** 2
    if schedule == "linear":
        return 1 - r
    if schedule == "constant":
        return constant
    raise ConfigError(f"unknown curriculum schedule {schedule!r}", fix="use quadratic, linear or constant")


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net weights 1/2^i over scales (full res first), normalised to sum 1."""
    w = [0.5**i for i in range(n)]
    return [v / sum(w) for v in w]


_DICE_CE: dict[str, DiceCELoss] = {}


def _dice_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Dice+CE (MONAI) on logits ``(B, 2, *S)`` vs a binary target ``(B, 1, *S)`` resized by nearest."""
    if "loss" not in _DICE_CE:
        _DICE_CE["loss"] = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    if target.shape[2:] != logits.shape[2:]:
        target = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest")
    return _DICE_CE["loss"](logits.float(), target)


def dice_ce_sums(logits: Tensor, target: Tensor) -> np.ndarray:
    """Additive statistics of :func:`_dice_ce` over a batch: per class (intersection, predicted, true), then
    the cross-entropy sum and the voxel count. Summed over batches (or DDP ranks) and given to
    :func:`dice_ce_from_sums`, they give the loss of all the items as one batch, however they were grouped."""
    if target.shape[2:] != logits.shape[2:]:
        target = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest")
    logits = logits.float()
    label = target[:, 0].long()
    prob = logits.softmax(1)
    onehot = F.one_hot(label, logits.shape[1]).movedim(-1, 1).float()
    dims = (0, *range(2, logits.dim()))
    per_class = torch.stack([(prob * onehot).sum(dims), prob.sum(dims), onehot.sum(dims)], 1)  # (C, 3)
    ce = F.cross_entropy(logits, label, reduction="sum")
    return np.concatenate([per_class.flatten().cpu().double().numpy(), [float(ce), float(label.numel())]])


def dice_ce_from_sums(sums: np.ndarray) -> float:
    """The batch Dice + mean CE that MONAI's ``DiceCELoss(batch=True)`` gives, from :func:`dice_ce_sums`."""
    per_class, (ce, n) = sums[:-2].reshape(-1, 3), sums[-2:]
    smooth = 1e-5  # MONAI's smooth_nr = smooth_dr
    dice = 1.0 - (2.0 * per_class[:, 0] + smooth) / (per_class[:, 1] + per_class[:, 2] + smooth)
    return float(dice.mean() + ce / max(n, 1.0))


def deep_supervised_loss(logits: list[Tensor], target: Tensor) -> Tensor:
    """Σ_i w_i · DiceCE(logits_i, target) over decoder scales."""
    return sum(
        w * _dice_ce(lg, target) for w, lg in zip(deep_supervision_weights(len(logits)), logits, strict=True)
    )


def _intended_experts(
    num_experts: int, modality_idx: Tensor | None, available: Tensor | None
) -> Tensor | None:
    """(B, E) mask of the experts each sample is meant for: its own modality's (MoME) or the present
    modalities' (MoME+); ``None`` when neither is known."""
    if modality_idx is not None:
        return F.one_hot(modality_idx.long(), num_experts).float()
    return None if available is None else available.float()


def gate_supervision_loss(
    out: MoMEOutput, modality_idx: Tensor | None = None, available: Tensor | None = None
) -> Tensor | None:
    """``−log`` of the gate mass on the experts an input is meant for, per voxel, deep-supervision weighted
    over the decoder scales: the own modality's expert (MoME, ``modality_idx`` (B,)) or the available
    modalities' experts (MoME+, ``available`` (B, M)). Gates must be normalised (softmax).

    Why: trained on the fused loss alone the gate stays nearly the same for every input (the demo MoME gave
    each expert 9–32 % of the gate whatever the image's modality), so the fused output averages experts
    that were never trained on that modality. Samples whose expert a sparse router skipped are left out;
    ``None`` when no sample has a target.
    """
    want = _intended_experts(out.gates[0].shape[1], modality_idx, available)
    if want is None:
        return None
    if out.selected is not None:
        ran = torch.zeros_like(want).scatter(1, out.selected, 1.0)
        want = want * ran
    keep = want.sum(1) > 0
    if not keep.any():
        return None
    total = out.gates[0].new_zeros(())
    for w, g in zip(deep_supervision_weights(len(out.gates)), out.gates, strict=True):
        mass = (g[keep].float() * want[keep].view(*want[keep].shape, *([1] * (g.ndim - 2)))).sum(1)
        total = total + w * -mass.clamp_min(1e-6).log().mean()
    return total


def mome_loss(
    out: MoMEOutput,
    target: Tensor,
    modality_idx: Tensor | None,
    expert_weight: float,
    *,
    gate_weight: float = 0.0,
    available: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Curriculum loss ``w·(L_expert(own modality) + λ·L_gate) + (1 − w)·L_fused`` (+ router aux loss).

    ``modality_idx`` (B,) names each sample's modality for the expert term (training only; the model
    never sees it). MoME+ passes ``available`` (B, M) instead: every present modality's expert is scored
    on its own (identity-dispatched) input. Samples whose router did not pick their expert (sparse mode)
    contribute no expert term, even when a batch-mate's router ran that expert. ``gate_weight`` λ > 0 adds
    :func:`gate_supervision_loss` under the same curriculum weight: the gate starts from routing each input
    to its own (MoME) or available (MoME+) experts and is handed over to the fused loss as the curriculum
    proceeds.
    """
    fused = deep_supervised_loss(out.logits, target)
    loss = (1 - expert_weight) * fused + out.aux_loss
    logs = {"loss_fused": float(fused.detach())}
    if gate_weight > 0 and expert_weight > 0:
        gate = gate_supervision_loss(out, modality_idx, available)
        if gate is not None:
            loss = loss + expert_weight * gate_weight * gate
            logs["loss_gate"] = float(gate.detach())
    own = _intended_experts(out.gates[0].shape[1], modality_idx, available)
    if own is not None and out.selected is not None:  # only the experts this sample's router picked
        own = own * torch.zeros_like(own).scatter(1, out.selected, 1.0)
    if expert_weight > 0 and own is not None:
        terms, n_terms = [], 0
        for k, lg in out.expert_logits.items():
            idx = (own[:, k] > 0).nonzero().flatten()
            if idx.numel():
                terms.append(deep_supervised_loss([t[idx] for t in lg], target[idx]) * idx.numel())
                n_terms += idx.numel()
        if terms:
            expert = sum(terms) / n_terms  # mean over the (sample, expert) pairs that ran
            loss = loss + expert_weight * expert
            logs["loss_expert"] = float(expert.detach())
    logs["loss"] = float(loss.detach())
    return loss, logs


# ----------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: 16³–32³ patches
    "tiny": {"widths": (4, 8, 16), "gate_widths": (4, 8, 16)},
    # CPU demo (~3 min on 2 cores at 32³–48³ patches); a light gate
    "demo": {"widths": (8, 16, 32, 64), "gate_widths": (4, 8, 16, 32)},
    # paper-sized: nnU-Net widths min(32·2^i, 320) over 6 stages for 128³ patches at 1 mm
    "base": {"widths": unet_widths(6), "gate_widths": unet_widths(6)},
}


def _mome_factory(preset: str) -> Callable[..., MoME]:
    def factory(**kwargs: Any) -> MoME:
        return MoME(**{**PRESETS[preset], **kwargs})

    factory.__doc__ = f"MoME '{preset}' preset {PRESETS[preset]} (kwargs override; multimodal=True → MoME+)."
    factory.__qualname__ = f"mome_{preset}"
    return factory


def _unet_factory(preset: str) -> Callable[..., ExpertUNet]:
    def factory(**kwargs: Any) -> ExpertUNet:
        return ExpertUNet(**{"widths": PRESETS[preset]["widths"], **kwargs})

    factory.__doc__ = f"Single nnU-Net-style U-Net with the '{preset}' MoME expert widths (pooled baseline)."
    factory.__qualname__ = f"unet_{preset}"
    return factory


for _name in PRESETS:
    register_model(f"mome_{_name}", family="mome")(_mome_factory(_name))
    register_model(f"unet_{_name}", family="mome")(_unet_factory(_name))
