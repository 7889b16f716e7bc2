"""MoME / MoME+ model tests on tiny 2D/3D inputs (the architecture is dimension-agnostic)."""

from __future__ import annotations

import pytest
import torch

from neuromoe.errors import ConfigError
from neuromoe.models import create_model, load_model, save_model
from neuromoe.models.mome import (
    MoME,
    MoMEOutput,
    curriculum_weight,
    deep_supervised_loss,
    deep_supervision_weights,
    gate_supervision_loss,
    mome_loss,
)


def _mome(**kw) -> MoME:
    torch.manual_seed(0)
    return create_model("mome_tiny", spatial_dims=2, **kw)


def test_fused_logits_are_gate_weighted_sum_of_experts_at_every_scale() -> None:
    m = _mome().eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, 32, 32))
    assert len(out.logits) == len(out.gates) == 2
    for s, (fused, gate) in enumerate(zip(out.logits, out.gates, strict=True)):
        assert gate.shape == (2, 5, *fused.shape[2:])
        torch.testing.assert_close(gate.sum(1), torch.ones_like(gate[:, 0]))
        manual = sum(gate[:, k : k + 1] * out.expert_logits[k][s] for k in range(5))
        torch.testing.assert_close(fused, manual)


def test_raw_gate_is_not_normalised() -> None:
    with torch.no_grad():
        out = _mome(gate_norm="raw").eval()(torch.randn(1, 1, 32, 32))
    assert not torch.allclose(out.gates[0].sum(1), torch.ones_like(out.gates[0][:, 0]))


def test_3d_forward_shapes() -> None:
    torch.manual_seed(0)
    m = create_model("mome_tiny", modalities=("t1", "flair")).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 1, 16, 16, 16))
    assert out.logits[0].shape == (1, 2, 16, 16, 16)
    assert out.logits[1].shape == (1, 2, 8, 8, 8)


def test_logit_skip_makes_each_finer_head_a_residual_on_the_coarser_one() -> None:
    """With ``logit_skip`` the full-resolution logits are the finer head's output plus the upsampled coarser
    logits: zeroing the finer head leaves exactly the upsampled coarse map; the parameters are the same as
    the plain nnU-Net head's (so only the outputs, not the state dict, tell them apart)."""
    torch.manual_seed(0)
    plain = create_model("unet_tiny", spatial_dims=2)
    torch.manual_seed(0)
    skip = create_model("unet_tiny", spatial_dims=2, logit_skip=True)
    assert plain.state_dict().keys() == skip.state_dict().keys()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        p_full, p_coarse = plain(x)
        s_full, s_coarse = skip(x)
        torch.testing.assert_close(s_coarse, p_coarse)
        up = torch.nn.functional.interpolate(p_coarse, size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(s_full, p_full + up)
        for prm in skip.heads[-1].parameters():  # heads[-1] = the full-resolution head
            prm.zero_()
        torch.testing.assert_close(skip(x)[0], up)
    m = _mome(logit_skip=True)
    assert all(e.logit_skip for e in m.experts) and m.gate.logit_skip


def test_mome_plus_dispatch_identity_for_present_and_mixture_of_present_for_missing() -> None:
    m = _mome(multimodal=True)
    avail = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]])
    D = m.dispatch_matrix(avail)
    for b in range(2):
        for e in range(5):
            if avail[b, e]:
                torch.testing.assert_close(D[b, e], torch.eye(5)[e])
            else:
                assert torch.all(D[b, e][avail[b] == 0] == 0)
                torch.testing.assert_close(D[b, e].sum(), torch.tensor(1.0))
    x = torch.randn(2, 5, 32, 32)
    xin, _ = m.expert_inputs(x, avail)
    # a missing modality's content never leaks into any expert input
    x2 = x.clone()
    x2[0, 1] += 100.0
    torch.testing.assert_close(m.expert_inputs(x2, avail)[0], xin)
    with pytest.raises(ValueError):
        m.dispatch_matrix(torch.zeros(1, 5))


