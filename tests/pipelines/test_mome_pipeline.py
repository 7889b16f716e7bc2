"""MoME data path: patch sampling, foreground oversampling, augmentation, MoME+ modality dropout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from neuromoe.data.lesion import LesionPatchDataset, sample_patch
from neuromoe.engine.precision import resolve_precision
from neuromoe.errors import ConfigError, InputError, ModelFormatError
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


def test_bias_field_acts_on_the_raw_scale_of_the_whole_image() -> None:
    """The raw offset is the whole image's (its darkest head voxel), not the patch's; one field for every channel."""
    from neuromoe.data.intensity import RandBiasFieldRaw, raw_offset

    calls: list[tuple[np.ndarray, list[float]]] = []

    class Recorder(RandBiasFieldRaw):
        def __call__(self, img, offset=None, randomize=True):
            calls.append((np.array(img), list(offset)))
            return super().__call__(img, offset, randomize)

    cases = _cases()
    for c in cases:  # z-scored over a head; the darkest voxel in one corner, outside most patches
        for a in c["images"].values():
            a[:2, :2, :2] = a.min() - 3.0
    ds = LesionPatchDataset(cases, (8, 8, 8), modalities=("t1", "flair", "dwi"), multimodal=True,
                            modality_dropout=0.5, augment=True, samples_per_epoch=12)
    ds.bias = Recorder(prob=1.0)
    for i in range(12):
        ds[i]
    patch_offsets_differ = False
    for (img, offsets), i in zip(calls, range(12), strict=True):
        case = cases[i % 3]
        for ch, (m, c) in enumerate(zip(("t1", "flair", "dwi"), offsets, strict=True)):
            if img[ch].any():
                assert c == raw_offset(case["images"][m])
                patch_offsets_differ |= c > raw_offset(img[ch]) + 1.0
            else:
                assert c == 0.0
    assert patch_offsets_differ


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
    # a lesion-free case says nothing of an expert's specialisation (empty vs empty scored 1 for any expert
    # that found nothing): left out of the expert columns, still scored for the fused output
    free = {**cases[0], "mask": np.zeros_like(cases[0]["mask"])}
    row = evaluate_cases(model, [free], mods, (16, 16, 16)).iloc[0]
    assert np.isfinite(row["dice"]) and row[["expert_dice_t1", "expert_dice_flair"]].isna().all()
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
    assert metrics["mean"]["n_hd95"] == int(np.isfinite(metrics["mean"]["hd95"]))
    cfg = json.loads((run / "train" / "model" / "config.json").read_text())
    assert cfg["preprocessing"]["spacing"] == [6.0, 6.0, 6.0]
    # stage-1 experts exist for the modalities with training images and were copied into the MoME
    assert cfg["extra"]["experts_loaded"] == ["t1", "flair"]
    assert cfg["extra"]["precision"] == "fp32"  # the `tiny` config's inference precision, stored
    assert load_section(run / "train").title == "MoME: stage-2 training"  # 'neuromoe report' of the train run
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
    # a test case without its mask: the error says so (it said "no 'test' cases")
    manifest = tmp_path / "cohort" / "manifests" / "lesion.csv"
    table = manifest.read_text().splitlines()
    unmasked = [",".join([*r.split(",")[:3], "", *r.split(",")[4:]]) if r.endswith(",test") else r for r in table]
    (manifest.parent / "unmasked.csv").write_text("\n".join(unmasked) + "\n")
    with pytest.raises(InputError, match="no 'test' case has a lesion mask"):
        mome.evaluate(run / "train" / "model", manifest.parent / "unmasked.csv", tmp_path / "ev0", device="cpu")
    # a second 'test' row without its mask is named as not scored, not dropped in silence
    two = [(",".join([*r.split(",")[:3], "", *r.split(",")[4:6], "test"]) if r.startswith("sub-04") else r)
           for r in table]
    (manifest.parent / "two.csv").write_text("\n".join(two) + "\n")
    ev = mome.evaluate(run / "train" / "model", manifest.parent / "two.csv", tmp_path / "ev2", device="cpu",
                       n_overlays=0)
    assert json.loads((ev / "metrics.json").read_text())["skipped"] == {"sub-04": "no lesion mask"}
    # the same cases in another order without their split column: a split drawn anew is refused when its
    # 'test' cases include fitted ones (one lesion type: a stratum big enough for a test case)
    rows = manifest.read_text().splitlines()
    header = rows[0].split(",")
    drop = header.index("split")
    shuffled = [",".join(c for j, c in enumerate(r.split(",")) if j != drop) for r in [rows[0], *rows[:0:-1]]]
    (manifest.parent / "nosplit.csv").write_text("\n".join(shuffled).replace(",ms,msseg", ",wmh,wmh") + "\n")
    with pytest.raises(InputError, match="used to train or tune"):
        mome.evaluate(run / "train" / "model", manifest.parent / "nosplit.csv", tmp_path / "ev_ns", device="cpu")
    # a lesion outside the training shape's central window is scored whole (the crop cut it out of the truth)
    big = np.zeros((24, 48, 24), np.float32) + 1.0
    lesion = np.zeros(big.shape, np.uint8)
    lesion[10:14, 41:45, 10:13] = 1
    aff = np.diag([6.0, 6.0, 6.0, 1.0])
    (tmp_path / "edge").mkdir()
    nib.save(nib.Nifti1Image(big - 0.6 * lesion, aff), str(tmp_path / "edge" / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(lesion, aff), str(tmp_path / "edge" / "mask.nii.gz"))
    (tmp_path / "edge" / "m.csv").write_text("subject,t1,mask,lesion_type,dataset,split\n"
                                             "sub-e,t1.nii.gz,mask.nii.gz,wmh,wmh,test\n")
    ev = mome.evaluate(run / "train" / "model", tmp_path / "edge" / "m.csv", tmp_path / "ev_edge", device="cpu",
                       n_overlays=0)
    per_case = pd.read_csv(ev / "per_case.csv")
    assert per_case["volume_gt_ml"].iloc[0] == pytest.approx(48 * 0.216)
    # a lesion-free case (healthy control) is scored, not refused as an "all zeros" image
    nib.save(nib.Nifti1Image(np.zeros(big.shape, np.uint8), aff), str(tmp_path / "edge" / "empty.nii.gz"))
    (tmp_path / "edge" / "e.csv").write_text("subject,t1,mask,lesion_type,dataset,split\n"
                                             "sub-h,t1.nii.gz,empty.nii.gz,wmh,wmh,test\n")
    ev = mome.evaluate(run / "train" / "model", tmp_path / "edge" / "e.csv", tmp_path / "ev_free", device="cpu",
                       n_overlays=0)
    assert pd.read_csv(ev / "per_case.csv")["volume_gt_ml"].iloc[0] == 0
    t1 = tmp_path / "cohort" / "sub-00" / "t1.nii.gz"
    sidecars, failures = mome.segment(
        run / "train" / "model", {"t1": t1}, tmp_path / "m.nii.gz", device="cpu"
    )
    assert not failures and nib.load(str(tmp_path / "m.nii.gz")).shape == (24, 28, 24)
    # the cohort has no T1c/T2/DWI: no random-weight experts for them take a share of the fusion
    assert sidecars[0]["lesion_volume_ml"] >= 0 and list(sidecars[0]["gate_share"]) == ["t1", "flair"]
    assert cfg["extra"]["modalities"] == ["t1", "flair"]
    assert sidecars[0]["precision"] == "fp32"
    bf16, _ = mome.segment(
        run / "train" / "model", {"t1": t1}, tmp_path / "b.nii.gz", device="cpu", precision="bf16"
    )
    assert bf16[0]["precision"] == resolve_precision("bf16", torch.device("cpu"))  # what ran
    assert nib.load(str(tmp_path / "b.nii.gz")).shape == (24, 28, 24)
    # experts trained with the logit-skip heads (the default) do not load silently into plain-head MoME
    plain = mome.load_mome_config("tiny", ["model.logit_skip=false"], seed=0, device="cpu")
    with pytest.raises(ModelFormatError, match="logit_skip"):
        mome.train(tmp_path / "cohort", tmp_path / "plain", plain, experts=run / "experts")
    assert not (tmp_path / "plain" / "model").exists()
    raw = mome.load_mome_config("tiny", ["gate_supervision=1", "model.gate_norm=raw"], device="cpu")
    with pytest.raises(ConfigError, match="gate_supervision"):
        mome.train(tmp_path / "cohort", tmp_path / "raw", raw, experts=run / "experts")
    assert not (tmp_path / "raw").exists()


def test_stage1_fixed_patches_per_expert_gives_every_expert_the_same_steps(tmp_path, monkeypatch, cpu_bf16) -> None:
    """``data.expert_samples_per_epoch``: an expert with few images (here FLAIR, 2 of 4 train cases) gets as
    many optimiser steps as one with many (T1, 4 cases), nnU-Net style. Each expert's threshold is tuned
    before it is moved to the CPU for saving (on CUDA the search would feed GPU inputs to a CPU model), and
    the model stores the precision that tuned it (bf16 asked for ran as fp32 on this CPU: a machine with
    native bf16 would otherwise run the shipped model in bf16 and move its masks)."""
    import pandas as pd

    from neuromoe.pipelines import mome

    events: list[str] = []
    tune, to_cpu = mome.MoMETrainer.threshold, torch.nn.Module.cpu
    monkeypatch.setattr(mome.MoMETrainer, "threshold", lambda self, *a, **k: (events.append("tune"),
                                                                              tune(self, *a, **k))[1])
    monkeypatch.setattr(torch.nn.Module, "cpu", lambda self: (events.append("cpu"), to_cpu(self))[1])
    _mini_cohort(tmp_path / "cohort")
    cfg = mome.load_mome_config("tiny", ["data.expert_samples_per_epoch=12", "eval.precision=bf16"], device="cpu")
    cfg.cache_dir = str(tmp_path / "cache")
    cpu_bf16("0")
    run = mome.pretrain(tmp_path / "cohort", tmp_path / "exp", cfg)
    assert events == ["tune", "cpu"] * 2
    for m in ("t1", "flair"):
        assert json.loads((run / "experts" / m / "config.json").read_text())["extra"]["precision"] == "fp32"
    steps = {m: pd.read_csv(run / "stage1" / m / "metrics.csv")["step"].max() for m in ("t1", "flair")}
    assert steps == {"t1": 3, "flair": 3}  # 12 patches / batch 4, one epoch
    from neuromoe.eval.report import build_report, load_section

    section = load_section(run)  # 'neuromoe report' of a stage-1 run (it said "nothing to report")
    assert section.title == "MoME: stage-1 modality experts"
    table = next(i for i in section.items if i["kind"] == "table")
    rows = [dict(zip(table["columns"], r)) for r in table["rows"]]
    assert [(r["expert"], r["train images"]) for r in rows] == [("t1", "4"), ("flair", "2")]
    assert sum(i["kind"] == "figure" for i in section.items) == 2
    assert "stage-1 modality experts" in build_report([run], tmp_path / "r.html").read_text()


def test_stage1_shared_warm_start_starts_every_expert_from_the_pooled_unet(tmp_path) -> None:
    """``data.shared_samples_per_epoch``: one U-Net is trained first on both modalities' images, saved as a pooled
    U-Net that ``segment`` takes, and every expert starts from its weights (at a negligible learning rate each
    expert ends where the shared U-Net did; without the warm start the experts start from different weights)."""
    import pandas as pd

    from neuromoe.pipelines import mome

    _mini_cohort(tmp_path / "cohort")
    sets = ["data.shared_samples_per_epoch=8", "data.expert_samples_per_epoch=4", "pretrain.lr=1e-9"]
    for name, overrides in (("warm", sets), ("cold", sets[1:])):
        cfg = mome.load_mome_config("tiny", overrides, device="cpu")
        cfg.cache_dir = str(tmp_path / "cache")
        mome.pretrain(tmp_path / "cohort", tmp_path / name, cfg)
    shared, meta = mome._load(tmp_path / "warm" / "shared")
    assert meta["extra"]["kind"] == "unet" and meta["extra"]["modalities"] == ["t1", "flair"]
    assert pd.read_csv(tmp_path / "warm" / "stage1" / "shared" / "metrics.csv")["step"].max() == 2  # 8 / batch 4
    rows = json.loads((tmp_path / "warm" / "experts" / "summary.json").read_text())
    assert [(r["expert"], r["train images"]) for r in rows] == [("shared", 6), ("t1", 4), ("flair", 2)]
    assert not (tmp_path / "cold" / "shared").exists()
    for run, same in (("warm", True), ("cold", False)):
        t1, _ = mome._load(tmp_path / run / "experts" / "t1")
        flair, _ = mome._load(tmp_path / run / "experts" / "flair")
        for k, v in t1.state_dict().items():
            if v.ndim >= 2:  # conv weights (norm scales start at one either way)
                assert torch.allclose(v, flair.state_dict()[k], atol=1e-6) == same, (run, k)
            if same:
                assert torch.allclose(v, shared.state_dict()[k], atol=1e-6), k


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
    from neuromoe.pipelines.mome import VAL_METRICS, EvalSection, MoMETrainer

    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[:, :, 2:5, 2:5, 2:5] = 1
    batch = {"image": 0.1 + 0.3 * mask, "mask": mask, "modality": torch.zeros(2, dtype=torch.long)}
    trainer = MoMETrainer(
        _FixedProbability(), TrainConfig(device="cpu", progress=False), [], run_dir=tmp_path
    )
    metrics = trainer.validation_end([trainer.validation_step(batch)])
    assert metrics["val_dice"] == 1.0 and metrics["val_dice_p50"] == 0.0
    assert set(metrics) == set(VAL_METRICS)  # the names train.monitor is checked against at config load
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


def test_segment_with_registration_maps_the_mask_back_through_the_registered_affine(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``preprocessing.register``: the model grid lives in the registered (MNI) world, so the mask must go
    back onto the input grid through the registered input affine; through the native one it landed off by
    the registration. ``register_to_mni`` is stood in for by a +6 mm x-shift of the world, which leaves the
    model grid's content unchanged, so the mask must be the unregistered one (the model's probability is
    the z-scored image: the mask is the bright cube)."""
    import nibabel as nib

    import neuromoe.data.registration as registration
    from neuromoe.data.preprocess import PreprocSpec
    from neuromoe.pipelines import mome

    def shifted(image: Any, **_: object) -> np.ndarray:
        t = np.eye(4)
        t[0, 3] = 6.0
        return t @ image.affine

    monkeypatch.setattr(registration, "register_to_mni", shifted)
    data = (100 + 5 * np.random.default_rng(0).normal(size=(32, 32, 32))).astype(np.float32)
    truth = np.zeros(data.shape, bool)
    truth[13:21, 13:21, 13:21] = True
    data[truth] = 400
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t1.nii.gz"))
    masks: dict[bool, np.ndarray] = {}
    probs: dict[bool, np.ndarray] = {}
    for register in (False, True):
        spec = PreprocSpec(spacing=(2.0, 2.0, 2.0), shape=None, antialias=False, register=register)
        extra = {"kind": "unet", "modalities": ["t1"], "patch_size": [16, 16, 16], "multimodal": False}
        meta = {"family": "mome", "preprocessing": spec.to_dict(), "extra": {**extra, "threshold": 0.5}}
        monkeypatch.setattr(mome, "_load", lambda _, meta=meta: (_FixedProbability().eval(), meta))
        out = tmp_path / f"mask_{register}.nii.gz"
        mome.segment("model", {"t1": tmp_path / "t1.nii.gz"}, out, probabilities=True, device="cpu")
        masks[register] = np.asarray(nib.load(str(out)).dataobj) > 0
        probs[register] = nib.load(str(tmp_path / f"mask_{register}_prob.nii.gz")).get_fdata() > 0.5
    assert 2 * (masks[False] & truth).sum() / (masks[False].sum() + truth.sum()) > 0.8
    np.testing.assert_array_equal(masks[True], masks[False])  # was 6 voxels off along x
    np.testing.assert_array_equal(probs[True], probs[False])


