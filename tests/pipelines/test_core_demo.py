"""Core demo end to end on a tiny synthetic cohort whose age is visible as ventricle size."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from neuromoe.data.preprocess import PreprocSpec
from neuromoe.data.structural import load_t1
from neuromoe.models import load_model
from neuromoe.pipelines.core_demo import CoreDemoConfig, run


def _cohort(root: Path, n: int = 30, size: int = 20, seed: int = 0) -> Path:
    """Brains (balls of 84 mm: smaller ones are refused as not a whole brain) whose dark central 'ventricle' grows
    with age, as in real atrophy."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size) - size / 2 + 0.5] * 3, indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    rows = []
    for i in range(n):
        age = float(rng.uniform(45, 85))
        brain = (r < size * 0.42).astype(np.float32) * (100 + rng.normal(0, 5, r.shape))
        brain[r < 1.5 + 4.5 * (age - 45) / 40] = 20
        path = root / f"sub-{i:03d}" / "anat" / f"sub-{i:03d}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(brain.astype(np.float32), np.diag([5.0, 5.0, 5.0, 1.0])), path)
        split = "train" if i < 20 else "val" if i < 25 else "test"
        rows.append(
            {
                "subject": f"sub-{i:03d}",
                "t1": f"../sub-{i:03d}/anat/sub-{i:03d}_T1w.nii.gz",
                "age": round(age, 1),
                "sex": "F",
                "cohort": "ukb",
                "site": "s1",
                "split": split,
            }
        )
    (root / "manifests").mkdir()
    pd.DataFrame(rows).to_csv(root / "manifests" / "structural.csv", index=False)
    return root


def test_core_demo_learns_and_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = _cohort(tmp_path / "cohort")
    cfg = CoreDemoConfig(
        model="simple_cnn_moe_tiny",
        img_size=16,
        spacing=5.0,
        precision="fp32",  # the round trip below predicts in fp32
        epochs=12,
        batch_size=4,
        lr=1e-2,
        n_bootstrap=50,
    )
    out = run(cohort, tmp_path / "core", device="cpu", seed=0, cfg=cfg)
    printed = capsys.readouterr().out
    assert "validation MAE" in printed and "baseline" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["train_loss_per_epoch"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])  # it learns
    assert metrics["val"]["n"] == 5 and metrics["test"]["n"] == 5
    assert metrics["val"]["mae"] < metrics["val"]["baseline_mae"]
    # model directory round trip: same predictions from the saved files
    model, meta = load_model(out / "model")
    assert meta["family"] == "core" and meta["architecture"] == "simple_cnn_moe_tiny"
    spec = PreprocSpec.from_dict(meta["preprocessing"])
    assert spec.shape == (16, 16, 16) and spec.spacing == (5.0, 5.0, 5.0)
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns) == ["subject", "split", "age", "predicted_age"]
    assert not preds["subject"].str.contains("/").any()
    x = torch.from_numpy(load_t1(cohort / "sub-000/anat/sub-000_T1w.nii.gz", spec, spec.shape))[None]
    with torch.no_grad():
        age = float(model(x).prediction[0, 0]) * meta["extra"]["target_std"] + meta["extra"]["target_mean"]
    assert age == pytest.approx(preds["predicted_age"][0], abs=1e-3)
    section = json.loads((out / "report" / "section.json").read_text())
    assert [i["kind"] for i in section["items"]] == ["text", "table", "figure", "figure"]
    assert str(tmp_path) not in (out / "report" / "section.json").read_text()
