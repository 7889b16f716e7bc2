"""DenseFormer backbone, MAE (no-leak masking) and task-routed multi-task head on tiny random volumes."""

from __future__ import annotations

import pytest
import torch

from neuromoe.models.denseformer import (
    PRESETS,
    DenseFormer,
    DenseFormerMAE,
    DenseFormerMoE,
    layerwise_lr_groups,
    random_masking,
    sincos_pos_embed,
)

TINY = {**PRESETS["tiny"]}
VOLUME = {**TINY, "stem": "volume", "block_layers": (2, 2)}  # stride 2·2·2 = patch 8
STEMS = {"patch": TINY, "volume": VOLUME, "volume_sparse": {**VOLUME, "stem_masking": "sparse"}}
TASKS = [
    {"name": "age", "type": "regression", "num_outputs": 1},
    {"name": "dx_ad", "type": "classification", "num_outputs": 3},
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_backbone_shapes_and_head():
    m = DenseFormer(**TINY, num_outputs=5)
    x = torch.randn(2, 1, 32, 32, 32)
    f = m.forward_features(x)
    assert f.shape == (2, 1 + 64, TINY["embed_dim"])
    assert m.forward_head(f).shape == (2, 5)
    assert m.forward_head(f, pre_logits=True).shape == (2, TINY["embed_dim"])
    with pytest.raises(ValueError, match="preprocess"):
        m(torch.randn(1, 1, 24, 32, 32))


def test_patchify_roundtrip_and_order():
    m = DenseFormer(**TINY)
    x = torch.randn(2, 1, 32, 32, 32)
    p = m.patchify(x)
    assert p.shape == (2, 64, 1, 8, 8, 8)
    torch.testing.assert_close(p[:, 1, 0], x[:, 0, 0:8, 0:8, 8:16])  # row-major: last axis fastest
    torch.testing.assert_close(m.unpatchify(p), x)
    torch.testing.assert_close(m.unpatchify(p.flatten(2)), x)


@pytest.mark.parametrize("stem", ["patch", "volume"])
def test_two_dimensional_variant(stem):
    m = DenseFormer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, init_features=8,
                    growth_rate=4, block_layers=(1, 1), spatial_dims=2, num_outputs=2, stem=stem)
    assert m.forward_features(torch.randn(3, 1, 32, 32)).shape == (3, 1 + 16, 32)
    assert m(torch.randn(3, 1, 32, 32)).shape == (3, 2)
    mae = DenseFormerMAE(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, init_features=8,
                         growth_rate=4, block_layers=(1, 1), spatial_dims=2, stem=stem, decoder_dim=16,
                         decoder_depth=1, decoder_heads=2)
    loss, pred, mask = mae(torch.randn(2, 1, 32, 32))
    assert pred.shape == (2, 16, 64) and mask.sum() == 2 * 12 and loss.ndim == 0


def test_volume_stem_tokens_follow_the_patch_grid():
    """Token i of the volume stem sits at patch i (row-major, last axis fastest): its receptive field crosses
    patch borders but does not reach the opposite side of the 4×4×4 grid."""
    m = DenseFormer(**VOLUME).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    for patch, far, sl in ((3, 48, (slice(0, 8), slice(0, 8), slice(24, 32))),
                           (48, 3, (slice(24, 32), slice(0, 8), slice(0, 8)))):
        x2 = x.clone()
        x2[(0, 0, *sl)] += 5.0
        with torch.no_grad():
            change = (m.embed_patches(x2) - m.embed_patches(x)).abs().sum(-1)[0]
        assert change[patch] > 0 and change[far] == 0
        assert (change > 0).sum() > 1  # neighbours see across the border (a patch-local stem would not)
    with pytest.raises(ValueError, match="patch_size"):
        DenseFormer(**{**VOLUME, "block_layers": (2,)})
    with pytest.raises(ValueError, match="unknown stem"):
        DenseFormer(**{**TINY, "stem": "conv"})


def test_patch_stem_with_a_two_deep_block_gets_right_bf16_gradients():
    """8³ patches → stride 2 → 4³ → transition → 2³: the CPU bf16 weight gradient there needs the guard."""
    from neuromoe.engine.precision import guard_bf16_conv3d

    torch.manual_seed(0)
    m = DenseFormer(**{**TINY, "block_layers": (2, 2)}, num_outputs=1)
    x = torch.randn(2, 1, 32, 32, 32)
    conv = m.stem.features[3].denselayer1.layers.conv2  # the first 3×3×3 conv of the 2³ block

    def grad(bf16: bool) -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            m(x).float().sum().backward()
        return conv.weight.grad.clone()

    ref = grad(False)
    guard_bf16_conv3d(m)
    rel = (grad(True) - ref).abs().max() / ref.abs().max()
    assert rel < 0.1  # bf16 rounding everywhere else; unguarded this is > 1 or inf/NaN