def test_evaluate_scores_the_test_split_of_the_seed_the_model_was_trained_with(tmp_path, capsys) -> None:
    """Without a ``split`` column the split is drawn from the seed: ``train --seed 1`` must store it and
    ``evaluate`` (no seed given) must re-draw the same split, not seed 0's, whose test cases include
    training cases of this model."""
    import json

    import pandas as pd

    from neuromoe.data.splits import assign_splits
    from neuromoe.pipelines import mome

    root = tmp_path / "cohort"
    _mini_cohort(root)
    manifest = root / "manifests" / "lesion.csv"
    table = pd.read_csv(manifest).drop(columns=["split", "lesion_type"])  # one stratum: 1 test case
    table.insert(1, "session", "ses-2")  # per_case.csv rows say which visit they score
    table.to_csv(manifest, index=False)
    split = {s: assign_splits(table, seed=s, stratify=("lesion_type",)) for s in (0, 1)}
    trained_on = set(table["subject"][split[1] == "train"])
    seed0_test = set(table["subject"][split[0] == "test"])
    assert seed0_test & trained_on  # what evaluate used to score: the test would be vacuous otherwise
    cfg = mome.load_mome_config(
        "tiny",
        ["model.modalities=[t1,flair]", "train.max_steps=1", "eval.tune_threshold=false"],
        seed=1,
        device="cpu",
    )
    cfg.cache_dir = str(tmp_path / "cache")
    run = mome.train(manifest, tmp_path / "run", cfg)
    assert json.loads((run / "model" / "config.json").read_text())["extra"]["split_seed"] == 1
    ev = mome.evaluate(run / "model", manifest, tmp_path / "ev", device="cpu", n_overlays=0,
                       cache_dir=cfg.cache_dir)
    per_case = pd.read_csv(ev / "per_case.csv")
    scored = set(per_case["subject"])
    assert scored == set(table["subject"][split[1] == "test"]) and not scored & trained_on
    assert "has no split column: scoring the 1 of 6 cases" in capsys.readouterr().err  # not a silent cut
    assert (per_case["session"] == "ses-2").all()
    # an external cohort is scored whole with split="all" (here: the unseen test case and a copy of it under
    # another name); fitted cases among the rows are still refused
    import shutil

    external = table[split[1] == "test"].copy()
    copy = external.assign(subject="ext-2")
    (root / "ext-2").mkdir()
    for col in ("t1", "flair", "mask"):
        if isinstance(name := copy[col].iloc[0], str):
            shutil.copy(root / "manifests" / name, root / "ext-2" / Path(name).name)
            copy[col] = f"../ext-2/{Path(name).name}"
    # the external table's own split column (one blank cell) means nothing to --split all
    pd.concat([external, copy]).assign(split=["test", ""]).to_csv(root / "manifests" / "external.csv", index=False)
    ev = mome.evaluate(run / "model", root / "manifests" / "external.csv", tmp_path / "ev_all", split="all", device="cpu",
                       n_overlays=0, cache_dir=cfg.cache_dir)
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["split"] == "all" and metrics["n_cases"] == 2 and metrics["n_subjects"] == 2
    assert "Every case of an external cohort" in (ev / "report" / "section.json").read_text()
    with pytest.raises(InputError, match=r"of this external table were used to train or tune this model \(sub-0"):
        mome.evaluate(run / "model", manifest, tmp_path / "ev_all2", split="all", device="cpu", n_overlays=0,
                      cache_dir=cfg.cache_dir)


