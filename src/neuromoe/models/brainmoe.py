"""BrainMoE (Wei et al., NeurIPS 2025): per-cognitive-state experts, an FC router and a transformer adapter.

Pieces:

* **Experts** (one per cognitive state, all exposing ``embed(fc, ts) -> (B, D)``), three kinds:

  - ``fc_mae`` (BrainMass-like): ROI tokens = FC rows; a random subset of ROIs is hidden (their rows are
    replaced by a mask token and their columns zeroed in the visible rows, so the symmetric matrix does
    not leak them) and a linear decoder reconstructs the hidden rows.
  - ``jepa`` (Brain-JEPA-like): tokens = non-overlapping BOLD windows (all ROIs × ``window`` TRs); a
    predictor maps the visible windows' context latents to the latents an EMA *target* encoder gives the
    masked windows.
  - ``state_clf``: a supervised cognitive-state classifier (binary "this state vs the others" for a
    per-state expert, multi-class for the pooled one) on the FC encoder.

* **Router**: MLP over the upper-triangle FC (``router_input="fc"``, as in the reference) or over its
  first ``router_pca`` whitened principal components fitted on the training scans (``"pca"``: a
  34,716-value input lets the router memorise each training scan instead of learning which expert helps)
  → :class:`~neuromoe.layers.moe.TopKRouter` (fp32 softmax, top-k, renormalised weights). With
  ``dense_routing`` on (a warm-up), every expert enters the adapter weighted by its softmax probability:
  top-k weights renormalised over the chosen pair give unchosen experts no gradient, so a top-k router
  never learns that an expert it did not pick would have helped. :class:`StateRouter` is the same
  FC → logit path fitted at pretraining to recognise each scan's cognitive state (the states that define
  the experts); :meth:`BrainMoE.load_router_prior` starts the router from it. Routing statistics are
  returned as :class:`~neuromoe.layers.moe.RouterStats` for :class:`~neuromoe.layers.moe.ExpertUsage`.
* **Adapter**: ``nn.TransformerDecoder``; target tokens = the top-k expert embeddings (scaled by their
  router weights, plus an expert-identity embedding) and one learnable query per output class; memory =
  the FC rows. A linear map on each task's query tokens gives phenotype logits, sex logits and age.

Experts are frozen by default, so their embeddings can be precomputed once and passed as
``expert_emb`` (B, E, D); otherwise only the experts some item was routed to are run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuromoe.errors import ConfigError
from neuromoe.layers.moe import RouterOutput, RouterStats, TopKRouter
from neuromoe.models.registry import register_model

FAMILY = "brainmoe"
EXPERT_KINDS = ("fc_mae", "jepa", "state_clf")
ExpertKind = Literal["fc_mae", "jepa", "state_clf"]
RouterInput = Literal["fc", "pca"]

# Size presets shared by experts and the adapter (dim = expert embedding, hidden = adapter width).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "dim": 32,
        "depth": 0,
        "heads": 2,
        "hidden": 32,
        "adapter_depth": 1,
        "adapter_heads": 2,
        "router_hidden": 32,
    },
    "demo": {
        "dim": 64,
        "depth": 0,
        "heads": 4,
        "hidden": 64,
        "adapter_depth": 2,
        "adapter_heads": 4,
        "router_hidden": 64,
    },
    "base": {
        "dim": 256,
        "depth": 4,
        "heads": 8,
        "hidden": 1024,
        "adapter_depth": 4,
        "adapter_heads": 4,
        "router_hidden": 256,
    },
}


def upper_tri_index(n_rois: int) -> tuple[Tensor, Tensor]:
    """Row/column indices of the strict upper triangle, the router's view of a symmetric FC matrix."""
    return torch.triu_indices(n_rois, n_rois, offset=1).unbind(0)


def _router_mlp(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU()
    )