def test_sincos_embedding_distinct_positions():
    e = sincos_pos_embed((4, 4, 4), 48)
    assert e.shape == (64, 48)
    assert torch.cdist(e, e).add(torch.eye(64)).min() > 0.1


def test_random_masking_consistent():
    ids_keep, mask, ids_restore = random_masking(64, 3, 0.75)
    assert ids_keep.shape == (3, 16) and mask.shape == (3, 64)
    assert (mask.sum(1) == 48).all()
    assert (mask.gather(1, ids_keep) == 0).all()
    assert torch.equal(torch.argsort(ids_restore, 1)[:, :16], ids_keep)


@pytest.mark.parametrize("stem", ["patch", "volume", "volume_sparse"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_masked_voxels_do_not_leak_into_visible_tokens(train_mode, stem):
    mae = DenseFormerMAE(**STEMS[stem], decoder_dim=32, decoder_depth=1, decoder_heads=2)
    mae.train(train_mode)
    x = torch.randn(2, 1, 32, 32, 32)
    noise = torch.rand(2, 64)
    latent, mask, _ = mae.forward_encoder(x, noise=noise)
    # change every masked voxel, keep visible ones
    vox_mask = mae.encoder.unpatchify(mask[:, :, None].expand(-1, -1, 512)).bool()
    x2 = torch.where(vox_mask, torch.randn_like(x) * 10, x)
    assert not torch.equal(x, x2)
    latent2, mask2, _ = mae.forward_encoder(x2, noise=noise)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent, latent2, rtol=0, atol=0)
    assert latent.shape == (2, 1 + 16, TINY["embed_dim"])  # encoder saw visible tokens only
    # and a visible voxel change does change them
    x3 = torch.where(vox_mask, x, x + 1.0)
    latent3, _, _ = mae.forward_encoder(x3, noise=noise)
    assert not torch.allclose(latent, latent3)


@pytest.mark.parametrize("train_mode", [False, True])
def test_sparse_stem_without_masked_patches_is_the_dense_stem(train_mode):
    """With every patch visible the sparse path must equal the plain stem, running statistics included."""
    torch.manual_seed(0)
    dense = DenseFormer(**VOLUME)
    sparse = DenseFormer(**STEMS["volume_sparse"])
    sparse.load_state_dict(dense.state_dict())
    dense.train(train_mode)
    sparse.train(train_mode)
    x = torch.randn(2, 1, 32, 32, 32)
    everything = torch.arange(64).expand(2, -1)
    torch.testing.assert_close(sparse.embed_patches(x, everything), dense.embed_patches(x), rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(dense.named_buffers(), sparse.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_masked_batch_norm_matches_autograd_over_visible_voxels():
    """The hand-written backward of the sparse stem's BatchNorm equals autograd of the plain formula."""
    from neuromoe.models.denseformer import _MaskedBatchNorm

    torch.manual_seed(0)
    m = torch.nn.functional.interpolate((torch.rand(3, 1, 3, 3, 3) > 0.6).double(), size=(9, 9, 9))
    x = ((torch.randn(3, 5, 9, 9, 9, dtype=torch.float64) * 2 + 1) * m).requires_grad_()
    w = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 9, 9, 9, dtype=torch.float64)

    def plain():
        n = m.sum()
        mean = (x * m).sum((0, 2, 3, 4), keepdim=True) / n
        var = (((x - mean) * m) ** 2).sum((0, 2, 3, 4), keepdim=True) / n
        y = ((x - mean) / (var + 1e-5).sqrt() * w.view(1, -1, 1, 1, 1) + b.view(1, -1, 1, 1, 1)) * m
        return y, mean.flatten(), var.flatten()

    results = []
    for f in (plain, lambda: _MaskedBatchNorm.apply(x, m, float(m.sum()), w, b, 1e-5)):
        y, mean, var = f()
        grads = torch.autograd.grad((y * g).sum(), (x, w, b))
        results.append((y, mean, var, grads[0] * m, *grads[1:]))
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_sparse_stem_statistics_ignore_masked_patches():
    """BatchNorm sees visible voxels only: a half-masked batch normalises its visible cells to zero mean."""
    torch.manual_seed(0)
    enc = DenseFormer(**STEMS["volume_sparse"]).train()
    x = torch.randn(2, 1, 32, 32, 32) * 3 + 5
    keep = torch.arange(0, 64, 2).expand(2, -1)
    enc.embed_patches(x, keep)
    bn = enc.stem.features[1].denselayer1.layers.norm1  # after the first (strided) conv
    first = enc.stem.features[0]
    grid_keep = torch.zeros(2, 64).scatter_(1, keep, 1.0).view(2, 1, 4, 4, 4)
    m = torch.nn.functional.interpolate(grid_keep, size=(16, 16, 16))
    h = first(x * torch.nn.functional.interpolate(grid_keep, size=(32, 32, 32))) * m
    visible_mean = (h * m).sum((0, 2, 3, 4)) / m.sum()
    expected = 0.9 * torch.zeros_like(visible_mean) + 0.1 * visible_mean  # momentum 0.1 from zero
    torch.testing.assert_close(bn.running_mean, expected.detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="volume stem"):
        DenseFormer(**{**TINY, "stem_masking": "sparse"})


def test_mae_loss_only_on_masked_patches_and_learns():
    mae = DenseFormerMAE(**TINY, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    g = torch.linspace(0, 6.28, 32)
    x = (torch.sin(g)[:, None, None] * torch.cos(2 * g)[None, :, None] + g[None, None] / 6).expand(2, 1, -1, -1, -1)
    loss, pred, mask = mae(x)
    assert pred.shape == (2, 64, 512) and mask.shape == (2, 64) and loss.ndim == 0
    pred2 = pred.detach() + (1 - mask)[..., None] * 100.0  # change only visible predictions
    torch.testing.assert_close(mae.forward_loss(x, pred2, mask), mae.forward_loss(x, pred.detach(), mask))
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    noise = torch.rand(2, 64)
    first = mae(x, noise=noise)[0].item()
    for _ in range(30):
        opt.zero_grad()
        mae(x, noise=noise)[0].backward()
        opt.step()
    assert mae(x, noise=noise)[0].item() < 0.7 * first
    mae.norm_pix_loss = True
    target = mae.target_patches(x)
    torch.testing.assert_close(target.var(-1), torch.ones(2, 64), atol=1e-3, rtol=0)
    masked, recon = mae.reconstruct(x, noise=noise)
    assert masked.shape == recon.shape == x.shape


@pytest.mark.parametrize("head", ["moe", "shared", "separate"])
def test_multitask_heads(head):
    m = DenseFormerMoE(TASKS, head=head, num_experts=4, top_k=2, **TINY)
    out = m(torch.randn(3, 1, 32, 32, 32))
    assert out.outputs["age"].shape == (3, 1) and out.outputs["dx_ad"].shape == (3, 3)
    loss = out.outputs["age"].sum() + out.outputs["dx_ad"].sum() + out.aux_loss
    loss.backward()
    assert m.backbone.stem.proj.weight.grad is not None
    if head == "moe":
        assert out.topk_idx.shape == (2, 3, 2) and out.aux_loss.item() > 0
    else:
        assert out.topk_idx is None and out.aux_loss.item() == 0


@pytest.mark.parametrize("head", ["moe", "shared", "separate"])
def test_task_attention_pool_starts_as_mean_and_learns_to_attend(head, tmp_path):
    """``head_pool="task_attention"`` equals mean pooling at initialisation (zero-initialised read-out), gives
    each task its own feature once trained, survives save/load, and the head accepts (B, T, D)."""
    from neuromoe.models.registry import create_model, load_model, save_model

    kw = dict(tasks=TASKS, head=head, num_experts=4, top_k=2, head_drop=0.0)
    mean = create_model("denseformer_tiny", **kw).eval()
    attn = create_model("denseformer_tiny", head_pool="task_attention", **kw).eval()
    attn.load_state_dict(mean.state_dict(), strict=False)  # same backbone and head; only the pool is new
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        feats = attn.forward_features(x)
        pooled = attn.pool_features(feats)
        assert pooled.shape == (2, len(TASKS), TINY["embed_dim"])
        torch.testing.assert_close(pooled[:, 0], mean.pool_features(feats))
        torch.testing.assert_close(attn(x).outputs["age"], mean(x).outputs["age"])
    opt = torch.optim.SGD(attn.head.pool.parameters(), lr=0.5)
    target = torch.randn(2, 3)
    for _ in range(5):  # only the dx_ad feature is trained: the tasks' features must diverge
        out = attn.train()(x)
        loss = torch.nn.functional.cross_entropy(out.outputs["dx_ad"], target.softmax(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pooled = attn.eval().pool_features(attn.forward_features(x))
    assert not torch.allclose(pooled[:, 0], pooled[:, 1])
    save_model(attn, tmp_path / "model", {"family": "denseformer"})
    loaded, _ = load_model(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).outputs["dx_ad"], attn(x).outputs["dx_ad"])


def test_router_is_task_conditioned():
    """Same features, different task → different routing; the task embedding receives gradient."""
    m = DenseFormerMoE(TASKS, head="moe", num_experts=8, top_k=2, head_drop=0.0, **TINY)
    head = m.head
    x = torch.randn(32, TINY["embed_dim"])
    with torch.no_grad():
        head.task_embed.weight.mul_(20)
    out = head(x)
    assert not torch.equal(out.topk_idx[0], out.topk_idx[1])
    torch.manual_seed(1)
    again = head(x)
    assert torch.equal(out.topk_idx, again.topk_idx)  # deterministic routing in eval-equivalent setting
    (out.outputs["age"].sum() + out.outputs["dx_ad"].sum()).backward()
    assert head.task_embed.weight.grad is not None and head.task_embed.weight.grad.abs().sum() > 0


def test_mae_encoder_loads_into_finetune_backbone_and_lr_decay():
    mae = DenseFormerMAE(**TINY, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    m = DenseFormerMoE(TASKS, head="shared", **TINY)
    missing = m.backbone.load_state_dict(mae.encoder.state_dict(), strict=True)
    assert not missing.missing_keys
    groups = layerwise_lr_groups(m, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    by_layer = {}
    for g in groups:
        for p in g["params"]:
            by_layer[id(p)] = g["lr"]
    assert by_layer[id(m.backbone.stem.proj.weight)] == pytest.approx(1e-3 * 0.5**3)
    assert by_layer[id(m.backbone.blocks[1].mlp[0].weight)] == pytest.approx(1e-3 * 0.5)
    assert by_layer[id(m.head.out["age"].weight)] == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in m.parameters() if p.requires_grad)
    fast_head = {id(p): g["lr"] for g in layerwise_lr_groups(m, 1e-3, 0.05, 0.5, head_lr_scale=10.0)
                 for p in g["params"]}
    assert fast_head[id(m.head.out["age"].weight)] == pytest.approx(1e-2)
    assert fast_head[id(m.head.block.net[0].weight)] == pytest.approx(1e-2)
    assert fast_head[id(m.backbone.norm.weight)] == pytest.approx(1e-3)  # same layer id, not in the head


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance", ["group", {"num_groups": 4}]])
def test_stem_norm_option(spatial_dims, norm):
    """The stem's norm is configurable (YAML-style list spec too); a per-patch norm has no train/eval gap."""
    m = DenseFormer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, init_features=8,
                    growth_rate=4, block_layers=(2,), spatial_dims=spatial_dims, norm=norm)
    kinds = {type(mod).__name__ for mod in m.stem.modules()}
    expected = {"batch": "BatchNorm", "instance": "InstanceNorm", "group": "GroupNorm"}[
        norm if isinstance(norm, str) else norm[0]]
    assert any(k.startswith(expected) for k in kinds)
    assert not any(k.startswith("BatchNorm") for k in kinds) or expected == "BatchNorm"
    x = torch.randn(4, 1, *([16] * spatial_dims))
    with torch.no_grad():
        train_out = m.train()(x)
        eval_out = m.eval()(x)
    if expected == "BatchNorm":  # batch statistics vs running statistics
        assert not torch.allclose(train_out, eval_out, atol=1e-3)
    else:
        torch.testing.assert_close(train_out, eval_out)
        torch.testing.assert_close(m(x[:1]), eval_out[:1], rtol=1e-4, atol=1e-5)  # no batch coupling



def test_stem_option_survives_save_and_load_and_defaults_to_patch(tmp_path):
    """``stem`` is stored in config.json; a model saved without the key (older checkpoints) is a patch stem."""
    from neuromoe.models.registry import create_model, load_model, save_model

    assert create_model("denseformer_tiny", tasks=TASKS, num_experts=4).backbone.stem_type == "patch"
    m = create_model("denseformer_tiny", tasks=TASKS, num_experts=4, stem="volume", block_layers=[2, 2]).eval()
    save_model(m, tmp_path / "model", {"family": "denseformer"})
    loaded, _ = load_model(tmp_path / "model")
    assert loaded.backbone.stem_type == "volume"
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).outputs["age"], m(x).outputs["age"])


def test_norm_option_survives_save_and_load(tmp_path):
    """The norm spec is stored in config.json (as a JSON list) and rebuilds the same model on load."""
    from neuromoe.models.registry import create_model, load_model, save_model

    m = create_model("denseformer_tiny", tasks=TASKS, num_experts=4, norm=["group", {"num_groups": 4}]).eval()
    save_model(m, tmp_path / "model", {"family": "denseformer"})
    loaded, _ = load_model(tmp_path / "model")
    assert any(isinstance(mod, torch.nn.GroupNorm) for mod in loaded.backbone.stem.modules())
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).outputs["age"], m(x).outputs["age"])


def test_random_masking_follows_the_images_device():
    """A fixed noise or a CPU generator with images elsewhere gave CPU indices for CUDA images ("meta" stands
    in for the other device here)."""
    for kw in ({"noise": torch.rand(3, 64)}, {"generator": torch.Generator().manual_seed(0)}):
        ids_keep, mask, ids_restore = random_masking(64, 3, 0.75, device="meta", **kw)
        assert ids_keep.device.type == mask.device.type == ids_restore.device.type == "meta"
