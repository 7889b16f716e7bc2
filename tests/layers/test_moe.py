"""MoE layer: the three dispatch paths agree, routing/gradient/capacity semantics, losses, bf16, usage."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neuromoe.errors import ConfigError
from neuromoe.layers.moe import (
    ExpertMLP,
    ExpertUsage,
    MoELayer,
    TopKRouter,
    capacity_keep_mask,
    dispatch_experts,
    load_balancing_loss,
    router_z_loss,
)

D, E = 8, 4


def mlp_factory(dim: int = D, hidden: int = 16) -> Callable[[int], nn.Module]:
    def make(e: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    return make


def make_layer(dispatch: str, grouped: bool, seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    factory = None if grouped else mlp_factory()
    return MoELayer(D, kw.pop("num_experts", E), factory, dispatch=dispatch, expert_hidden=16, **kw)


def masked_dense(layer: MoELayer, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Independent oracle: every expert on every token, weighted by a (T, E) gate matrix built by hand."""
    flat = x.reshape(-1, D)
    r = layer.router(x, cond)
    idx, w = r.topk_idx.reshape(-1, layer.k), r.topk_weights.reshape(-1, layer.k)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for s in range(layer.k):
            e = int(idx[t, s])
            if isinstance(layer.experts, ExpertMLP):
                y = layer.experts.forward_expert(e, flat[t : t + 1])[0]
            else:
                y = layer.experts[e](flat[t : t + 1])[0]
            out[t] += w[t, s] * y
    return out.reshape(x.shape)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, D), (7, D)])
@pytest.mark.parametrize("cond_mode", [None, "concat", "add"])
def test_paths_agree(grouped: bool, shape: tuple[int, ...], cond_mode: str | None) -> None:
    kw = {} if cond_mode is None else {"cond_dim": 3, "cond_mode": cond_mode}
    torch.manual_seed(1)
    x = torch.randn(*shape)
    cond = None if cond_mode is None else torch.randn(shape[0], 3)  # per-sample, broadcast over tokens
    outs = {}
    for mode in ("sparse", "reference", "dense"):
        layer = make_layer(mode, grouped, **kw)
        outs[mode] = layer(x, cond).output
        assert outs[mode].shape == x.shape
    oracle = masked_dense(layer, x, cond)
    for mode, out in outs.items():
        torch.testing.assert_close(out, oracle, rtol=1e-5, atol=1e-6, msg=f"{mode} != oracle")


def test_topk_equals_num_experts_is_dense_softmax_mixture() -> None:
    layer = make_layer("sparse", grouped=False, k=E)
    x = torch.randn(10, D)
    probs = torch.softmax(layer.router.proj(x), dim=-1)
    expected = sum(probs[:, e : e + 1] * layer.experts[e](x) for e in range(E))
    torch.testing.assert_close(layer(x).output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sparse", "reference", "dense"])
def test_single_expert_is_that_expert(mode: str) -> None:
    layer = make_layer(mode, grouped=False, num_experts=1, k=1)
    x = torch.randn(2, 6, D)
    out = layer(x)
    torch.testing.assert_close(out.output, layer.experts[0](x))
    assert out.balance_loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["sparse", "reference"])
def test_gradients_reach_router_and_selected_experts_only(mode: str) -> None:
    layer = make_layer(mode, grouped=False, num_experts=6, k=1)
    with torch.no_grad():  # force every token to expert 2 or 4 via the router bias
        layer.router.proj.weight.mul_(0.01)
        layer.router.proj.bias.copy_(torch.tensor([-5.0, -5.0, 5.0, -5.0, 4.9, -5.0]))
    x = torch.randn(16, D)
    out = layer(x)
    (out.output.pow(2).sum() + out.aux_loss).backward()
    used = set(out.stats.topk_idx.unique().tolist())
    assert used <= {2, 4} and 2 in used
    assert layer.router.proj.weight.grad is not None and layer.router.proj.weight.grad.abs().sum() > 0
    for e, expert in enumerate(layer.experts):
        grads = [p.grad for p in expert.parameters()]
        if e in used:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


def test_grouped_experts_gradients_only_on_selected_rows() -> None:
    layer = make_layer("sparse", grouped=True, k=1)
    x = torch.randn(12, D)
    out = layer(x)
    out.output.sum().backward()
    used = set(out.stats.topk_idx.unique().tolist())
    for e in range(E):
        assert (layer.experts.w1.grad[e].abs().sum() > 0) == (e in used)


