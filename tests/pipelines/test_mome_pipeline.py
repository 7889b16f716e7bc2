"""MoME data path: patch sampling, foreground oversampling, augmentation, MoME+ modality dropout."""

from __future__ import annotations

import numpy as np
import torch

from neuromoe.data.lesion import LesionPatchDataset, sample_patch
from neuromoe.models import create_model
from neuromoe.models.mome import mome_loss


def _cases(n: int = 3, shape=(24, 24, 24)) -> list[dict]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        mask = np.zeros(shape, np.uint8)
        mask[10:13, 10:13, 10:13] = 1
        images = {m: (rng.normal(size=shape) * 0.1 + mask * (1 + j)).astype(np.float32)
                  for j, m in enumerate(("t1", "flair", "dwi")) if not (i == 0 and m == "dwi")}
        cases.append({"images": images, "mask": mask, "meta": {"subject": f"s{i}"}})
    return cases


def test_foreground_oversampling_rate_is_about_one_third() -> None:
    case = _cases(1, shape=(48, 48, 48))[0]
    rng = np.random.default_rng(1)
    hits = [sample_patch(case["images"]["t1"][None], case["mask"], (8, 8, 8), rng)[1].any() for _ in range(300)]
    # a uniform 8³ crop of 48³ hits the 3³ lesion with p ≈ 0.015, so the rate is ≈ 1/3 + 2/3·0.015
    assert 0.26 < np.mean(hits) < 0.43


def test_single_modality_items_cover_every_available_pair() -> None:
    ds = LesionPatchDataset(_cases(), (16, 16, 16), modalities=("t1", "flair", "dwi"), augment=True)
    assert len(ds) == 8  # case 0 has no dwi
    item = ds[0]
    assert item["image"].shape == (1, 16, 16, 16) and item["mask"].shape == (1, 16, 16, 16)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(ds[3]["image"], ds[3]["image"])  # deterministic per (seed, epoch, index)


def test_multimodal_dropout_keeps_one_and_zero_fills_missing() -> None:
    ds = LesionPatchDataset(_cases(), (16, 16, 16), modalities=("t1", "flair", "dwi"), multimodal=True,
                            modality_dropout=0.7, samples_per_epoch=30, augment=True)
    for i in range(30):
        item = ds[i]
        assert item["available"].sum() >= 1
        for m in np.flatnonzero(item["available"].numpy() == 0):
            assert torch.all(item["image"][m] == 0)
        if i % 3 == 0:
            assert item["available"][2] == 0  # case 0 never has dwi


def test_items_feed_the_model_and_loss() -> None:
    ds = LesionPatchDataset(_cases(), (16, 16, 16), modalities=("t1", "flair", "dwi"), multimodal=True)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    torch.manual_seed(0)
    m = create_model("mome_tiny", modalities=("t1", "flair", "dwi"), multimodal=True, top_k=2)
    loss, logs = mome_loss(m(batch["image"], batch["available"]), batch["mask"], None, 0.0)
    loss.backward()
    assert np.isfinite(logs["loss"])


def test_trainer_learns_and_evaluation_table_has_metrics_and_gate_shares(tmp_path) -> None:
    from neuromoe.engine import TrainConfig
    from neuromoe.pipelines.mome import MoMETrainer, evaluate_cases, predict_volume

    mods = ("t1", "flair", "dwi")
    cases = _cases(3, shape=(16, 16, 16))
    ds = LesionPatchDataset(cases, (16, 16, 16), modalities=mods, fg_fraction=1.0, samples_per_epoch=8)
    torch.manual_seed(0)
    model = create_model("mome_tiny", modalities=mods)
    cfg = TrainConfig(epochs=6, batch_size=4, lr=1e-2, weight_decay=0.0, device="cpu", progress=False,
                      val_every=100, warmup_frac=0.0)
    MoMETrainer(model, cfg, ds, run_dir=tmp_path / "run").fit()
    table = evaluate_cases(model, cases, mods, (16, 16, 16))
    assert len(table) == 8 and {"dice", "hd95", "lesion_f1", "abs_volume_diff_ml", "gate_t1"} <= set(table.columns)
    assert table["dice"].mean() > 0.5  # bright 3³ cubes are learnable in a few steps
    np.testing.assert_allclose(table[["gate_t1", "gate_flair", "gate_dwi"]].sum(1), 1.0, rtol=1e-4)
    prob, _ = predict_volume(model, cases[1]["images"]["t1"][None], (16, 16, 16), tta=True)
    assert prob.shape == (16, 16, 16) and prob.min() >= 0.0 and prob.max() <= 1.0
