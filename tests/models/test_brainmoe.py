"""BrainMoE model: router top-k and gradients, adapter shapes, frozen experts, expert kinds learn."""

from __future__ import annotations

import pytest
import torch

from neuromoe.errors import ConfigError
from neuromoe.models import create_model, load_model, save_model
from neuromoe.models.brainmoe import BrainMoE, JEPAExpert

M = 12


pytestmark = pytest.mark.usefixtures("one_thread")


def _fc(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 40, M, generator=g)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    fc = torch.einsum("btm,btn->bmn", x, x) / 39
    fc.diagonal(dim1=1, dim2=2).zero_()
    return fc


def _moe(**kw) -> BrainMoE:
    torch.manual_seed(0)
    return create_model("brainmoe_tiny", **{"n_rois": M, "n_experts": 4, "top_k": 2, "dropout": 0.0, **kw})


def test_router_picks_top_k_and_gradients_reach_router():
    model = _moe()
    fc = _fc(6)
    out = model(fc)
    probs = out.route.probs
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    expected = probs.topk(2, dim=-1).indices
    assert torch.equal(out.route.topk_idx, expected)
    torch.testing.assert_close(out.route.topk_weights.sum(-1), torch.ones(6))
    assert out.stats.load.sum().item() == pytest.approx(1.0)
    loss = out.outputs["phenotype"].logsumexp(-1).sum() + out.outputs["age"].pow(2).sum()
    loss.backward()
    assert model.router.proj.weight.grad is not None and model.router.proj.weight.grad.abs().sum() > 0
    assert model.router_mlp[0].weight.grad.abs().sum() > 0


def test_adapter_output_shapes_and_precomputed_embeddings_match():
    model = _moe(n_classes=3).eval()
    fc = _fc(5)
    out = model(fc)
    assert out.outputs["phenotype"].shape == (5, 3)
    assert out.outputs["sex"].shape == (5, 2)
    assert out.outputs["age"].shape == (5,)
    emb = model.expert_embeddings(fc)
    assert emb.shape == (5, 4, model.dim)
    cached = model(fc, expert_emb=emb)
    torch.testing.assert_close(cached.outputs["phenotype"], out.outputs["phenotype"])


@pytest.mark.parametrize("kind", ["state_clf", "fc_mae"])
def test_batched_expert_projection_equals_each_expert_alone(kind):
    """expert_embeddings runs all FC experts' input projections as one matmul: same numbers as embed()."""
    model = _moe(expert_kind=kind).eval()
    with torch.no_grad():  # distinct experts, so a mix-up of their projections would show
        for e in model.experts:
            e.encoder.proj.weight.normal_()
    fc = _fc(3)
    alone = torch.stack([e.embed(fc) for e in model.experts], dim=1)
    torch.testing.assert_close(model.expert_embeddings(fc), alone)