def test_balance_loss_minimal_at_uniform_and_larger_when_collapsed() -> None:
    t = 64
    uniform_probs = torch.full((t, E), 1.0 / E)
    uniform_idx = torch.arange(t * 2).remainder(E).reshape(t, 2)
    assert load_balancing_loss(uniform_probs, uniform_idx, E).item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(t, 1)
    collapsed_idx = torch.zeros(t, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed_probs, collapsed_idx, E).item() == pytest.approx(E * 0.97)
    random = torch.softmax(torch.randn(t, E) * 3, -1)
    assert load_balancing_loss(random, random.topk(2, -1).indices, E).item() >= 1.0 - 1e-6


def test_z_loss_nonnegative_and_grows_with_logit_scale() -> None:
    logits = torch.randn(32, E)
    small, big = router_z_loss(logits * 0.1), router_z_loss(logits * 10)
    assert small.item() >= 0 and big.item() > small.item()
    assert router_z_loss(torch.full((4, E), -100.0)).item() >= 0


def test_capacity_drops_later_and_second_choice_slots() -> None:
    # 4 items, k=2, E=2, capacity 2. First choices queue before second choices, then item order:
    # expert 0 queue = items 0, 1 (kept), 2 (dropped), then item 3's 2nd choice (dropped);
    # expert 1 queue = item 3's 1st choice (kept), then 2nd choices of items 0 (kept), 1 and 2 (dropped).
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    keep = capacity_keep_mask(idx, 2, capacity=2)
    expected = torch.tensor([[True, True], [True, False], [False, False], [True, False]])
    assert torch.equal(keep, expected)


@pytest.mark.parametrize("mode", ["sparse", "reference", "dense"])
def test_capacity_layer_zeroes_dropped_slots(mode: str) -> None:
    layer = make_layer(mode, grouped=False, capacity_factor=0.5)
    x = torch.randn(20, D)
    out = layer(x)
    r = layer.router(x)
    keep = capacity_keep_mask(r.topk_idx, E, layer.capacity(20))
    assert out.stats.dropped == int((~keep).sum()) > 0
    ref = dispatch_experts(x, r.topk_idx, r.topk_weights * keep, layer.experts, "reference")
    torch.testing.assert_close(out.output, ref)
    per_expert = torch.bincount(r.topk_idx[keep], minlength=E)
    assert per_expert.max() <= layer.capacity(20)


def test_bf16_autocast_keeps_router_fp32() -> None:
    layer = make_layer("sparse", grouped=True, cond_dim=3)
    x, cond = torch.randn(4, 6, D), torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x, cond)
        out = layer(x, cond)
    assert r.logits.dtype == r.probs.dtype == r.topk_weights.dtype == torch.float32
    assert out.output.dtype == torch.bfloat16 and torch.isfinite(out.output).all()
    assert out.aux_loss.dtype == torch.float32
    ref = layer(x, cond).output
    torch.testing.assert_close(out.output.float(), ref, rtol=0.05, atol=0.05)
    out.aux_loss.backward()
    assert layer.router.proj.weight.grad is not None


def test_deterministic_given_seed_with_noise_and_jitter() -> None:
    def run() -> torch.Tensor:
        layer = make_layer("sparse", grouped=False, noise_std=1.0, jitter=0.1, seed=3)
        layer.train()
        torch.manual_seed(4)
        return layer(torch.randn(5, 3, D)).output

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)


def test_noise_and_jitter_only_in_training() -> None:
    router = TopKRouter(D, E, 2, noise_std=5.0, jitter=0.5).eval()
    x = torch.randn(50, D)
    a, b = router(x), router(x)
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.probs, b.probs)
    router.train()
    assert not torch.equal(router(x).probs, router(x).probs)


def test_router_weights_renormalised_and_stats() -> None:
    layer = make_layer("sparse", grouped=False)
    out = layer(torch.randn(6, 4, D))
    assert out.stats.topk_idx.shape == (6, 4, 2)
    torch.testing.assert_close(out.stats.topk_weights.sum(-1), torch.ones(6, 4))
    assert out.stats.load.sum().item() == pytest.approx(1.0)
    assert out.stats.importance.sum().item() == pytest.approx(1.0)
    assert not out.stats.load.requires_grad and out.stats.dropped == 0


def test_dispatch_on_images_for_case_level_experts() -> None:
    """MoME-style: a router over pooled features picks expert CNNs that consume whole images."""
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Conv3d(1, 2, 3, padding=1) for _ in range(3))
    imgs = torch.randn(4, 1, 6, 6, 6)
    router = TopKRouter(1, 3, 2)
    r = router(imgs.mean(dim=(2, 3, 4)))
    sparse = dispatch_experts(imgs, r.topk_idx, r.topk_weights, experts, "sparse")
    dense = dispatch_experts(imgs, r.topk_idx, r.topk_weights, experts, "dense")
    assert sparse.shape == (4, 2, 6, 6, 6)
    torch.testing.assert_close(sparse, dense)