@pytest.mark.parametrize("top_k", [0, 2])
def test_mome_plus_output_ignores_what_a_missing_channel_holds(top_k: int) -> None:
    """The gate and the router saw the raw channels: content left in a channel marked missing changed the
    fused logits (by 1.38) and, sparse, which experts ran."""
    torch.manual_seed(0)
    m = _mome(multimodal=True, top_k=top_k).eval()
    avail = torch.tensor([[1.0, 1, 0, 1, 0]])
    x = torch.randn(1, 5, 32, 32)
    x[0, 4] = float("nan")  # whatever it holds
    zero_filled = torch.where(avail.bool()[..., None, None], x, 0.0)
    with torch.no_grad():
        a, b = m(x, avail), m(zero_filled, avail)
    torch.testing.assert_close(a.logits[0], b.logits[0], rtol=0, atol=0)
    if top_k:
        assert torch.equal(a.selected, b.selected)


def test_sparse_runs_only_top_k_experts_and_trains_the_router() -> None:
    m = _mome(multimodal=True, top_k=2)
    out = m(torch.randn(1, 5, 32, 32), torch.tensor([[1, 1, 0, 1, 0]]))
    assert len(out.expert_logits) == 2 and out.selected.shape == (1, 2)
    unused = [k for k in range(5) if k not in out.expert_logits]
    assert torch.all(out.gates[0][:, unused] < 1e-6)
    loss, _ = mome_loss(out, torch.zeros(1, 1, 32, 32), None, 0.0)
    loss.backward()
    assert m.router.proj.weight.grad is not None and m.router.proj.weight.grad.abs().sum() > 0


def test_mome_plus_curriculum_scores_every_present_modality_expert() -> None:
    """MoME+ has no single own modality: the curriculum's expert term scores each present modality's expert
    (fed its own image by the identity dispatch rows), so the first epoch (weight 1) still trains the
    experts instead of nothing; missing modalities' experts get no expert term."""
    m = _mome(multimodal=True)
    avail = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]])
    y = torch.zeros(2, 1, 32, 32)
    y[:, :, 8:16, 8:16] = 1
    loss, logs = mome_loss(m(torch.randn(2, 5, 32, 32), avail), y, None, 1.0, available=avail)
    assert "loss_expert" in logs and loss.item() > 0
    loss.backward()
    grads = {k: m.experts[k].heads[-1].conv.conv.weight.grad for k in range(5)}
    assert all(grads[k] is not None and grads[k].abs().sum() > 0 for k in (0, 2, 3))
    assert all(grads[k] is None or grads[k].abs().sum() == 0 for k in (1, 4))


def test_gate_supervision_loss_is_minus_log_gate_mass_on_the_intended_experts() -> None:
    gates = [torch.full((2, 4, 8, 8), 0.25), torch.full((2, 4, 4, 4), 0.25)]
    out = MoMEOutput([], {}, gates, torch.zeros(()))
    torch.testing.assert_close(gate_supervision_loss(out, torch.tensor([0, 3])), torch.log(torch.tensor(4.0)))
    avail = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expect = -(torch.log(torch.tensor(0.5)) + 0.0) / 2  # mass 0.5 and 1.0
    torch.testing.assert_close(gate_supervision_loss(out, available=avail), expect)
    sharp = [torch.zeros_like(g).index_fill_(1, torch.tensor([2]), 1.0) for g in gates]
    out_sharp = MoMEOutput([], {}, sharp, torch.zeros(()))
    assert gate_supervision_loss(out_sharp, torch.tensor([2, 2])).item() == pytest.approx(0.0, abs=1e-6)
    # sparse: a sample whose own expert was not selected has no target
    out_sparse = MoMEOutput([], {}, sharp, torch.zeros(()), selected=torch.tensor([[2, 1], [2, 1]]))
    assert gate_supervision_loss(out_sparse, torch.tensor([2, 0])).item() == pytest.approx(0.0, abs=1e-6)
    assert gate_supervision_loss(out_sparse, torch.tensor([0, 3])) is None
    assert gate_supervision_loss(out) is None


