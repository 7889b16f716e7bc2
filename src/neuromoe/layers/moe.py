"""Sparse Mixture-of-Experts: a top-k router, auxiliary losses, and an MoE layer with three dispatch paths.

All three model families route with these pieces: DenseFormer-MoE (one token per subject × task, the task
embedding conditions the router), MoME (a router over each downsampled patch / window choosing expert
U-Nets; it uses :class:`TopKRouter` and the aux losses directly, because its experts return multi-scale
logits that its gate fuses per voxel) and BrainMoE (a router over the FC matrix choosing per-state experts).
:func:`dispatch_experts` runs any experts that map a tensor to a tensor on the items routed to them.

Design points:

* The router computes its logits and softmax in fp32 even under bf16 autocast: top-k selection and the
  balance loss are sensitive to rounding, the linear map is tiny.
* Experts run **only** on the items routed to them. ``dispatch="reference"`` is the readable loop
  (``nonzero`` + ``index_add_`` per expert); ``"sparse"`` sorts the (item, slot) pairs by expert, gathers
  once, runs each expert on one contiguous segment and writes the results back with one index copy and a
  weighted sum over the k slots (no atomic adds, so it is deterministic on GPU too); ``"dense"`` runs
  every expert on every item and combines with the same top-k weights (a baseline for tests/benchmarks).
* Homogeneous MLP experts can be stored as one :class:`ExpertMLP` (stacked weights) instead of E modules,
  which lets the dense path use one batched matmul and removes per-module overhead.
* ``capacity_factor > 0`` caps the slots per expert at ``ceil(cf · items · k / E)``; first choices have
  priority over second choices, then earlier items; a dropped slot contributes 0 (the caller's residual
  connection carries the item). ``capacity_factor = 0`` is dropless.

Usage::

    moe = MoELayer(256, num_experts=8, k=2, cond_dim=32)      # stacked ExpertMLP experts
    out = moe(tokens, cond=task_embedding)                    # tokens (B, N, 256) or (B, 256)
    loss = task_loss + out.aux_loss
    usage.update(out.stats, condition="age")                  # ExpertUsage → task × expert heatmap

    route = TopKRouter(feat_dim, 5, k=2)(pooled_features)     # routing items to experts of your own
    fused = dispatch_experts(images, route.topk_idx, route.topk_weights, expert_nets)  # tensor -> tensor
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuromoe.errors import ConfigError

__all__ = [
    "ExpertMLP",
    "ExpertUsage",
    "MoELayer",
    "MoEOutput",
    "RouterOutput",
    "RouterStats",
    "TopKRouter",
    "capacity_keep_mask",
    "dispatch_experts",
    "load_balancing_loss",
    "router_z_loss",
]

Dispatch = Literal["sparse", "reference", "dense"]


@dataclass
class RouterOutput:
    """Router result for ``T`` items: ``logits``/``probs`` ``(T, E)`` fp32, ``topk_*`` ``(T, k)``."""

    logits: Tensor
    probs: Tensor
    topk_idx: Tensor
    topk_weights: Tensor


@dataclass
class RouterStats:
    """Detached routing statistics of one forward pass.

    ``load[e]`` = fraction of the ``T·k`` routed slots sent to expert ``e`` (before capacity drops);
    ``importance[e]`` = mean router probability of ``e``; ``topk_*`` shaped like the input's leading dims
    plus ``k``; ``dropped`` = number of slots dropped by the capacity limit, ``kept`` (like ``topk_idx``)
    which slots were not (``None`` without a capacity limit).
    """

    load: Tensor
    importance: Tensor
    topk_idx: Tensor
    topk_weights: Tensor
    dropped: int = 0
    kept: Tensor | None = None


@dataclass
class MoEOutput:
    """``output`` has the input's leading dims; ``aux_loss = balance_coef·balance + z_coef·z``."""

    output: Tensor
    aux_loss: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    stats: RouterStats