def test_stage2_refuses_test_cases_its_stage1_experts_were_trained_on(tmp_path) -> None:
    """Without a split column each step draws its split from its seed: stage 2 with another seed than stage 1
    tested on cases the experts had trained on, and evaluate scored them (only stage 2's cases were stored)."""
    import json

    import pandas as pd

    from neuromoe.data.splits import assign_splits
    from neuromoe.pipelines import mome

    root = tmp_path / "cohort"
    _mini_cohort(root)
    manifest = root / "manifests" / "lesion.csv"
    table = pd.read_csv(manifest).drop(columns=["split", "lesion_type"])
    table.to_csv(manifest, index=False)
    split = {s: assign_splits(table, seed=s, stratify=("lesion_type",)) for s in (0, 1)}
    assert set(table["subject"][split[0] == "test"]) & set(table["subject"][split[1] != "test"])

    def cfg(seed: int) -> mome.MoMEConfig:
        c = mome.load_mome_config("tiny", ["model.modalities=[t1,flair]", "pretrain.max_steps=1",
                                           "train.max_steps=1", "eval.tune_threshold=false"], seed=seed,
                                  device="cpu")
        c.cache_dir = str(tmp_path / "cache")
        return c

    experts = mome.pretrain(manifest, tmp_path / "experts", cfg(1))
    with pytest.raises(InputError, match="test cases were used to train or tune the stage-1 experts"):
        mome.train(manifest, tmp_path / "leak", cfg(0), experts=experts)
    assert not (tmp_path / "leak").exists()
    assert (mome.train(manifest, tmp_path / "run", cfg(1), experts=experts) / "model").is_dir()
    # the experts' cases count as fitted even where stage 2's table lacks them (only its own were stored)
    table = table.assign(split=split[1].to_numpy())
    dropped = table[table["split"] == "train"].head(2)
    table.drop(dropped.index).to_csv(manifest.parent / "fewer.csv", index=False)
    run = mome.train(manifest.parent / "fewer.csv", tmp_path / "run2", cfg(1), experts=experts)
    stored = set(json.loads((run / "model" / "config.json").read_text())["extra"]["fit_fingerprints"])
    for prints in mome._case_prints(dropped.assign(**{c: [str(manifest.parent / p) for p in dropped[c]]
                                                      for c in ("t1", "mask")}), ["t1", "flair"]):
        assert prints & stored