def test_frozen_experts_get_no_gradients_unless_unfrozen():
    frozen = _moe()
    frozen.train()
    assert not any(e.training for e in frozen.experts)
    out = frozen(_fc(4))
    out.outputs["phenotype"].sum().backward()
    assert all(p.grad is None for p in frozen.experts.parameters())
    unfrozen = _moe(freeze_experts=False)
    out = unfrozen(_fc(4))
    out.outputs["phenotype"].sum().backward()
    used = out.route.topk_idx.unique().tolist()
    grads = [p.grad for p in unfrozen.experts[used[0]].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def _train(expert, fc, ts=None, target=None, steps=40):
    opt = torch.optim.Adam([p for p in expert.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        if isinstance(expert, JEPAExpert):
            expert.update_target()
        loss, _ = expert.loss(fc, ts, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_fc_mae_expert_learns_to_reconstruct_hidden_rois():
    torch.manual_seed(0)
    expert = create_model("brainmoe_expert_tiny", kind="fc_mae", n_rois=M, dropout=0.0)
    fc = _fc(16)
    gen = torch.Generator().manual_seed(1)
    mask = expert.random_mask(16, fc.device, gen)
    before = float(expert.loss(fc, mask=mask)[0].detach())
    _train(expert, fc, steps=60)
    after = float(expert.loss(fc, mask=mask)[0].detach())
    assert after < 0.7 * before


def test_state_clf_expert_separates_states():
    torch.manual_seed(0)
    expert = create_model("brainmoe_expert_tiny", kind="state_clf", n_rois=M, dropout=0.0)
    fc = _fc(24)
    target = torch.arange(24) % 2
    fc[target == 1, :4, :4] += 0.5  # state 1 couples ROIs 0-3 more strongly
    _train(expert, fc, target=target, steps=40)
    _, logs = expert.loss(fc, target=target)
    assert logs["state_acc"] > 0.9


def test_jepa_expert_ema_target_and_latent_loss():
    torch.manual_seed(0)
    expert = create_model(
        "brainmoe_expert_tiny", kind="jepa", n_rois=M, window=4, n_windows=4, ema=0.5, dropout=0.0
    )
    ts = torch.randn(8, 16, M)
    before = [p.clone() for p in expert.target.parameters()]
    losses = _train(expert, None, ts, steps=30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, expert.target.parameters()))
    assert not any(p.requires_grad for p in expert.target.parameters())
    assert expert.embed(None, ts).shape == (8, expert.dim)
    with pytest.raises(ValueError, match="expected ts"):
        expert.embed(None, torch.randn(2, 10, M))
    # the EMA target encoder runs in eval mode even while the expert trains (its dropout made the targets noise)
    noisy = create_model("brainmoe_expert_tiny", kind="jepa", n_rois=M, window=4, n_windows=4, depth=2,
                         dropout=0.5).train()
    assert noisy.training and not noisy.target.training


def test_fc_mae_loss_leaves_out_the_diagonal(monkeypatch):
    """A hidden row's own diagonal entry (a correlation's self-connection, 0 for every scan) was a target."""
    torch.manual_seed(0)
    expert = create_model("brainmoe_expert_tiny", kind="fc_mae", n_rois=M, dropout=0.0)
    fc = _fc(4)
    recon = fc.clone()
    recon[:, range(M), range(M)] = 5.0  # perfect everywhere but on the diagonal
    monkeypatch.setattr(expert.decoder, "forward", lambda h: recon)
    mask = expert.random_mask(4, fc.device, torch.Generator().manual_seed(1))
    assert float(expert.loss(fc, mask=mask)[0]) == 0.0


def test_model_directory_round_trip(tmp_path):
    model = _moe().eval()
    fc = _fc(3)
    save_model(model, tmp_path / "m", {"family": "brainmoe", "extra": {"kind": "brainmoe"}})
    loaded, meta = load_model(tmp_path / "m")
    assert isinstance(loaded, BrainMoE) and meta["architecture"] == "brainmoe_tiny"
    torch.testing.assert_close(loaded(fc).outputs["phenotype"], model(fc).outputs["phenotype"])


def _router_grad_rows(model: BrainMoE, fc: torch.Tensor) -> torch.Tensor:
    """Per expert: |gradient| reaching its row of the router's output layer after one backward pass."""
    model.zero_grad()
    out = model(fc)
    (out.outputs["phenotype"].logsumexp(-1).sum() + out.outputs["age"].pow(2).sum()).backward()
    return model.router.proj.weight.grad.abs().sum(1)


def test_top1_router_learns_from_the_task_and_dense_routing_mixes_every_expert():
    model = _moe(top_k=1).train()
    fc = _fc(1)
    out = model(fc)
    chosen = out.route.topk_idx[0, 0].item()
    assert out.stats.topk_weights.item() == 1.0  # one expert, weight exactly 1 (straight through)...
    grads = _router_grad_rows(model, fc)
    assert (grads > 0).all(), f"expert {chosen} chosen; top-1 grads {grads}"  # ...yet the router learns
    model.dense_routing = True
    out = model(fc)
    assert out.stats.topk_idx.shape == (1, 4)  # all experts enter the adapter
    torch.testing.assert_close(out.stats.topk_weights, out.route.probs)
    grads = _router_grad_rows(model, fc)
    assert (grads > 0).all(), f"expert {chosen} chosen; dense grads {grads}"
    model.eval()  # dense routing is a training-time warm-up only
    assert model(fc).stats.topk_idx.shape == (1, 1)


def test_pca_router_input_is_whitened_saved_and_reloaded(tmp_path):
    model = _moe(router_input="pca", router_pca=4).eval()
    train = _fc(10, seed=1)
    model.set_router_basis(train)
    x = train[:, model.tri_i, model.tri_j]
    z = (x - model.router_center) @ model.router_basis.T
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(4), atol=1e-4, rtol=0)
    assert model.router_mlp[0].in_features == 4
    few = _moe(router_input="pca", router_pca=4)
    few.set_router_basis(train[:3])  # 3 scans span 2 centred directions: the other axes stay zero
    assert (few.router_basis.abs().sum(1) > 0).tolist() == [True, True, False, False]
    save_model(model, tmp_path / "m", {"family": "brainmoe", "extra": {"kind": "brainmoe"}})
    loaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded.router_basis, model.router_basis)
    fc = _fc(3)
    torch.testing.assert_close(loaded(fc).route.probs, model(fc).route.probs)


def _state_fc(n: int, state: int, seed: int) -> torch.Tensor:
    """FC of ``n`` scans whose state couples a different ROI block (the state's signature)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, M, generator=g)
    block = slice(3 * state, 3 * state + 3)
    x[:, :, block] += torch.randn(n, 40, 1, generator=g)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    return torch.einsum("btm,btn->bmn", x, x) / 39


def test_state_router_learns_states_and_becomes_the_moe_router_prior():
    from neuromoe.models.brainmoe import fit_pca

    torch.manual_seed(0)
    router = create_model("brainmoe_router_tiny", n_rois=M, n_states=3, router_pca=4, dropout=0.0)
    fc = torch.cat([_state_fc(12, s, seed=s) for s in range(3)])
    target = torch.arange(3).repeat_interleave(12)
    fit_pca(fc[:, router.tri_i, router.tri_j], router.router_center, router.router_basis)
    _train(router, fc, target=target, steps=80)
    test_fc = torch.cat([_state_fc(6, s, seed=10 + s) for s in range(3)])
    acc = (router(test_fc).argmax(1) == torch.arange(3).repeat_interleave(6)).float().mean()
    assert acc > 0.9
    # experts in another order than the router's states: each expert gets its own state's logit
    model = _moe(n_experts=3, top_k=1, router_input="pca", router_pca=4).eval()
    order = [2, 0, 1]
    model.load_router_prior(router.eval(), order)
    torch.testing.assert_close(model.route(test_fc).logits, router(test_fc)[:, order])
    with pytest.raises(ValueError, match="does not match"):
        model.load_router_prior(router, [0, 1, 1])


def test_a_preset_cannot_be_swapped_by_a_hidden_keyword() -> None:
    """``_size`` was a keyword of the factories: brainmoe_tiny(_size='demo') built a demo model saved as tiny."""
    with pytest.raises(ConfigError, match="_size"):
        create_model("brainmoe_tiny", _size="demo")
