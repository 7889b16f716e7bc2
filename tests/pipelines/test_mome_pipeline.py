"""MoME data path: patch sampling, foreground oversampling, augmentation, MoME+ modality dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuromoe.data.lesion import LesionPatchDataset, sample_patch
from neuromoe.errors import ConfigError, ModelFormatError
from neuromoe.models import create_model
from neuromoe.models.mome import mome_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _cases(n: int = 3, shape=(24, 24, 24)) -> list[dict]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        mask = np.zeros(shape, np.uint8)
        mask[10:13, 10:13, 10:13] = 1
        images = {
            m: (rng.normal(size=shape) * 0.1 + mask * (1 + j)).astype(np.float32)
            for j, m in enumerate(("t1", "flair", "dwi"))
            if not (i == 0 and m == "dwi")
        }
        cases.append({"images": images, "mask": mask, "meta": {"subject": f"s{i}"}})
    return cases


def test_foreground_oversampling_rate_is_about_one_third() -> None:
    case = _cases(1, shape=(48, 48, 48))[0]
    rng = np.random.default_rng(1)
    hits = [
        sample_patch(case["images"]["t1"][None], case["mask"], (8, 8, 8), rng)[1].any() for _ in range(300)
    ]
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
    ds = LesionPatchDataset(
        _cases(),
        (16, 16, 16),
        modalities=("t1", "flair", "dwi"),
        multimodal=True,
        modality_dropout=0.7,
        samples_per_epoch=30,
        augment=True,
    )
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
    import pandas as pd

    from neuromoe.engine import TrainConfig
    from neuromoe.pipelines.mome import MoMETrainer, evaluate_cases, predict_volume

    mods = ("t1", "flair", "dwi")
    cases = _cases(3, shape=(16, 16, 16))
    ds = LesionPatchDataset(cases, (16, 16, 16), modalities=mods, fg_fraction=1.0, samples_per_epoch=8)
    torch.manual_seed(0)
    model = create_model("mome_tiny", modalities=mods)
    cfg = TrainConfig(
        epochs=6,
        batch_size=4,
        lr=1e-2,
        weight_decay=0.0,
        device="cpu",
        progress=False,
        val_every=100,
        warmup_frac=0.0,
    )
    MoMETrainer(model, cfg, ds, run_dir=tmp_path / "run").fit()
    table = evaluate_cases(model, cases, mods, (16, 16, 16))
    assert len(table) == 8 and {"dice", "hd95", "lesion_f1", "abs_volume_diff_ml", "gate_t1"} <= set(
        table.columns
    )
    assert table["dice"].mean() > 0.5  # bright 3³ cubes are learnable in a few steps
    np.testing.assert_allclose(table[["gate_t1", "gate_flair", "gate_dwi"]].sum(1), 1.0, rtol=1e-4)
    pred = predict_volume(model, cases[1]["images"]["t1"][None], (16, 16, 16), tta=True)
    assert pred.prob.shape == (16, 16, 16) and pred.prob.min() >= 0.0 and pred.prob.max() <= 1.0
    assert pred.gate.shape == (3, 16, 16, 16) and pred.expert_prob.shape == (3, 16, 16, 16)
    # every expert is its own U-Net: alone each segments the cube too (expert_dice_* columns)
    assert table[["expert_dice_t1", "expert_dice_flair", "expert_dice_dwi"]].notna().all().all()
    # the gate-supervision term reaches the trainer's loss and log
    cfg.epochs = 1
    MoMETrainer(model, cfg, ds, run_dir=tmp_path / "gate", gate_weight=0.5).fit()
    assert pd.read_csv(tmp_path / "gate" / "metrics.csv")["train_loss_gate"].notna().any()


def _mini_cohort(root, n: int = 6, shape=(24, 28, 24)) -> None:
    """T1 (dark lesion) / FLAIR (bright lesion) cases at 6 mm with a manifest like ``neuromoe synth`` writes."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    affine[:3, 3] = [-72, -90, -72]
    rows = ["subject,t1,flair,mask,lesion_type,dataset,split"]
    for i in range(n):
        mask = np.zeros(shape, np.uint8)
        c = rng.integers(6, 16, 3)
        mask[c[0] : c[0] + 4, c[1] : c[1] + 4, c[2] : c[2] + 3] = 1
        brain = 1.0 + 0.1 * rng.normal(size=shape)
        sub = f"sub-{i:02d}"
        (root / sub).mkdir(parents=True)
        nib.save(
            nib.Nifti1Image((brain - 0.6 * mask).astype(np.float32), affine), str(root / sub / "t1.nii.gz")
        )
        has_flair = i % 2 == 0
        if has_flair:
            flair = (brain + 0.8 * mask).astype(np.float32)
            nib.save(nib.Nifti1Image(flair, affine), str(root / sub / "flair.nii.gz"))
        nib.save(nib.Nifti1Image(mask, affine), str(root / sub / "mask.nii.gz"))
        split = ["train"] * 4 + ["val", "test"]
        rows.append(
            f"{sub},../{sub}/t1.nii.gz,{f'../{sub}/flair.nii.gz' if has_flair else ''},"
            f"../{sub}/mask.nii.gz,{['ms', 'wmh'][i % 2]},{['msseg', 'wmh'][i % 2]},{split[i]}"
        )
    (root / "manifests").mkdir()
    (root / "manifests" / "lesion.csv").write_text("\n".join(rows) + "\n")