def test_curriculum_spans_the_epochs_that_max_steps_lets_run(tmp_path) -> None:
    """``train.max_steps`` ends the run (and fits the LR schedule) early: the curriculum must reach the
    fused-loss end within the steps that run, not stay near the expert end of a 10-epoch schedule."""
    from neuromoe.engine import TrainConfig
    from neuromoe.pipelines.mome import MoMETrainer

    class Recorder(MoMETrainer):
        seen: list[float]

        def training_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            self.seen.append(self.expert_weight)
            return super().training_step(batch)

    ds = LesionPatchDataset(_cases(2, shape=(16, 16, 16)), (16, 16, 16), modalities=("t1", "flair"))
    torch.manual_seed(0)
    model = create_model("mome_tiny", modalities=("t1", "flair"))
    cfg = TrainConfig(epochs=10, max_steps=3, batch_size=4, device="cpu", progress=False, val_every=100)
    trainer = Recorder(model, cfg, ds, run_dir=tmp_path)
    trainer.seen = []
    trainer.fit()
    # 4 items / batch 4 = 1 step per epoch → 3 epochs run: (1 - e/3)², not (1 - e/10)² = 1, 0.81, 0.64
    np.testing.assert_allclose(trainer.seen, [1.0, 4 / 9, 1 / 9], rtol=1e-6)