def load_balancing_loss(probs: Tensor, topk_idx: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard balance loss ``E · Σ_e f_e · P_e``; 1 at uniform routing, E/k when collapsed onto k experts.

    ``f_e`` (fraction of slots routed to ``e``) carries no gradient; ``P_e`` (mean probability) does, so
    the loss pushes probability away from overloaded experts.
    """
    probs = probs.reshape(-1, num_experts).float()
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.bincount(topk_idx.reshape(-1), minlength=num_experts).to(probs.dtype)
    frac = counts / counts.sum()
    return num_experts * (frac * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss ``mean(logsumexp(logits)²)``: keeps router logits small so fp32/bf16 softmax is stable."""
    logits = logits.float()
    if logits.numel() == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class TopKRouter(nn.Module):
    """Linear router → fp32 softmax → top-k → renormalised weights.

    ``cond`` (a task-id embedding, a modality or availability vector, ...) is concatenated to the router
    input (``cond_mode="concat"``) or projected and added to it (``"add"``). In training only,
    ``jitter`` multiplies the input by U(1−j, 1+j) (Switch) and ``noise_std`` adds Gaussian noise to the
    logits before selection (noisy top-k); ``probs`` are those of the (noisy) logits that were used.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int,
        cond_dim: int = 0,
        cond_mode: Literal["concat", "add"] = "concat",
        noise_std: float = 0.0,
        jitter: float = 0.0,
    ):
        super().__init__()
        if num_experts < 1:
            raise ConfigError(
                f"num_experts must be >= 1, got {num_experts}", fix="set num_experts to 1 or more"
            )
        if not 1 <= k <= num_experts:
            raise ConfigError(
                f"top-k must be between 1 and num_experts={num_experts}, got {k}", fix="lower k (top_k)"
            )
        if cond_mode not in ("concat", "add"):
            raise ConfigError(f"cond_mode must be 'concat' or 'add', got {cond_mode!r}")
        if noise_std < 0 or not 0 <= jitter < 1:
            raise ConfigError(
                f"router noise_std must be >= 0 and jitter in [0, 1), got {noise_std}, {jitter}"
            )
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.cond_dim, self.cond_mode = cond_dim, cond_mode
        self.noise_std, self.jitter = noise_std, jitter
        in_dim = dim + cond_dim if cond_dim and cond_mode == "concat" else dim
        self.cond_proj = nn.Linear(cond_dim, dim) if cond_dim and cond_mode == "add" else None
        self.proj = nn.Linear(in_dim, num_experts)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> RouterOutput:
        """Route ``x (..., dim)``; ``cond`` is ``(..., cond_dim)`` or per-sample ``(B, cond_dim)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"router expects last dim {self.dim}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            if self.cond_dim:
                if cond is None:
                    raise ValueError(f"this router is conditioned (cond_dim={self.cond_dim}); pass cond")
                c = _broadcast_cond(cond, lead, self.cond_dim).float()
                if self.cond_proj is not None:
                    h = h + F.linear(c, self.cond_proj.weight.float(), self.cond_proj.bias.float())
                else:
                    h = torch.cat([h, c], dim=-1)
            elif cond is not None:
                raise ValueError("cond was given but the router has cond_dim=0")
            logits = F.linear(h, self.proj.weight.float(), self.proj.bias.float())
            scores = logits
            if self.training and self.noise_std > 0:
                scores = logits + torch.randn_like(logits) * self.noise_std
            probs = scores.softmax(dim=-1)
            top_p, top_i = probs.topk(self.k, dim=-1)
            if self.k == 1:
                # renormalised, a single weight is the constant 1 and the task loss would never reach the
                # router; p / p.detach() is still exactly 1 but carries the gradient of p (straight through)
                top_w = top_p / top_p.detach().clamp_min(torch.finfo(top_p.dtype).tiny)
            else:
                top_w = top_p / top_p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top_p.dtype).tiny)
        return RouterOutput(logits, probs, top_i, top_w)