def state_ce(logits: Tensor, target: Tensor | None, who: str) -> tuple[Tensor, dict[str, float]]:
    """Cognitive-state cross-entropy and accuracy (state-classifier experts and the state router)."""
    if target is None:
        raise ValueError(f"{who} needs state targets")
    logits = logits.float()
    loss = F.cross_entropy(logits, target.long())
    acc = (logits.argmax(1) == target).float().mean()
    return loss, {"state_ce": float(loss.detach()), "state_acc": float(acc)}


def pca_input(fc: Tensor, tri_i: Tensor, tri_j: Tensor, center: Tensor, basis: Tensor) -> Tensor:
    """(B, P) whitened principal components of the FC upper triangle (the ``pca`` router input)."""
    return (fc[:, tri_i, tri_j].float() - center) @ basis.T


@torch.no_grad()
def fit_pca(x: Tensor, center: Tensor, basis: Tensor) -> None:
    """Write the mean of ``x`` (N, F) into ``center`` and its top principal axes, each scaled to unit
    variance, into the rows of ``basis`` (P, F); rows beyond the data's rank stay zero."""
    x = x.float()
    center.copy_(x.mean(0))
    _, s, vh = torch.linalg.svd(x - center, full_matrices=False)
    p = min(len(basis), int((s > 1e-6 * s[0]).sum()) if len(s) else 0)
    basis.zero_()
    if p:
        basis[:p] = vh[:p] / (s[:p] / max(len(x) - 1, 1) ** 0.5)[:, None]