def test_sparse_expert_probability_is_nan_where_the_expert_never_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse routing runs per sliding window: an expert's map must average only the windows where it ran
    (NaN where it never did), and ``expert_dice_<m>`` is only scored for an expert that covered the whole
    volume; zeros from skipped windows used to be averaged in and scored as the expert's prediction."""
    from neuromoe.pipelines.mome import evaluate_cases, predict_volume

    torch.manual_seed(0)
    mods = ("t1", "flair", "dwi")
    m = create_model("mome_tiny", modalities=mods, top_k=1).eval()
    route = m.route

    def by_position(x: torch.Tensor, available: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        probs, _, w, bal = route(x, available)  # expert 0 for windows with the bright slab, 1 elsewhere
        sel = (x.flatten(1).mean(1) < 1.0).long()[:, None]
        return probs, sel, torch.ones_like(w), bal

    monkeypatch.setattr(m, "route", by_position)
    # windows start at x = 0, 8, 16 and run two per batch: expert 0 runs on the first batch (x < 24) only
    img = np.random.default_rng(0).normal(size=(32, 16, 16)).astype(np.float32)
    img[:8] += 3.0
    pred = predict_volume(m, img[None], (16, 16, 16), sw_batch_size=2)
    assert all(p.is_contiguous() for p in m.parameters())  # the CPU's channels_last windows leave no trace
    ep = pred.expert_prob
    assert np.isnan(ep[2]).all()  # never selected: no map (was all zeros)
    assert np.isfinite(ep[0][:24]).all() and np.isnan(ep[0][24:]).all()
    assert np.isfinite(ep[1]).all() and 0 <= np.nanmin(ep) <= np.nanmax(ep) <= 1
    with torch.no_grad():  # expert 0 ran only on the first window: its map is that window's own output
        own = m.experts[0](torch.as_tensor(img[None, None, :16]))[0].softmax(1)[0, 1].numpy()
    np.testing.assert_allclose(ep[0][:8], own[:8], atol=1e-5)
    # 5 windows (x = 0 … 32) at the default 4 per batch: expert 0 runs on the first batch, not on x >= 40
    img = np.concatenate([img, np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32)])
    case = {"images": {"t1": img}, "mask": (img > 2.5).astype(np.uint8), "meta": {"subject": "s0"}}
    row = evaluate_cases(m, [case], mods, (16, 16, 16)).iloc[0]
    assert np.isnan(row["expert_dice_t1"]) and np.isnan(row["expert_dice_dwi"])
    assert np.isfinite(row["expert_dice_flair"])


def test_report_overlay_draws_the_prediction_at_the_model_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlay must show what ``evaluate`` scored: with a tuned threshold of 0.25 and lesion p = 0.4
    the prediction contour (red) is drawn; at the hard-coded 0.5 it was missing from the figure."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from neuromoe.pipelines import mome

    mask = np.zeros((16, 16, 16), np.uint8)
    mask[5:10, 5:10, 5:10] = 1
    case = {"images": {"t1": np.zeros(mask.shape, np.float32)}, "mask": mask, "meta": {"subject": "s0"}}
    prob = np.where(mask > 0, 0.4, 0.01).astype(np.float32)
    pred = mome.VolumePrediction(prob, gate=np.ones((1, *mask.shape), np.float32), gate_share=np.ones(1))
    row = {"modality": "t1", **mome.segmentation_metrics(prob > 0.25, mask > 0, (1, 1, 1))}
    metrics = {"split": "test", "n_cases": 1, "n_predictions": 1, "multimodal": False, "tta": False,
               "threshold": 0.25, "mean": {**{k: row[k] for k in mome.SUMMARY_METRICS}, "n_hd95": 1}}
    colours: list[object] = []
    contour = Axes.contour

    def spy(ax: Axes, *args: object, **kwargs: object) -> object:
        colours.append(kwargs.get("colors"))
        return contour(ax, *args, **kwargs)

    class Section:
        def add_text(self, *_: object) -> None: ...
        def add_table(self, *_: object) -> None: ...
        def add_figure(self, fig: object, _: str) -> None:
            matplotlib.pyplot.close(fig)

    monkeypatch.setattr(Axes, "contour", spy)
    mome._add_evaluation(Section(), metrics, pd.DataFrame([row]), [case], [(0, "t1", pred)], ["t1"])
    assert row["dice"] == 1.0 and colours == ["lime", "red"]