def test_gate_supervision_teaches_the_gate_to_infer_the_modality() -> None:
    """Two 'modalities' told apart only by their contrast (lesion bright vs dark): with the gate term the
    gate learns to weight each image's own expert, without it (fused loss only, same steps) it does not
    prefer the own expert as much. The modality is never passed to the model."""
    x = torch.randn(8, 1, 16, 16) * 0.1
    y = torch.zeros(8, 1, 16, 16)
    y[:, :, 4:10, 5:11] = 1
    mod = torch.tensor([0, 1] * 4)
    x[mod == 0] += 1.0 + 2.0 * y[mod == 0]  # modality a: bright background, brighter lesion
    x[mod == 1] -= 1.0 + 2.0 * y[mod == 1]  # modality b: dark background, darker lesion
    share = {}
    for weight in (0.0, 1.0):
        m = _mome(modalities=("a", "b"))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(60):
            loss, _ = mome_loss(m(x), y, mod, 0.5, gate_weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            g = m.eval()(x).gates[0].mean((2, 3))
        share[weight] = g[torch.arange(8), mod].mean().item()
    assert share[1.0] > 0.7 and share[1.0] > share[0.0] + 0.2  # measured 0.76 vs 0.50


def test_sparse_gate_skips_the_zero_stems_of_experts_that_did_not_run() -> None:
    """The sparse gate convolves only the image, availability and the selected experts' stems; the result
    equals the gate run on the full input with zero stems for the others."""
    m = _mome(multimodal=True, top_k=2).eval()
    calls = []
    gate_forward = m.gate.forward
    m.gate.forward = lambda inp, channels=None: calls.append((inp, channels)) or gate_forward(inp, channels)
    with torch.no_grad():
        m(torch.randn(1, 5, 32, 32), torch.tensor([[1, 1, 0, 1, 0]]))
        ((inp, channels),) = calls
        w0 = m.experts[0].stem_channels
        assert inp.shape[1] == 5 + 5 + 2 * w0 and len(channels) == inp.shape[1]
        full = torch.zeros(1, 5 + 5 + 5 * w0, 32, 32)
        full[:, channels] = inp
        for a, b in zip(gate_forward(inp, channels), gate_forward(full), strict=True):
            torch.testing.assert_close(a, b)


def test_sparse_case_output_does_not_depend_on_its_batch() -> None:
    """A case batched with another that picks other experts gets the same output as alone: the experts only
    the other case picked must look like experts that did not run (zero stems) to this case's gate."""
    m = _mome(multimodal=True, top_k=2).eval()
    with torch.no_grad():
        torch.manual_seed(2)  # a decisive router, so different cases pick different experts
        torch.nn.init.normal_(m.router.proj.weight, std=5.0)
        m.router.proj.bias.zero_()
    torch.manual_seed(1)
    xs = torch.randn(8, 5, 32, 32)
    avail = torch.ones(8, 5)
    with torch.no_grad():
        sel = m(xs, avail).selected
        a, b = next((i, j) for i in range(8) for j in range(8) if set(sel[i].tolist()) != set(sel[j].tolist()))
        alone = m(xs[a : a + 1], avail[:1])
        paired = m(xs[[a, b]], avail[:2])
    assert paired.selected[0].tolist() == alone.selected[0].tolist()
    for s in range(len(alone.logits)):
        torch.testing.assert_close(paired.logits[s][:1], alone.logits[s], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(paired.gates[s][:1], alone.gates[s], atol=1e-5, rtol=1e-5)


def test_curriculum_schedules() -> None:
    assert curriculum_weight(0, 10) == 1.0 and curriculum_weight(10, 10) == 0.0
    assert curriculum_weight(5, 10) == pytest.approx(0.25)
    assert curriculum_weight(5, 10, "linear") == pytest.approx(0.5)
    assert curriculum_weight(7, 10, "constant") == pytest.approx(0.2)
    with pytest.raises(ConfigError):
        curriculum_weight(1, 10, "cosine")
    assert sum(deep_supervision_weights(4)) == pytest.approx(1.0)


def test_mome_learns_a_toy_segmentation() -> None:
    """A few Adam steps on bright squares must reduce the curriculum loss substantially."""
    torch.manual_seed(0)
    m = _mome(modalities=("a", "b"))
    x = torch.randn(4, 1, 16, 16) * 0.1
    y = torch.zeros(4, 1, 16, 16)
    x[:, :, 4:9, 5:11] += 2.0
    y[:, :, 4:9, 5:11] = 1
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    mod = torch.tensor([0, 1, 0, 1])
    first = None
    for step in range(30):
        loss, _ = mome_loss(m(x), y, mod, curriculum_weight(step, 30))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_registry_roundtrip_and_presets(tmp_path) -> None:
    m = _mome(multimodal=True, top_k=1)
    save_model(m, tmp_path / "m", {"family": "mome"})
    m2, meta = load_model(tmp_path / "m")
    x = torch.randn(1, 5, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x).logits[0], m2(x).logits[0])
    assert meta["architecture"] == "mome_tiny"
    unet = create_model("unet_tiny", spatial_dims=2)
    assert [t.shape[1] for t in unet(torch.randn(1, 1, 16, 16))] == [2, 2]
    with pytest.raises(ConfigError):
        create_model("mome_tiny", top_k=9)


@pytest.mark.parametrize("multimodal", [False, True])
def test_top1_softmax_gate_passes_the_fused_loss_gradient_to_the_router(multimodal: bool) -> None:
    """top_k=1 with the (default) softmax gate: softmax(g + log w) with every other expert at log(1e-9) is
    saturated, so the fused loss gave the router exactly zero gradient and it learnt from the balance loss
    alone. The straight-through factor must carry the task gradient without changing the gate's value
    (the selected expert's gate stays 1, the fused logits stay that expert's)."""
    m = _mome(multimodal=multimodal, top_k=1, balance_coef=0.0)
    x = torch.randn(2, 5 if multimodal else 1, 32, 32)
    y = torch.zeros(2, 1, 32, 32)
    y[:, :, 8:16, 8:16] = 1
    out = m(x, torch.ones(2, 5) if multimodal else None)
    for b, k in enumerate(out.selected[:, 0].tolist()):
        torch.testing.assert_close(out.gates[0][b, k], torch.ones_like(out.gates[0][b, k]))
        torch.testing.assert_close(out.logits[0][b], out.expert_logits[k][0][b])
    loss, _ = mome_loss(out, y, None, 0.0)  # fused loss only; balance_coef=0: no aux gradient either
    loss.backward()
    params = [*m.router.parameters(), *m.router_encoder.parameters()]
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0


def test_sparse_expert_loss_is_the_mean_over_the_pairs_that_ran() -> None:
    """Sparse MoME / MoME+: a (sample, expert) pair whose expert was not selected contributes no expert
    term, so it must not count in the denominator either (it diluted the term by k/#intended, i.e. changed
    the effective curriculum weight). Here only expert 0 ran."""
    torch.manual_seed(0)
    B, E, S = 2, 3, 8
    target = torch.zeros(B, 1, S, S)
    target[:, :, 2:5, 2:5] = 1
    lg0 = [torch.randn(B, 2, S, S), torch.randn(B, 2, S // 2, S // 2)]
    gates = [torch.full((B, E, S, S), 1 / E), torch.full((B, E, S // 2, S // 2), 1 / E)]
    out = MoMEOutput(lg0, {0: lg0}, gates, torch.zeros(()), selected=torch.tensor([[0], [0]]))
    # MoME: sample 1 is a modality-1 image, its own expert did not run → the term is sample 0's alone
    _, logs = mome_loss(out, target, torch.tensor([0, 1]), expert_weight=1.0)
    only = deep_supervised_loss([t[:1] for t in lg0], target[:1])
    assert logs["loss_expert"] == pytest.approx(float(only), rel=1e-5)
    # MoME+: three present modalities each, one expert ran → expert 0's loss on both samples
    _, logs = mome_loss(out, target, None, 1.0, available=torch.ones(B, E))
    assert logs["loss_expert"] == pytest.approx(float(deep_supervised_loss(lg0, target)), rel=1e-5)
    # expert 0 ran because sample 0 picked it; sample 1 (modality 0 too) picked expert 2: its term is absent
    out.selected = torch.tensor([[0], [2]])
    out.expert_logits = {0: lg0, 2: lg0}
    _, logs = mome_loss(out, target, torch.tensor([0, 0]), expert_weight=1.0)
    assert logs["loss_expert"] == pytest.approx(float(only), rel=1e-5)