def test_bad_configuration_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="top-k"):
        MoELayer(D, 2, k=3)
    with pytest.raises(ConfigError, match="dispatch"):
        MoELayer(D, 2, dispatch="fast")
    with pytest.raises(ValueError, match="cond"):
        MoELayer(D, 2, cond_dim=3)(torch.randn(2, D))


def test_moe_layer_learns_a_piecewise_function() -> None:
    """Two regimes (x0 > 0 vs < 0) with different linear maps: the routed MoE must fit them."""
    torch.manual_seed(0)
    layer = MoELayer(D, 4, k=1, expert_hidden=32, balance_coef=0.01)
    a, b = torch.randn(D, D), torch.randn(D, D)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, D)
    y = torch.where(x[:, :1] > 0, x @ a, x @ b)
    first = None
    for _ in range(150):
        out = layer(x)
        loss = nn.functional.mse_loss(out.output, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_expert_usage_tables() -> None:
    usage = ExpertUsage(3, ["a", "b", "c"])
    usage.update(torch.tensor([[0, 1], [0, 2]]), condition="age")
    usage.update(torch.tensor([[2, 1], [2, 0], [1, 0]]), condition=["ad", "pd", "ad"])
    usage.update(torch.tensor([[0, 1]]), condition="age")
    counts = usage.counts()
    assert counts.loc["age"].tolist() == [3, 2, 1]
    assert counts.loc["ad"].tolist() == [1, 2, 1] and counts.loc["pd"].tolist() == [1, 0, 1]
    assert usage.fractions().loc["age"].sum() == pytest.approx(1.0)
    layer = make_layer("sparse", grouped=False)
    usage2 = ExpertUsage(E)
    usage2.update(layer(torch.randn(5, D)).stats)
    assert usage2.counts().loc["all"].sum() == 10
    assert usage2.weights().loc["all"].sum() == pytest.approx(1.0)
    fig = usage.plot()
    assert len(fig.axes) == 2


def test_expert_usage_leaves_out_slots_the_capacity_limit_dropped() -> None:
    """Dropped slots (their expert never saw the item, they add 0 to the output) were counted as used."""
    layer = make_layer("sparse", grouped=False, capacity_factor=0.5)
    stats = layer(torch.randn(16, D)).stats
    assert stats.dropped > 0 and stats.kept is not None and int((~stats.kept).sum()) == stats.dropped
    usage = ExpertUsage(E)
    usage.update(stats)
    assert usage.counts().loc["all"].sum() == 16 * layer.k - stats.dropped
    per_expert = torch.bincount(stats.topk_idx[stats.kept], minlength=E).double()
    assert usage.counts().loc["all"].tolist() == per_expert.tolist()


@settings(max_examples=20, deadline=None)
@given(
    num_experts=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    tokens=st.integers(1, 12),
    capacity_factor=st.sampled_from([0.0, 0.5, 1.0, 1.5]),
    grouped=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sparse_equals_reference_property(
    num_experts: int, k_frac: float, tokens: int, capacity_factor: float, grouped: bool, seed: int
) -> None:
    k = 1 + int(k_frac * (num_experts - 1))
    torch.manual_seed(seed)
    x = torch.randn(tokens, D)
    outs = []
    for mode in ("sparse", "reference", "dense"):
        layer = make_layer(
            mode, grouped, seed=seed, num_experts=num_experts, k=k, capacity_factor=capacity_factor
        )
        outs.append(layer(x).output)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-6)


def test_docstring_usage_runs() -> None:
    """The module docstring's example is real code."""
    moe = MoELayer(16, num_experts=8, k=2, cond_dim=4)
    out = moe(torch.randn(2, 3, 16), cond=torch.randn(2, 4))
    usage = ExpertUsage(8)
    usage.update(out.stats, condition="age")
    assert out.output.shape == (2, 3, 16) and usage.counts().loc["age"].sum() == 12
    expert_nets = nn.ModuleList(nn.Conv3d(1, 2, 1) for _ in range(5))
    route = TopKRouter(6, 5, k=2)(torch.randn(3, 6))
    fused = dispatch_experts(torch.randn(3, 1, 4, 4, 4), route.topk_idx, route.topk_weights, expert_nets)
    assert fused.shape == (3, 2, 4, 4, 4)


@pytest.mark.parametrize("mode", ["sparse", "reference", "dense"])
def test_experts_may_change_the_feature_size_and_run_in_bf16(mode: str) -> None:
    torch.manual_seed(0)
    layer = MoELayer(D, E, lambda e: nn.Linear(D, 3), k=2, dispatch=mode)
    x = torch.randn(2, 5, D)
    out = layer(x).output
    assert out.shape == (2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x).output
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, rtol=0.05, atol=0.05)