def test_demo_pretrain_train_evaluate_segment_on_a_small_cohort(tmp_path) -> None:
    import json

    import nibabel as nib

    from neuromoe.eval.report import load_section
    from neuromoe.pipelines import mome

    _mini_cohort(tmp_path / "cohort")
    run = mome.demo(tmp_path / "cohort", tmp_path / "demo", device="cpu", preset="tiny")
    section = load_section(run)
    kinds = [item["kind"] for item in section.items]
    assert kinds.count("figure") == 1 and kinds.count("table") >= 4
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert {"by_modality", "by_lesion_type", "by_dataset", "expert_dice"} <= set(metrics)
    assert metrics["n_cases"] == 1 and metrics["n_predictions"] == 1  # the test case has T1 only
    assert 0.0 <= metrics["mean"]["dice"] <= 1.0
    cfg = json.loads((run / "train" / "model" / "config.json").read_text())
    assert cfg["preprocessing"]["spacing"] == [6.0, 6.0, 6.0]
    # stage-1 experts exist for the modalities with training images and were copied into the MoME
    assert cfg["extra"]["experts_loaded"] == ["t1", "flair"]
    assert cfg["extra"]["precision"] == "fp32"  # the `tiny` config's inference precision, stored
    # a stage-1 expert evaluates alone on the cases that have its modality (train cases 0 and 2 have FLAIR)
    ev = mome.evaluate(
        run / "experts" / "experts" / "flair",
        tmp_path / "cohort",
        tmp_path / "ev",
        split="train",
        device="cpu",
        n_overlays=0,
    )
    flair_only = json.loads((ev / "metrics.json").read_text())
    assert flair_only["n_predictions"] == 2 and set(flair_only["by_modality"]) == {"flair"}
    t1 = tmp_path / "cohort" / "sub-00" / "t1.nii.gz"
    sidecars, failures = mome.segment(
        run / "train" / "model", {"t1": t1}, tmp_path / "m.nii.gz", device="cpu"
    )
    assert not failures and nib.load(str(tmp_path / "m.nii.gz")).shape == (24, 28, 24)
    assert sidecars[0]["lesion_volume_ml"] >= 0 and len(sidecars[0]["gate_share"]) == 5
    assert sidecars[0]["precision"] == "fp32"
    bf16, _ = mome.segment(
        run / "train" / "model", {"t1": t1}, tmp_path / "b.nii.gz", device="cpu", precision="bf16"
    )
    assert bf16[0]["precision"] == "bf16" and nib.load(str(tmp_path / "b.nii.gz")).shape == (24, 28, 24)
    # experts trained with the logit-skip heads (the default) do not load silently into plain-head MoME
    plain = mome.load_mome_config("tiny", ["model.logit_skip=false"], seed=0, device="cpu")
    with pytest.raises(ModelFormatError, match="logit_skip"):
        mome.train(tmp_path / "cohort", tmp_path / "plain", plain, experts=run / "experts")
    assert not (tmp_path / "plain" / "model").exists()
    raw = mome.load_mome_config("tiny", ["gate_supervision=1", "model.gate_norm=raw"], device="cpu")
    with pytest.raises(ConfigError, match="gate_supervision"):
        mome.train(tmp_path / "cohort", tmp_path / "raw", raw, experts=run / "experts")
    assert not (tmp_path / "raw").exists()