def _broadcast_cond(cond: Tensor, lead: torch.Size, cond_dim: int) -> Tensor:
    """Per-sample conditioning ``(B, C)`` is repeated over the tokens of ``(B, N, ·)`` inputs."""
    if cond.shape[-1] != cond_dim:
        raise ValueError(f"cond must end with {cond_dim} features, got shape {tuple(cond.shape)}")
    if cond.shape[:-1] == lead:
        return cond
    if cond.dim() == 2 and len(lead) == 2 and cond.shape[0] == lead[0]:
        return cond[:, None, :].expand(*lead, cond_dim)
    raise ValueError(f"cond shape {tuple(cond.shape)} does not match input leading dims {tuple(lead)}")


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class ExpertMLP(nn.Module):
    """E homogeneous MLP experts (Linear → activation → dropout → Linear) with stacked weights.

    Dispatch uses :meth:`expert_fns` (one callable per expert, cheap backward); :meth:`forward_all` is the
    dense baseline (one batched matmul over all experts); :meth:`forward_expert` runs one expert.
    """

    no_weight_decay_params = ("b1", "b2")  # stacked biases: 2-D but still biases (engine.utils.no_decay_names)

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        out_dim: int | None = None,
        activation: Literal["gelu", "relu", "silu"] = "gelu",
        dropout: float = 0.0,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ConfigError(
                f"unknown expert activation {activation!r}", fix=f"use one of {sorted(_ACTIVATIONS)}"
            )
        out_dim = out_dim or dim
        self.num_experts, self.dim, self.hidden, self.out_dim = num_experts, dim, hidden, out_dim
        self.activation = _ACTIVATIONS[activation]
        self.drop = nn.Dropout(dropout)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same distribution as ``nn.Linear``'s default init, per expert."""
        for w, b, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def __len__(self) -> int:
        return self.num_experts

    def _mlp(self, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        return torch.addmm(b2, self.drop(self.activation(torch.addmm(b1, x, w1))), w2)

    def forward_expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` alone (for one-off use; dispatch loops use :meth:`expert_fns`)."""
        return self._mlp(x, self.w1[e], self.b1[e], self.w2[e], self.b2[e])

    def expert_fns(self) -> list[Callable[[Tensor], Tensor]]:
        """One callable per expert over weight views made with a single ``unbind`` per tensor.

        Indexing ``w1[e]`` separately per expert would make backward materialise E full-size zero
        gradients (O(E²) memory traffic); ``unbind`` stacks the per-expert gradients once.
        """
        views = zip(self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0))
        return [functools.partial(self._mlp, w1=w1, b1=b1, w2=w2, b2=b2) for w1, b1, w2, b2 in views]

    def forward_grouped(self, xs: Tensor, counts: Sequence[int]) -> Tensor:
        """Rows ``xs`` sorted by expert (``counts[e]`` rows each) through two padded batched matmuls.

        One ``baddbmm`` per layer instead of E small matmuls: on few tokens per expert the per-call
        overhead, not FLOPs, is the cost. Padding rows are computed but never gathered back.
        """
        cap = max(counts)
        starts = torch.tensor([0, *itertools.accumulate(counts)][:-1], device=xs.device)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts, device=xs.device), torch.tensor(counts, device=xs.device)
        )
        rows = expert_of_row * cap + torch.arange(xs.shape[0], device=xs.device) - starts[expert_of_row]
        padded = xs.new_zeros(self.num_experts * cap, xs.shape[1]).index_copy(0, rows, xs)
        h = self.drop(
            self.activation(torch.baddbmm(self.b1[:, None], padded.view(self.num_experts, cap, -1), self.w1))
        )
        out = torch.baddbmm(self.b2[:, None], h, self.w2)
        return out.reshape(self.num_experts * cap, self.out_dim)[rows]

    def forward_all(self, x: Tensor) -> Tensor:
        """Every expert on every row: ``(T, dim)`` → ``(E, T, out_dim)``."""
        h = self.drop(
            self.activation(torch.baddbmm(self.b1[:, None], x.expand(self.num_experts, -1, -1), self.w1))
        )
        return torch.baddbmm(self.b2[:, None], h, self.w2)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, out_dim={self.out_dim}"


Experts = nn.ModuleList | ExpertMLP


def _expert_fns(experts: Experts) -> Sequence[Callable[[Tensor], Tensor]]:
    return experts.expert_fns() if isinstance(experts, ExpertMLP) else experts


# Above this many padded rows the per-expert matmuls are already efficient on CPU and padding only costs
# (bench_moe: 4096 tokens × top-2 over 16 experts ran 0.8× slower padded than segmented).
_GROUPED_MAX_ROWS = 2048


def capacity_keep_mask(topk_idx: Tensor, num_experts: int, capacity: int) -> Tensor:
    """``(T, k)`` bool: which slots fit under ``capacity`` per expert (slot 0 first, then item order)."""
    t, k = topk_idx.shape
    slot_major = topk_idx.t().reshape(-1)
    one_hot = F.one_hot(slot_major, num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of each slot within its expert's queue
    return (position < capacity).reshape(k, t).t()


def dispatch_experts(
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    experts: Experts,
    mode: Dispatch = "sparse",
    keep: Tensor | None = None,
) -> Tensor:
    """Combine ``Σ_slots w · expert(x)`` for items ``x (T, *feat)`` routed by ``topk_idx (T, k)``.

    Items may have any trailing shape (vectors, or whole images for MoME's expert U-Nets) and experts may
    change it; the weights broadcast over it. ``keep`` (``(T, k)`` bool) zeroes dropped slots.
    """
    t, k = topk_idx.shape
    if mode == "reference":
        return _dispatch_reference(x, topk_idx, topk_weights, experts, keep)
    if mode == "dense":
        return _dispatch_dense(x, topk_idx, topk_weights, experts, keep)
    if mode != "sparse":
        raise ConfigError(f"unknown MoE dispatch {mode!r}", fix="use 'sparse', 'reference' or 'dense'")
    num_experts = len(experts)
    flat_e = topk_idx.reshape(-1)
    slots = torch.arange(t * k, device=x.device)
    if keep is not None:
        kept = keep.reshape(-1)
        flat_e, slots = flat_e[kept], slots[kept]
    order = torch.argsort(flat_e, stable=True)
    slots_sorted = slots[order]
    counts = torch.bincount(flat_e, minlength=num_experts).tolist()  # the one host sync of this path
    xs = x[slots_sorted // k]
    n = xs.shape[0]
    if (
        isinstance(experts, ExpertMLP)
        and xs.dim() == 2
        and 0 < num_experts * max(counts) <= min(2 * n, _GROUPED_MAX_ROWS)
    ):
        # Few rows per expert (per-call overhead dominates) and balanced enough that padding every expert
        # to the busiest one at most doubles the rows: one padded batched matmul beats E small ones.
        ys = experts.forward_grouped(xs, counts)
    else:
        fns = _expert_fns(experts)
        pieces = [fns[e](seg) for e, seg in enumerate(xs.split(counts)) if seg.shape[0]]
        ys = torch.cat(pieces) if pieces else _empty_output(experts, x)
    buf = ys.new_zeros(t * k, *ys.shape[1:]).index_copy(0, slots_sorted, ys)
    w = topk_weights.to(ys.dtype)
    if keep is not None:
        w = w * keep.to(w.dtype)
    w = w.reshape(t, k, *([1] * (ys.dim() - 1)))
    return (buf.reshape(t, k, *ys.shape[1:]) * w).sum(1)


def _dispatch_reference(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, experts: Experts, keep: Tensor | None
) -> Tensor:
    out: Tensor | None = None
    for e, fn in enumerate(_expert_fns(experts)):
        hit = topk_idx == e
        if keep is not None:
            hit = hit & keep
        tok, slot = hit.nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = fn(x[tok])
        w = topk_weights[tok, slot].to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
        if out is None:
            out = y.new_zeros(x.shape[0], *y.shape[1:])
        out.index_add_(0, tok, y * w)
    if out is None:  # no token reached an expert (none given, or every slot dropped by ``keep``)
        y = _empty_output(experts, x)
        # zeros that stay in the autograd graph, as the sparse path's, so `output.sum().backward()` works
        nothing = torch.zeros(0, dtype=torch.long, device=x.device)
        out = y.new_zeros(x.shape[0], *y.shape[1:]).index_copy(0, nothing, y)
    return out


def _empty_output(experts: Experts, x: Tensor) -> Tensor:
    """A zero-row expert output: its trailing shape is the experts' output's, which may differ from ``x``'s."""
    return _expert_fns(experts)[0](x[:0])


def _dispatch_dense(
    x: Tensor, topk_idx: Tensor, topk_weights: Tensor, experts: Experts, keep: Tensor | None
) -> Tensor:
    w = topk_weights if keep is None else topk_weights * keep.to(topk_weights.dtype)
    gates = torch.zeros(x.shape[0], len(experts), dtype=w.dtype, device=x.device).scatter_add(1, topk_idx, w)
    if isinstance(experts, ExpertMLP):
        ys = experts.forward_all(x)  # (E, T, out)
        return torch.einsum("etd,te->td", ys, gates.to(ys.dtype))
    out: Tensor | None = None
    for e in range(len(experts)):
        y = experts[e](x)
        term = y * gates[:, e].to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
        out = term if out is None else out + term
    assert out is not None
    return out


class MoELayer(nn.Module):
    """Top-k routed Mixture-of-Experts over tokens ``(B, N, D)`` or per-sample vectors ``(B, D)``.

    ``expert_factory(e)`` builds expert ``e`` (any ``nn.Module`` mapping ``(n, D)`` to ``(n, D_out)``);
    ``expert_factory=None`` uses one stacked :class:`ExpertMLP` with ``expert_hidden`` (default 4·D)
    units. Router keyword arguments (``cond_dim``, ``cond_mode``, ``noise_std``, ``jitter``) go to
    :class:`TopKRouter`. ``forward`` returns :class:`MoEOutput`; add ``aux_loss`` to the training loss.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        expert_factory: Callable[[int], nn.Module] | None = None,
        k: int = 2,
        capacity_factor: float = 0.0,
        dispatch: Dispatch = "sparse",
        balance_coef: float = 0.01,
        z_coef: float = 1e-3,
        expert_hidden: int | None = None,
        **router_kwargs,
    ):
        super().__init__()
        if dispatch not in ("sparse", "reference", "dense"):
            raise ConfigError(
                f"unknown MoE dispatch {dispatch!r}", fix="use 'sparse', 'reference' or 'dense'"
            )
        if capacity_factor < 0:
            raise ConfigError(f"capacity_factor must be >= 0 (0 = dropless), got {capacity_factor}")
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.capacity_factor, self.dispatch = capacity_factor, dispatch
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.router = TopKRouter(dim, num_experts, k, **router_kwargs)
        self.experts: Experts
        if expert_factory is None:
            self.experts = ExpertMLP(num_experts, dim, expert_hidden or 4 * dim)
        else:
            self.experts = nn.ModuleList(expert_factory(e) for e in range(num_experts))

    def capacity(self, num_items: int) -> int:
        """Slots per expert for ``num_items`` items (0 = unlimited)."""
        if self.capacity_factor <= 0:
            return 0
        # rounded first: 1.1 · 100 · 2 / 4 is 55.000000000000007 in floating point, and ceil made it 56
        return max(1, math.ceil(round(self.capacity_factor * num_items * self.k / self.num_experts, 9)))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> MoEOutput:
        if x.dim() not in (2, 3):
            raise ValueError(f"MoELayer expects (B, D) or (B, N, D) input, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        route = self.router(x, cond)
        flat = x.reshape(-1, x.shape[-1])
        top_i = route.topk_idx.reshape(flat.shape[0], self.k)
        top_w = route.topk_weights.reshape(flat.shape[0], self.k)
        cap = self.capacity(flat.shape[0])
        keep = capacity_keep_mask(top_i, self.num_experts, cap) if cap else None
        out = dispatch_experts(flat, top_i, top_w, self.experts, self.dispatch, keep)
        balance = load_balancing_loss(route.probs, top_i, self.num_experts)
        z = router_z_loss(route.logits)
        with torch.no_grad():
            load = torch.bincount(top_i.reshape(-1), minlength=self.num_experts).float() / max(
                top_i.numel(), 1
            )
            probs = route.probs.reshape(-1, self.num_experts)
            # an empty batch routes nothing: zeros like ``load``, not the NaN of a mean over no rows
            importance = probs.mean(0) if probs.shape[0] else probs.new_zeros(self.num_experts)
            dropped = int((~keep).sum()) if keep is not None else 0
        kept = None if keep is None else keep.reshape(route.topk_idx.shape)
        stats = RouterStats(load, importance, route.topk_idx.detach(), route.topk_weights.detach(), dropped, kept)
        aux = self.balance_coef * balance + self.z_coef * z
        return MoEOutput(out.reshape(*lead, *out.shape[1:]), aux, balance, z, stats)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, dispatch={self.dispatch!r}, "
            f"capacity_factor={self.capacity_factor}"
        )


class ExpertUsage:
    """Accumulates how often (and with how much gate weight) each expert is chosen, per condition.

    ``update(stats_or_topk_idx, condition)``: ``condition`` is one label for the whole batch (e.g. the
    task name), a sequence with one label per item (first dim of ``topk_idx``), or ``None`` (``"all"``).
    ``counts()``/``fractions()``/``weights()`` return condition × expert tables for report heatmaps. Slots a
    capacity limit dropped (``RouterStats.kept``) are not counted: those experts never saw the item.
    """

    def __init__(self, num_experts: int, expert_names: Sequence[str] | None = None):
        if expert_names is not None and len(expert_names) != num_experts:
            raise ConfigError(f"got {len(expert_names)} expert names for {num_experts} experts")
        self.num_experts = num_experts
        self.expert_names = (
            list(expert_names) if expert_names else [f"expert_{e}" for e in range(num_experts)]
        )
        self._counts: dict[str, Tensor] = {}
        self._weights: dict[str, Tensor] = {}

    def update(self, routing: RouterStats | Tensor, condition: str | Sequence[str] | None = None) -> None:
        kept = None
        if isinstance(routing, RouterStats):
            idx, w, kept = routing.topk_idx, routing.topk_weights, routing.kept
        else:
            idx, w = routing, None
        idx = idx.detach().cpu()
        w = torch.ones(idx.shape, dtype=torch.float64) if w is None else w.detach().cpu().double()
        used = torch.ones(idx.shape, dtype=torch.float64) if kept is None else kept.detach().cpu().double()
        if condition is None or isinstance(condition, str):
            groups = {condition or "all": slice(None)}
        else:
            if len(condition) != idx.shape[0]:
                raise ValueError(f"{len(condition)} condition labels for {idx.shape[0]} routed items")
            labels = list(condition)
            groups = {
                c: torch.tensor([i for i, v in enumerate(labels) if v == c]) for c in dict.fromkeys(labels)
            }
        for label, sel in groups.items():
            i, wi, ui = idx[sel].reshape(-1), w[sel].reshape(-1), used[sel].reshape(-1)
            zero = torch.zeros(self.num_experts, dtype=torch.float64)
            self._counts[label] = self._counts.get(label, zero) + torch.bincount(
                i, weights=ui, minlength=self.num_experts
            )
            self._weights[label] = self._weights.get(label, zero) + torch.bincount(
                i, weights=wi * ui, minlength=self.num_experts
            )

    def reset(self) -> None:
        self._counts.clear()
        self._weights.clear()

    def _table(self, data: dict[str, Tensor], normalise: bool):
        import pandas as pd

        rows = {}
        for label, v in data.items():
            rows[label] = (v / v.sum().clamp_min(1e-12) if normalise else v).tolist()
        return pd.DataFrame.from_dict(rows, orient="index", columns=self.expert_names)

    def counts(self):
        """condition × expert number of routed slots (``pandas.DataFrame``)."""
        return self._table(self._counts, normalise=False)

    def fractions(self):
        """Row-normalised counts: the share of each condition's slots that went to each expert."""
        return self._table(self._counts, normalise=True)

    def weights(self):
        """Row-normalised summed gate weights (how much each expert contributes, not just how often)."""
        return self._table(self._weights, normalise=True)

    def plot(self, title: str = "Expert usage", which: Literal["fractions", "weights"] = "fractions"):
        """Heatmap (condition × expert) as a matplotlib ``Figure`` (no pyplot state, safe in workers)."""
        from matplotlib.figure import Figure

        table = self.fractions() if which == "fractions" else self.weights()
        values = table.to_numpy(dtype=float)  # an empty table is dtype object, which imshow refuses
        fig = Figure(figsize=(1.5 + 0.55 * self.num_experts, 1.2 + 0.45 * max(len(table), 1)))
        ax = fig.add_subplot()
        im = ax.imshow(
            values, cmap="viridis", vmin=0.0, vmax=max(float(values.max(initial=0.0)), 1e-12), aspect="auto"
        )
        ax.set_xticks(range(self.num_experts), self.expert_names, rotation=45, ha="right")
        ax.set_yticks(range(len(table)), list(table.index))
        for r in range(values.shape[0]):
            for c in range(values.shape[1]):
                ax.text(
                    c,
                    r,
                    f"{values[r, c]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if values[r, c] < 0.5 * values.max() else "black",
                )
        ax.set_xlabel("expert")
        ax.set_title(title)
        label = "share of routed slots" if which == "fractions" else "share of gate weight"
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
        fig.tight_layout()
        return fig