def test_grouped_matmul_equals_per_expert_segments_with_empty_experts() -> None:
    torch.manual_seed(3)
    experts = ExpertMLP(5, D, 16)
    counts = [3, 0, 4, 1, 0]
    xs = torch.randn(sum(counts), D, requires_grad=True)
    grouped = experts.forward_grouped(xs, counts)
    fns = experts.expert_fns()
    segmented = torch.cat([fns[e](seg) for e, seg in enumerate(xs.split(counts)) if seg.shape[0]])
    torch.testing.assert_close(grouped, segmented)
    g1 = torch.autograd.grad(grouped.square().sum(), [xs, experts.w1, experts.b2])
    g2 = torch.autograd.grad(segmented.square().sum(), [xs, experts.w1, experts.b2])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["sparse", "reference", "dense"])
@pytest.mark.parametrize("grouped", [False, True])
def test_top1_gate_is_exactly_one_but_the_router_gets_the_task_gradient(mode: str, grouped: bool) -> None:
    """k=1: renormalising the single gate made it the constant 1, so the task loss never reached the
    router. The gate must stay exactly 1 (output = the chosen expert's) and pass p's gradient straight
    through, i.e. the router gradient of ``Σ_t c_t·log p_t`` with ``c_t = ∂L/∂gate_t``."""
    layer = make_layer(mode, grouped, num_experts=E, k=1, balance_coef=0.0, z_coef=0.0)
    x = torch.randn(32, D)
    out = layer(x)
    assert torch.equal(out.stats.topk_weights, torch.ones(32, 1))
    idx = out.stats.topk_idx[:, 0]
    with torch.no_grad():
        chosen = torch.stack([
            layer.experts.forward_expert(int(e), x[t : t + 1])[0] if grouped else layer.experts[int(e)](x[t])
            for t, e in enumerate(idx)
        ])
    torch.testing.assert_close(out.output, chosen)
    out.output.pow(2).sum().backward()  # task loss only: balance and z-loss are off
    grad = layer.router.proj.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 1e-2  # was ~4e-6 (rounding noise)

    # oracle: ∂L/∂gate_t = <2·y_t, y_t>, and the straight-through gate has ∂gate/∂p = 1/p
    router = TopKRouter(D, E, 1)
    router.load_state_dict(layer.router.state_dict())
    p = router(x).probs.gather(-1, idx[:, None])[:, 0]
    (2 * chosen.pow(2).sum(-1) * p.log()).sum().backward()
    torch.testing.assert_close(grad, router.proj.weight.grad)


@pytest.mark.parametrize("mode", ["sparse", "reference", "dense"])
def test_zero_tokens_give_the_experts_output_width(mode) -> None:
    """Width-changing experts (6 → 4) on an empty batch: sparse and reference returned width 6."""
    from torch import nn

    from neuromoe.layers.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(6, 3, lambda e: nn.Linear(6, 4), k=2, dispatch=mode)
    assert layer(torch.zeros(0, 6)).output.shape == (0, 4)
    assert layer(torch.zeros(2, 0, 6)).output.shape == (2, 0, 4)


@pytest.mark.parametrize("mode", ["sparse", "reference", "dense"])
def test_zero_tokens_stay_in_the_graph_with_finite_stats(mode) -> None:
    """Reference dispatch returned fresh zeros (no grad_fn) and ``importance`` was NaN for an empty batch."""
    layer = make_layer(mode, grouped=False)
    out = layer(torch.zeros(0, D))
    out.output.sum().backward()  # raised "does not require grad" on the reference path
    assert torch.equal(out.stats.importance, torch.zeros(E))
    assert torch.equal(out.stats.load, torch.zeros(E))
    keep_none = torch.zeros(3, 2, dtype=torch.bool)
    x = torch.randn(3, D, requires_grad=True)
    r = layer.router(x)
    y = dispatch_experts(x, r.topk_idx, r.topk_weights, layer.experts, mode, keep_none)
    assert torch.equal(y, torch.zeros(3, D)) and y.requires_grad


def test_capacity_is_the_documented_ceiling_despite_float_rounding() -> None:
    """ceil(1.1 · 100 · 2 / 4) is 55; floating point made it 56."""
    assert MoELayer(8, 4, k=2, capacity_factor=1.1).capacity(100) == 55
    assert MoELayer(8, 4, k=2, capacity_factor=1.25).capacity(10) == 7  # a true fraction still rounds up
    collapsed = torch.zeros(100, 8)
    collapsed[:, :2] = 0.5
    top = torch.tensor([[0, 1]]).expand(100, 2)
    assert float(load_balancing_loss(collapsed, top, 8)) == pytest.approx(8 / 2)  # E / k, as documented


def test_usage_heatmap_of_no_updates_is_an_empty_figure() -> None:
    assert ExpertUsage(3).plot() is not None  # imshow refused the empty table's object dtype