def test_segment_covers_the_whole_field_of_view_not_the_training_crop(tmp_path, monkeypatch) -> None:
    """Real scans carry noise everywhere, so the foreground crop keeps the whole field of view and the
    training shape's centre crop would cut off a lesion near its edge (a FLAIR with the neck in it loses
    the top of the head); the sliding window takes any size, so segment crops nothing."""
    import nibabel as nib

    from neuromoe.data.preprocess import PreprocSpec
    from neuromoe.pipelines import mome

    data = (100 + np.random.default_rng(0).normal(size=(40, 32, 32))).astype(np.float32)
    truth = np.zeros(data.shape, bool)
    truth[1:7, 12:18, 12:18] = True  # outside the central 16-voxel crop along x
    data[truth] = 400
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t1.nii.gz"))
    spec = PreprocSpec(spacing=(1.0, 1.0, 1.0), shape=(16, 32, 32), antialias=False)
    extra = {"kind": "unet", "modalities": ["t1"], "patch_size": [16, 16, 16], "multimodal": False, "threshold": 0.5}
    meta = {"family": "mome", "preprocessing": spec.to_dict(), "extra": extra}
    monkeypatch.setattr(mome, "_load", lambda _: (_FixedProbability().eval(), meta))
    mome.segment("model", {"t1": tmp_path / "t1.nii.gz"}, tmp_path / "mask.nii.gz", device="cpu")
    mask = np.asarray(nib.load(str(tmp_path / "mask.nii.gz")).dataobj) > 0
    assert mask.shape == data.shape
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.8


def test_mome_plus_sidecar_says_what_fills_a_missing_modality_expert(tmp_path, monkeypatch) -> None:
    """MoME+ given T1 and FLAIR only: the DWI expert's input is a learned mix of those two, and the sidecar
    says so (its gate share alone would read as if a DWI image had been used)."""
    import nibabel as nib

    from neuromoe.data.preprocess import PreprocSpec
    from neuromoe.pipelines import mome

    torch.manual_seed(0)
    model = create_model("mome_tiny", modalities=("t1", "flair", "dwi"), multimodal=True).eval()
    rng = np.random.default_rng(0)
    for m in ("t1", "flair"):
        nib.save(nib.Nifti1Image((100 + rng.normal(size=(16, 16, 16))).astype(np.float32), np.eye(4)),
                 str(tmp_path / f"{m}.nii.gz"))
    spec = PreprocSpec(spacing=(1.0, 1.0, 1.0), shape=None, antialias=False)
    extra = {"kind": "mome", "modalities": ["t1", "flair", "dwi"], "patch_size": [16, 16, 16], "multimodal": True,
             "threshold": 0.5}
    monkeypatch.setattr(mome, "_load", lambda _: (model, {"family": "mome", "preprocessing": spec.to_dict(),
                                                         "extra": extra}))
    both = {m: tmp_path / f"{m}.nii.gz" for m in ("t1", "flair")}
    sidecars, failures = mome.segment("model", both, tmp_path / "mask.nii.gz", device="cpu")
    assert not failures and set(sidecars[0]["gate_share"]) == {"t1", "flair", "dwi"}
    mix = sidecars[0]["expert_inputs"]
    assert list(mix) == ["dwi"] and list(mix["dwi"]) == ["t1", "flair"]
    expected = model.dispatch_matrix(torch.tensor([[1.0, 1.0, 0.0]]))[0, 2, :2]
    np.testing.assert_allclose([mix["dwi"]["t1"], mix["dwi"]["flair"]], expected.detach().numpy(), atol=1e-4)
    assert sum(mix["dwi"].values()) == pytest.approx(1.0, abs=1e-3)


def test_hd95_summaries_say_over_how_many_predictions_they_average() -> None:
    """A missed lesion has no HD95 and drops out of the mean, so a model that misses it can look better than
    one that finds it off target; the summaries count the predictions behind the HD95 mean."""
    import pandas as pd

    from neuromoe.pipelines.mome import _summary

    frame = pd.DataFrame({"modality": ["t1", "t1", "flair"], "dice": [0.8, 0.0, 0.7],
                          "hd95": [1.0, np.nan, 3.0], "lesion_f1": [1.0, 0.0, 1.0],
                          "abs_volume_diff_ml": [0.1, 2.0, 0.2]})
    table = _summary(frame, "modality").set_index("modality")
    assert table.loc["t1", "n"] == 2 and table.loc["t1", "n_hd95"] == 1 and table.loc["t1", "hd95"] == 1.0
    assert table.loc["flair", "n_hd95"] == 1


def test_zoom_augmentation_keeps_the_mask_on_its_image() -> None:
    """The zoom resized the mask with legacy nearest sampling and the image with centre-aligned bilinear:
    the mask sat ~0.4 voxel off the image on every axis (measured 0.42 / 0.39 / 0.42 over 200 blobs)."""
    from monai.transforms import Compose

    from neuromoe.data.lesion import augmentation

    zoom = augmentation(3).transforms[2]
    zoom.prob = 1.0
    t = Compose([zoom])
    rng = np.random.default_rng(0)
    shifts = []
    for i in range(40):
        m = np.zeros((1, 24, 24, 24), np.float32)
        lo, size = rng.integers(6, 12, 3), rng.integers(2, 6, 3)
        m[(0, *[slice(a, a + b) for a, b in zip(lo, size, strict=True)])] = 1
        t.set_random_state(i)
        o = t({"image": m.copy(), "mask": m.copy()})
        img, mask = np.asarray(o["image"])[0], np.asarray(o["mask"])[0]
        g = np.indices(img.shape).reshape(3, -1)
        shifts.append((g * mask.ravel()).sum(1) / mask.sum() - (g * img.ravel()).sum(1) / img.sum())
    assert np.abs(np.mean(shifts, 0)).max() < 0.15