def test_stage1_fixed_patches_per_expert_gives_every_expert_the_same_steps(tmp_path) -> None:
    """``data.expert_samples_per_epoch``: an expert with few images (here FLAIR, 2 of 4 train cases) gets as
    many optimiser steps as one with many (T1, 4 cases), nnU-Net style."""
    import pandas as pd

    from neuromoe.pipelines import mome

    _mini_cohort(tmp_path / "cohort")
    cfg = mome.load_mome_config("tiny", ["data.expert_samples_per_epoch=12"], device="cpu")
    cfg.cache_dir = str(tmp_path / "cache")
    run = mome.pretrain(tmp_path / "cohort", tmp_path / "exp", cfg)
    steps = {m: pd.read_csv(run / "stage1" / m / "metrics.csv")["step"].max() for m in ("t1", "flair")}
    assert steps == {"t1": 3, "flair": 3}  # 12 patches / batch 4, one epoch


class _FixedProbability(torch.nn.Module):
    """'Segmenter' whose lesion probability is the image itself (one scale)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p = x.clamp(1e-4, 1 - 1e-4)
        return [torch.cat([torch.zeros_like(p), torch.logit(p)], 1)]


def test_threshold_is_tuned_on_whole_validation_volumes(tmp_path) -> None:
    """Lesion voxels at p = 0.4 and background at 0.1: 0.5 finds nothing, the threshold tuned on the
    validation volumes lies in [0.1, 0.4) and finds the lesion exactly; it is used only when asked for.
    The validation patches still log their Dice (best candidate and at 0.5)."""
    from neuromoe.engine import TrainConfig
    from neuromoe.pipelines.mome import EvalSection, MoMETrainer

    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[:, :, 2:5, 2:5, 2:5] = 1
    batch = {"image": 0.1 + 0.3 * mask, "mask": mask, "modality": torch.zeros(2, dtype=torch.long)}
    trainer = MoMETrainer(
        _FixedProbability(), TrainConfig(device="cpu", progress=False), [], run_dir=tmp_path
    )
    metrics = trainer.validation_end([trainer.validation_step(batch)])
    assert metrics["val_dice"] == 1.0 and metrics["val_dice_p50"] == 0.0
    vol = np.zeros((12, 12, 12), np.float32)
    vol[3:7, 3:7, 3:7] = 1
    case = {"images": {"t1": 0.1 + 0.3 * vol}, "mask": vol, "meta": {}}
    assert trainer.threshold(EvalSection(), [case], ("t1",), (8, 8, 8)) == 0.5
    t = trainer.threshold(EvalSection(tune_threshold=True), [case], ("t1",), (8, 8, 8))
    assert 0.1 <= t < 0.4
    assert trainer.threshold(EvalSection(tune_threshold=True), [], ("t1",), (8, 8, 8)) == 0.5


class _RecordsAutocast(_FixedProbability):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen.append(torch.is_autocast_enabled(x.device.type))
        return super().forward(x)


def test_inference_precision_is_applied_to_threshold_search_and_prediction(tmp_path, cpu_bf16) -> None:
    """``eval.precision`` reaches the sliding-window predictor (the threshold is tuned on the probabilities
    ``evaluate`` will score); an unknown precision is refused; bf16 runs as fp32 on a CPU without it."""
    from neuromoe.engine import TrainConfig
    from neuromoe.pipelines.mome import EvalSection, MoMETrainer, predict_volume

    cpu_bf16("1")
    model = _RecordsAutocast()
    vol = np.zeros((12, 12, 12), np.float32)
    vol[3:7, 3:7, 3:7] = 1
    predict_volume(model, vol[None], (8, 8, 8))
    assert model.seen and not any(model.seen)
    model.seen.clear()
    predict_volume(model, vol[None], (8, 8, 8), precision="bf16")
    assert model.seen and all(model.seen)
    model.seen.clear()
    trainer = MoMETrainer(model, TrainConfig(device="cpu", progress=False), [], run_dir=tmp_path)
    case = {"images": {"t1": 0.1 + 0.3 * vol}, "mask": vol, "meta": {}}
    trainer.threshold(EvalSection(tune_threshold=True, precision="bf16"), [case], ("t1",), (8, 8, 8))
    assert model.seen and all(model.seen)
    with pytest.raises(ConfigError, match="precision"):
        predict_volume(model, vol[None], (8, 8, 8), precision="fp16")
    cpu_bf16("0")
    model.seen.clear()
    predict_volume(model, vol[None], (8, 8, 8), precision="bf16")
    assert model.seen and not any(model.seen)