def _encoder(dim: int, depth: int, heads: int, dropout: float) -> nn.Module:
    """Pre-norm transformer encoder; ``depth=0`` = a per-token MLP, no attention (cheap CPU experts)."""
    if depth == 0:
        return nn.Sequential(nn.GELU(), nn.Linear(dim, dim))
    layer = nn.TransformerEncoderLayer(
        dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class FCEncoder(nn.Module):
    """ROI tokens (FC rows projected to ``dim``) + ROI position embeddings → transformer → (B, M, dim)."""

    def __init__(self, n_rois: int, dim: int, depth: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.n_rois = n_rois
        self.proj = nn.Linear(n_rois, dim)
        self.roi_embed = nn.Parameter(torch.randn(1, n_rois, dim) * 0.02)
        self.blocks = _encoder(dim, depth, heads, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        fc: Tensor,
        replace: Tensor | None = None,
        token: Tensor | None = None,
        projected: Tensor | None = None,
    ) -> Tensor:
        """``replace`` (B, M) bool marks ROIs whose token becomes ``token`` (the mask token); ``projected``
        = ``proj(fc)`` already computed by the caller (:meth:`BrainMoE.expert_embeddings` runs all experts'
        projections as one matmul)."""
        if fc.shape[-2:] != (self.n_rois, self.n_rois):
            raise ValueError(f"expected FC of shape (B, {self.n_rois}, {self.n_rois}), got {tuple(fc.shape)}")
        x = self.proj(fc) if projected is None else projected
        if replace is not None and token is not None:
            x = torch.where(replace[..., None], token.to(x.dtype), x)
        return self.norm(self.blocks(x + self.roi_embed))


class FCMAEExpert(nn.Module):
    """Masked-ROI FC reconstruction (BrainMass-like); ``embed`` = mean ROI token of the unmasked FC."""

    kind = "fc_mae"
    input_kind = "fc"

    def __init__(
        self, n_rois: int, dim: int, depth: int, heads: int, mask_ratio: float = 0.5, dropout: float = 0.1
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"fc_mae mask_ratio must be in (0, 1), got {mask_ratio}")
        self.n_rois, self.dim, self.mask_ratio = n_rois, dim, mask_ratio
        self.encoder = FCEncoder(n_rois, dim, depth, heads, dropout)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.decoder = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, n_rois))

    def random_mask(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, M) bool: ``mask_ratio`` of the ROIs hidden per scan."""
        n_mask = max(1, round(self.mask_ratio * self.n_rois))
        noise = torch.rand(batch, self.n_rois, generator=generator).to(device)
        return noise.argsort(dim=1).argsort(dim=1) < n_mask

    def loss(
        self, fc: Tensor, ts: Tensor | None = None, target: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """MSE between the hidden rows and their reconstruction (visible columns and hidden ones, not the diagonal)."""
        mask = self.random_mask(fc.shape[0], fc.device) if mask is None else mask
        visible = fc * (~mask)[:, None, :].to(fc.dtype)  # hidden ROIs' columns are zeroed everywhere
        recon = self.decoder(self.encoder(visible, replace=mask, token=self.mask_token))
        # the hidden rows without their diagonal entries (a correlation's self-connection is no target)
        rows = mask[:, :, None] & ~torch.eye(self.n_rois, dtype=torch.bool, device=fc.device)
        loss = F.mse_loss(recon[rows].float(), fc[rows].float())
        return loss, {"recon_mse": float(loss.detach())}

    def embed(self, fc: Tensor, ts: Tensor | None = None, projected: Tensor | None = None) -> Tensor:
        return self.encoder(fc, projected=projected).mean(dim=1)


class StateClfExpert(nn.Module):
    """Supervised cognitive-state classifier on the FC encoder; ``embed`` = the pooled ROI token."""

    kind = "state_clf"
    input_kind = "fc"

    def __init__(
        self, n_rois: int, dim: int, depth: int, heads: int, n_states: int = 2, dropout: float = 0.1
    ):
        super().__init__()
        if n_states < 2:
            raise ConfigError(f"state_clf needs >= 2 classes (this state vs others), got {n_states}")
        self.n_rois, self.dim, self.n_states = n_rois, dim, n_states
        self.encoder = FCEncoder(n_rois, dim, depth, heads, dropout)
        self.head = nn.Linear(dim, n_states)

    def loss(
        self, fc: Tensor, ts: Tensor | None = None, target: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        return state_ce(self.head(self.embed(fc)), target, "a state_clf expert")

    def embed(self, fc: Tensor, ts: Tensor | None = None, projected: Tensor | None = None) -> Tensor:
        return self.encoder(fc, projected=projected).mean(dim=1)


class JEPAExpert(nn.Module):
    """Latent prediction of masked BOLD windows (Brain-JEPA-like) with an EMA target encoder.

    Input ``ts`` is (B, T, M) with ``T >= window * n_windows`` (the pipeline crops it). The target encoder
    is updated by :meth:`update_target` (exponential moving average of the context encoder, no gradients).
    """

    kind = "jepa"
    input_kind = "ts"

    def __init__(
        self,
        n_rois: int,
        dim: int,
        depth: int,
        heads: int,
        window: int = 16,
        n_windows: int = 8,
        mask_ratio: float = 0.5,
        ema: float = 0.99,
        dropout: float = 0.1,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0 or n_windows < 2:
            raise ConfigError(
                f"jepa needs mask_ratio in (0, 1) and n_windows >= 2, got {mask_ratio}, {n_windows}"
            )
        self.n_rois, self.dim, self.window, self.n_windows = n_rois, dim, window, n_windows
        self.mask_ratio, self.ema = mask_ratio, ema
        self.patch = nn.Linear(window * n_rois, dim)
        self.pos = nn.Parameter(torch.randn(1, n_windows, dim) * 0.02)
        self.context = _encoder(dim, depth, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.predictor = _encoder(dim, 1, heads, dropout)
        self.pred_out = nn.Linear(dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.target = nn.ModuleDict(
            {
                "patch": copy.deepcopy(self.patch),
                "context": copy.deepcopy(self.context),
                "norm": copy.deepcopy(self.norm),
            }
        )
        self.target.requires_grad_(False)

    def train(self, mode: bool = True) -> JEPAExpert:
        """The EMA target encoder always runs in eval mode: its latents are targets, not noisy samples."""
        super().train(mode)
        self.target.eval()
        return self

    @property
    def n_timepoints(self) -> int:
        return self.window * self.n_windows

    def _tokens(self, ts: Tensor, patch: nn.Linear) -> Tensor:
        b, t, m = ts.shape
        if t != self.n_timepoints or m != self.n_rois:
            raise ValueError(
                f"expected ts of shape (B, {self.n_timepoints}, {self.n_rois}), got {tuple(ts.shape)}"
            )
        win = ts.reshape(b, self.n_windows, self.window * m)
        return patch(win)

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA step ``target ← ema·target + (1−ema)·context`` (call once per optimiser step)."""
        online = {"patch": self.patch, "context": self.context, "norm": self.norm}
        for name, mod in online.items():
            for pt, po in zip(self.target[name].parameters(), mod.parameters(), strict=True):
                pt.lerp_(po.detach(), 1.0 - self.ema)

    def loss(
        self,
        fc: Tensor | None,
        ts: Tensor | None = None,
        target: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        if ts is None:
            raise ValueError("jepa experts need time series")
        b = ts.shape[0]
        n_mask = max(1, round(self.mask_ratio * self.n_windows))
        if mask is None:
            mask = torch.rand(b, self.n_windows, device=ts.device).argsort(1).argsort(1) < n_mask
        with torch.no_grad():
            t = self.target["norm"](self.target["context"](self._tokens(ts, self.target["patch"]) + self.pos))
        x = self._tokens(ts, self.patch) + self.pos
        x = torch.where(mask[..., None], torch.zeros_like(x), x)  # masked windows are not seen by the context
        ctx = self.norm(self.context(x))
        q = torch.where(mask[..., None], self.mask_token.to(ctx.dtype) + self.pos, ctx)
        pred = self.pred_out(self.predictor(q))
        loss = F.smooth_l1_loss(pred[mask].float(), F.layer_norm(t[mask].float(), (self.dim,)))
        return loss, {"latent_loss": float(loss.detach())}

    def embed(self, fc: Tensor | None, ts: Tensor | None = None) -> Tensor:
        if ts is None:
            raise ValueError("jepa experts need time series")
        return self.norm(self.context(self._tokens(ts, self.patch) + self.pos)).mean(dim=1)


Expert = FCMAEExpert | StateClfExpert | JEPAExpert


def make_expert(kind: str, n_rois: int, dim: int, depth: int, heads: int, **kw: Any) -> Expert:
    """Build one expert of ``kind`` (``fc_mae`` | ``jepa`` | ``state_clf``)."""
    if kind == "fc_mae":
        return FCMAEExpert(n_rois, dim, depth, heads, **kw)
    if kind == "state_clf":
        return StateClfExpert(n_rois, dim, depth, heads, **kw)
    if kind == "jepa":
        return JEPAExpert(n_rois, dim, depth, heads, **kw)
    raise ConfigError(f"unknown expert kind {kind!r}", fix=f"use one of {', '.join(EXPERT_KINDS)}")


@dataclass
class BrainMoEOutput:
    """Task outputs (``phenotype`` (B, C) and ``sex`` (B, 2) logits, ``age`` (B,) standardised) + routing."""

    outputs: dict[str, Tensor]
    route: RouterOutput
    stats: RouterStats


class BrainMoE(nn.Module):
    """Frozen per-state experts + FC router (top-k) + transformer-decoder adapter with class queries."""

    def __init__(
        self,
        n_rois: int,
        n_experts: int,
        expert_kind: ExpertKind = "state_clf",
        expert_kwargs: dict[str, Any] | None = None,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        top_k: int = 2,
        router_hidden: int = 64,
        router_noise: float = 0.0,
        router_input: RouterInput = "fc",
        router_pca: int = 16,
        hidden: int = 64,
        adapter_depth: int = 2,
        adapter_heads: int = 4,
        n_classes: int = 2,
        n_sex: int = 2,
        age: bool = True,
        dropout: float = 0.1,
        freeze_experts: bool = True,
    ):
        super().__init__()
        self.n_rois, self.n_experts, self.dim, self.k = n_rois, n_experts, dim, top_k
        self.n_classes, self.n_sex, self.age = n_classes, n_sex, age
        self.freeze_experts = freeze_experts
        if router_input not in ("fc", "pca") or router_pca < 1:
            raise ConfigError(
                f"router_input must be 'fc' or 'pca' and router_pca >= 1, got {router_input!r}, {router_pca}"
            )
        self.router_input = router_input
        self.dense_routing = False  # set by the fine-tuning loop during its dense warm-up
        self.experts = nn.ModuleList(
            make_expert(expert_kind, n_rois, dim, depth, heads, **(expert_kwargs or {}))
            for _ in range(n_experts)
        )
        self.expert_input = self.experts[0].input_kind
        if freeze_experts:
            self.experts.requires_grad_(False)
        # Per-expert standardisation of the embeddings (fitted on the training scans, saved with the model):
        # frozen experts' embeddings differ between scans by small offsets around a large shared mean.
        self.register_buffer("emb_mean", torch.zeros(n_experts, dim))
        self.register_buffer("emb_std", torch.ones(n_experts, dim))
        iu, ju = upper_tri_index(n_rois)
        self.register_buffer("tri_i", iu, persistent=False)
        self.register_buffer("tri_j", ju, persistent=False)
        router_in = len(iu)
        if router_input == "pca":  # fitted by set_router_basis (or a StateRouter), saved with the model
            router_in = router_pca
            self.register_buffer("router_center", torch.zeros(len(iu)))
            self.register_buffer("router_basis", torch.zeros(router_pca, len(iu)))
        self.router_mlp = _router_mlp(router_in, router_hidden, dropout)
        self.router = TopKRouter(router_hidden, n_experts, top_k, noise_std=router_noise)
        self.expert_proj = nn.Linear(dim, hidden)
        self.expert_id = nn.Embedding(n_experts, hidden)
        n_queries = n_classes + n_sex + int(age)
        self.queries = nn.Parameter(torch.randn(1, n_queries, hidden) * 0.02)
        self.fc_proj = nn.Linear(n_rois, hidden)
        self.roi_embed = nn.Parameter(torch.randn(1, n_rois, hidden) * 0.02)
        layer = nn.TransformerDecoderLayer(
            hidden, adapter_heads, 2 * hidden, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.adapter = nn.TransformerDecoder(layer, adapter_depth)
        self.norm = nn.LayerNorm(hidden)
        self.pheno_head = nn.Linear(hidden, 1)
        self.sex_head = nn.Linear(hidden, 1) if n_sex else None
        self.age_head = nn.Linear(hidden, 1) if age else None

    def train(self, mode: bool = True) -> BrainMoE:
        """Frozen experts stay in eval mode (no dropout) while the router and adapter train."""
        super().train(mode)
        if self.freeze_experts:
            self.experts.eval()
        return self

    def expert_embeddings(self, fc: Tensor | None, ts: Tensor | None = None) -> Tensor:
        """(B, E, D) embeddings of every expert (what is cached when the experts are frozen). FC experts'
        input projections (the bulk of the work: M×M → M×D per expert) run as one matmul, which a single
        CPU thread does faster than five narrow ones."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_experts):
            if self.expert_input != "fc":
                return torch.stack([e.embed(fc, ts) for e in self.experts], dim=1)
            weight = torch.cat([e.encoder.proj.weight for e in self.experts])
            bias = torch.cat([e.encoder.proj.bias for e in self.experts])
            projected = F.linear(fc, weight, bias).split(self.dim, dim=-1)
            return torch.stack([e.embed(fc, projected=p) for e, p in zip(self.experts, projected, strict=True)], 1)

    @torch.no_grad()
    def set_embedding_stats(self, emb: Tensor) -> None:
        """Fit the standardisation on training-scan embeddings ``(N, E, D)``."""
        self.emb_mean.copy_(emb.mean(0))
        self.emb_std.copy_(emb.std(0).clamp_min(1e-4) if len(emb) > 1 else torch.ones_like(self.emb_std))

    def set_router_basis(self, fc: Tensor) -> None:
        """Fit the ``pca`` router input on training FC ``(N, M, M)`` (:func:`fit_pca`)."""
        if self.router_input != "pca":
            raise ValueError("set_router_basis is for router_input='pca'")
        fc = fc.to(self.tri_i.device)  # the model may already sit on the training device
        fit_pca(fc[:, self.tri_i, self.tri_j], self.router_center, self.router_basis)

    @torch.no_grad()
    def load_router_prior(self, prior: StateRouter, order: list[int]) -> None:
        """Start the router from a pretrained :class:`StateRouter`; ``order[e]`` = the prior's state index
        of expert ``e``. Only the starting point: fine-tuning still trains the router."""
        if self.router_input != "pca" or prior.router_basis.shape != self.router_basis.shape:
            raise ValueError("the state router needs router_input='pca' with the same router_pca and n_rois")
        if sorted(order) != list(range(prior.n_states)) or len(order) != self.n_experts:
            raise ValueError(f"expert order {order} does not match the {prior.n_states} router states")
        self.router_center.copy_(prior.router_center)
        self.router_basis.copy_(prior.router_basis)
        self.router_mlp.load_state_dict(prior.router_mlp.state_dict())
        self.router.proj.weight.copy_(prior.proj.weight[order])
        self.router.proj.bias.copy_(prior.proj.bias[order])

    def route(self, fc: Tensor) -> RouterOutput:
        if self.router_input == "pca":
            x = pca_input(fc, self.tri_i, self.tri_j, self.router_center, self.router_basis)
        else:
            x = fc[:, self.tri_i, self.tri_j].float()
        return self.router(self.router_mlp(x))

    def forward(
        self, fc: Tensor, ts: Tensor | None = None, expert_emb: Tensor | None = None
    ) -> BrainMoEOutput:
        b = fc.shape[0]
        route = self.route(fc)
        idx, w = route.topk_idx, route.topk_weights
        if self.dense_routing and self.training:  # every expert, weighted by its router probability
            idx = torch.arange(self.n_experts, device=fc.device).expand(b, -1)
            w = route.probs
        if expert_emb is None:  # run each expert only on the scans routed to it
            expert_emb = fc.new_zeros(b, self.n_experts, self.dim)
            for e in idx.unique().tolist():
                rows = (idx == e).any(dim=1).nonzero().squeeze(1)
                with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_experts):
                    emb = self.experts[e].embed(fc[rows], None if ts is None else ts[rows])
                expert_emb = expert_emb.index_put((rows, torch.full_like(rows, e)), emb.to(expert_emb.dtype))
        chosen = expert_emb.gather(1, idx[..., None].expand(-1, -1, expert_emb.shape[-1]))
        chosen = (chosen - self.emb_mean[idx].to(chosen.dtype)) / self.emb_std[idx].to(chosen.dtype)
        tokens = self.expert_proj(chosen) * w[..., None].to(chosen.dtype) + self.expert_id(idx)
        tgt = torch.cat([tokens, self.queries.expand(b, -1, -1)], dim=1)
        memory = self.fc_proj(fc) + self.roi_embed
        q = self.norm(self.adapter(tgt, memory))[:, idx.shape[1] :]
        outputs = {"phenotype": self.pheno_head(q[:, : self.n_classes]).squeeze(-1)}
        pos = self.n_classes
        if self.sex_head is not None:
            outputs["sex"] = self.sex_head(q[:, pos : pos + self.n_sex]).squeeze(-1)
            pos += self.n_sex
        if self.age_head is not None:
            outputs["age"] = self.age_head(q[:, pos]).squeeze(-1)
        with torch.no_grad():
            load = torch.bincount(idx.reshape(-1), minlength=self.n_experts).float() / max(idx.numel(), 1)
            stats = RouterStats(load, route.probs.mean(0), idx.detach(), w.detach())
        return BrainMoEOutput(outputs, route, stats)


class StateRouter(nn.Module):
    """The router's FC → logits path on its own (PCA input, MLP, linear), fitted at pretraining as a
    cognitive-state classifier: it routes a scan to the experts of the states its connectivity resembles."""

    def __init__(self, n_rois: int, n_states: int, router_hidden: int = 64, router_pca: int = 16,
                 dropout: float = 0.1):
        super().__init__()
        if n_states < 2:
            raise ConfigError(f"a state router needs >= 2 states, got {n_states}")
        self.n_rois, self.n_states = n_rois, n_states
        iu, ju = upper_tri_index(n_rois)
        self.register_buffer("tri_i", iu, persistent=False)
        self.register_buffer("tri_j", ju, persistent=False)
        self.register_buffer("router_center", torch.zeros(len(iu)))
        self.register_buffer("router_basis", torch.zeros(router_pca, len(iu)))
        self.router_mlp = _router_mlp(router_pca, router_hidden, dropout)
        self.proj = nn.Linear(router_hidden, n_states)

    def forward(self, fc: Tensor) -> Tensor:
        """(B, n_states) state logits."""
        x = pca_input(fc, self.tri_i, self.tri_j, self.router_center, self.router_basis)
        return self.proj(self.router_mlp(x))

    def loss(
        self, fc: Tensor, ts: Tensor | None = None, target: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """State cross-entropy (the expert-pretraining interface, so the same trainer fits it)."""
        return state_ce(self(fc), target, "a state router")


def _preset(name: str, kw: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    base = {k: v for k, v in PRESETS[name].items() if k in keys}
    return {**base, **kw}


_EXPERT_KEYS = ("dim", "depth", "heads")
_MOE_KEYS = tuple(PRESETS["tiny"])


def expert_architecture(architecture: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``dim``/``depth``/``heads`` an expert saved as ``brainmoe_expert_<size>`` + kwargs was built with,
    so an adapter can be sized to pretrained experts whatever preset the adapter itself uses."""
    size = architecture.removeprefix("brainmoe_expert_")
    if size not in PRESETS:
        raise KeyError(f"not a BrainMoE expert architecture: {architecture!r}")
    return _preset(size, {k: v for k, v in kwargs.items() if k in _EXPERT_KEYS}, _EXPERT_KEYS)


def _register_size(size: str) -> None:
    """Register one preset's factories; ``size`` is bound by this call, not a hidden keyword a caller could
    override (``create_model('brainmoe_tiny', _size='demo')`` built a demo model saved as tiny)."""

    def expert_factory(kind: str = "state_clf", n_rois: int = 264, **kw: Any) -> Expert:
        return make_expert(kind, n_rois, **_preset(size, kw, _EXPERT_KEYS))

    def moe_factory(n_rois: int = 264, n_experts: int = 5, **kw: Any) -> BrainMoE:
        return BrainMoE(n_rois, n_experts, **_preset(size, kw, _MOE_KEYS))

    def router_factory(n_rois: int = 264, n_states: int = 5, **kw: Any) -> StateRouter:
        return StateRouter(n_rois, n_states, **_preset(size, kw, ("router_hidden",)))

    for name, factory in ((f"brainmoe_router_{size}", router_factory), (f"brainmoe_expert_{size}", expert_factory),
                          (f"brainmoe_{size}", moe_factory)):
        factory.__qualname__ = name
        register_model(name, family=FAMILY)(factory)


def _register_presets() -> None:
    for size in PRESETS:
        _register_size(size)


_register_presets()