def test_mome_validation_loss_does_not_depend_on_the_batching() -> None:
    """The loss is a batch Dice: a mean of per-batch losses moved with the batch size and the DDP ranks
    (1.653 at batch 4 vs 1.662 at batch 1 on the same weights), and it picks the kept checkpoint. It is now
    the loss of all validation patches as one batch, from additive statistics."""
    from neuromoe.models import create_model
    from neuromoe.models.mome import deep_supervised_loss
    from neuromoe.pipelines.mome import MoMETrainer

    torch.manual_seed(0)
    model = create_model("unet_tiny", logit_skip=True).eval()
    tr = MoMETrainer.__new__(MoMETrainer)
    tr.model = model
    image = torch.randn(5, 1, 16, 16, 16)
    mask = (torch.rand(5, 1, 16, 16, 16) > 0.9).float()
    mask[3] = 0  # a lesion-free patch
    with torch.no_grad():
        whole = float(deep_supervised_loss(model(image), mask))
        got = [tr.validation_end([tr.validation_step({"image": image[i : i + bs], "mask": mask[i : i + bs]})
                                  for i in range(0, 5, bs)])["val_loss"] for bs in (1, 2, 5)]
    assert got == pytest.approx([whole] * 3, rel=1e-6, abs=1e-9)

def test_the_threshold_is_tuned_on_whole_validation_volumes(tmp_path) -> None:
    """evaluate and segment score the whole field of view; the threshold was tuned on the training crop."""
    from dataclasses import replace

    from neuromoe.pipelines import mome

    _mini_cohort(tmp_path / "cohort", shape=(24, 44, 24))
    cfg = mome.load_mome_config("tiny", ["eval.tune_threshold=true"], seed=0, device="cpu")
    spec = replace(mome._spec(cfg), crop_foreground=False)
    val = mome._split_cases(tmp_path / "cohort", cfg, spec, ("val",))["val"]
    whole = mome._whole_val(tmp_path / "cohort", cfg, spec, val)
    assert whole and all(c["mask"].shape == (24, 44, 24) for c in whole)  # the training shape is 24×32×24
    # without a crop the training's validation cases are the whole volumes: not loaded (held) a second time
    uncropped = replace(spec, shape=None)
    val = mome._split_cases(tmp_path / "cohort", cfg, uncropped, ("val",))["val"]
    assert mome._whole_val(tmp_path / "cohort", cfg, uncropped, val) is val


def test_a_split_without_validation_is_said_and_an_empty_split_is_named(tmp_path, capsys) -> None:
    """No 'val' rows: training said nothing while the threshold stayed untuned; evaluating an empty split said
    no case had a lesion mask, though every case had one."""
    import pandas as pd

    from neuromoe.errors import InputError
    from neuromoe.pipelines import mome

    root = tmp_path / "cohort"
    _mini_cohort(root)
    manifest = root / "manifests" / "lesion.csv"
    table = pd.read_csv(manifest)
    table["split"] = ["train"] * 5 + ["test"]
    table.to_csv(manifest, index=False)
    cfg = mome.load_mome_config("tiny", ["model.modalities=[t1,flair]", "train.max_steps=1"], seed=0, device="cpu")
    cfg.cache_dir = str(tmp_path / "cache")
    run = mome.train(manifest, tmp_path / "run", cfg)
    assert "no validation cases" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"the split has no 'val' case \(train 5, val 0, test 1\)"):
        mome.evaluate(run / "model", manifest, tmp_path / "ev", split="val", device="cpu", n_overlays=0,
                      cache_dir=cfg.cache_dir)


def test_a_modality_without_training_images_is_dropped_from_a_copy_of_the_config(capsys) -> None:
    """A cohort without DWI leaves DWI out of the run's model; the caller's config object kept losing it, so
    reusing it for a cohort with DWI built a model without a DWI expert, silently."""
    from neuromoe.pipelines import mome

    cfg = mome.load_mome_config("tiny", device="cpu")
    cfg.model.modalities = ["t1", "flair", "dwi"]
    cases = {"train": [{**c, "images": {k: v for k, v in c["images"].items() if k != "dwi"}} for c in _cases()]}
    kept = mome._keep_trained_modalities(cfg, cases)
    assert kept.model.modalities == ["t1", "flair"]
    assert cfg.model.modalities == ["t1", "flair", "dwi"]
    assert "no training images for modality 'dwi'" in capsys.readouterr().err


def test_report_overlays_show_the_input_modalities_in_turn() -> None:
    """Every overlay row was a T1 prediction (each case's first), the modality the demo model segments worst —
    and the demo's first test cases are T1-only; the modalities now come in turn, each from a case that has it."""
    from neuromoe.pipelines import mome

    mods = ["t1", "flair", "dwi"]
    assert mome._overlay_plan([mods] * 5, mods, 3, False) == {0: "t1", 1: "flair", 2: "dwi"}
    # T1-only cases first (the demo's test split): the other modalities come from later cases
    assert mome._overlay_plan([["t1"], ["t1"], ["t1", "flair"], ["dwi"]], mods, 3, False) == \
        {0: "t1", 2: "flair", 3: "dwi"}
    # no case has DWI: still three rows (the next modality in turn)
    assert mome._overlay_plan([["t1", "flair"]] * 5, ["t1", "dwi", "flair"], 3, False) == \
        {0: "t1", 1: "flair", 2: "flair"}
    assert mome._overlay_plan([["t1"], ["flair"]], mods, 3, True) == {0: None, 1: None}  # MoME+: one per case
    assert mome._overlay_plan([["t1"]], mods, 0, False) == {}


def test_cases_past_the_memory_budget_are_read_from_the_cache_where_cut(tmp_path, capsys, monkeypatch) -> None:
    """Every case's images were held in memory, in every torchrun process (BraTS at the paper grid: ~100 MB a
    case, 1,251 cases): past the budget they are read-only maps of the cache entries, and the trained experts
    and MoME are the same as from memory."""
    import os

    from safetensors.torch import load_file

    from neuromoe.data import lesion
    from neuromoe.data.preprocess import CachedChannel
    from neuromoe.pipelines import mome

    _mini_cohort(tmp_path / "cohort")
    cfg = mome.load_mome_config("tiny", seed=0, device="cpu")
    cfg.cache_dir = str(tmp_path / "cache")
    mome._split_cases(tmp_path / "cohort", cfg, mome._spec(cfg), ("train", "val"))  # fill the cache
    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(lesion, "memory_budget", lambda: 0.0)
    cases = mome._split_cases(tmp_path / "cohort", cfg, mome._spec(cfg), ("train", "val"))
    assert capsys.readouterr().err.count("read from the preprocessing cache where patches") == 1  # not per split
    images = [a for split in cases.values() for c in split for a in c["images"].values()]
    assert len(images) == 8 and all(isinstance(a, CachedChannel) for a in images)  # references, not copies
    assert len(os.listdir("/proc/self/fd")) < fds + 4  # no map (and its file descriptor) stays open per case
    monkeypatch.setattr(lesion, "memory_budget", lambda: float("inf"))
    cfg.in_memory = False  # asked for, within the budget: done, and said as well
    monkeypatch.setattr(lesion, "_MAPPED", set())  # said once per table and process
    forced = mome._split_cases(tmp_path / "cohort", cfg, mome._spec(cfg), ("val",))
    assert all(isinstance(a, CachedChannel) for c in forced["val"] for a in c["images"].values())
    assert "read from the preprocessing cache where patches" in capsys.readouterr().err
    cfg.in_memory = None
    held = mome._split_cases(tmp_path / "cohort", cfg, mome._spec(cfg), ("train", "val"))
    assert all(type(a) is np.ndarray and a.base is None for split in held.values() for c in split
               for a in c["images"].values())  # channels copied out: the entry's float32 mask channel is not kept
    weights = {}
    for in_memory in (False, True):
        cfg.in_memory = in_memory
        mome.pretrain(tmp_path / "cohort", tmp_path / f"pre_{in_memory}", cfg)
        run = mome.train(tmp_path / "cohort", tmp_path / f"ft_{in_memory}", cfg, experts=tmp_path / f"pre_{in_memory}")
        weights[in_memory] = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[True])


def _monai_patch(image, mask, patch, rng, fg_fraction):
    """The former sampler, on MONAI's transforms: pad the whole volume, then crop it (the reference)."""
    from monai.transforms import RandSpatialCropd, SpatialPadd

    padded = SpatialPadd(["image", "mask"], spatial_size=tuple(patch))({"image": image, "mask": mask[None]})
    img, msk = np.asarray(padded["image"]), np.asarray(padded["mask"])[0]
    fg = np.argwhere(msk > 0)
    if len(fg) and rng.random() < fg_fraction:
        centre = fg[rng.integers(len(fg))]
        start = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                 for c, p, s in zip(centre, patch, msk.shape, strict=True)]
        sl = tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))
        return img[(slice(None), *sl)], msk[sl]
    crop = RandSpatialCropd(["image", "mask"], roi_size=tuple(patch), random_size=False)
    crop.set_random_state(int(rng.integers(2**31)))
    out = crop({"image": img, "mask": msk[None]})
    return np.asarray(out["image"]), np.asarray(out["mask"])[0]


@pytest.mark.parametrize("shape", [(20, 24, 18), (6, 30, 9), (16, 16, 16)])
def test_patches_are_cut_from_the_window_without_padding_the_volume(shape) -> None:
    """Patches were cut from a padded copy of every modality's whole volume (4 volumes per MoME+ item, read whole
    from a memory map); the window is now found first and each volume read only there, with the same draws and
    the same patches as MONAI's pad-then-crop, also on axes shorter than the patch and without a lesion."""
    from neuromoe.data.lesion import sample_patch

    data = np.random.default_rng(1)
    image = data.normal(size=(2, *shape)).astype(np.float32)
    for lesion in (True, False):
        mask = np.zeros(shape, np.uint8)
        if lesion:
            mask[2:5, 3:6, 1:4] = 1
        for seed in range(40):
            a, b = np.random.default_rng(seed), np.random.default_rng(seed)
            new, old = sample_patch(image, mask, (16, 16, 16), a, 0.5), _monai_patch(image, mask, (16, 16, 16), b, 0.5)
            np.testing.assert_array_equal(new[0], old[0])
            np.testing.assert_array_equal(new[1], old[1])
            assert a.random() == b.random()  # the same draws consumed
