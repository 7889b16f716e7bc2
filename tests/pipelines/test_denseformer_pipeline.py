"""DenseFormer-MoE pipeline end to end on a tiny cohort of the synthetic generator: labels, pretrain, train, evaluate,
predict (bad files skipped, --strict), CLI exit codes."""

from __future__ import annotations

import json
import math
import os
import shutil
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from neuromoe.cli.main import main as cli_main
from neuromoe.data.splits import assign_splits
from neuromoe.data.structural import TaskSpec, encode_labels
from neuromoe.data.synth import synth_cohort
from neuromoe.errors import ConfigError, InputError, ModelFormatError
from neuromoe.eval.report import load_section
from neuromoe.models.registry import weights_digest
from neuromoe.pipelines import denseformer as pipe


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The real synthetic generator on a coarse 6 mm grid: 36 subjects (12 ukb, 12 adni, 12 ppmi)."""
    root = tmp_path_factory.mktemp("df_cohort")
    manifest = Path(synth_cohort(root, n_structural=36, n_lesion=0, n_fmri=0, spacing=6.0,
                                 progress=False)["structural"])
    # a quarter of the subjects for validation (not the generator's 15 %) so calibration has >= 9 of them
    table = pd.read_csv(manifest)
    table["split"] = [["train", "train", "val", "test"][(i // 3) % 4] for i in range(len(table))]
    table.to_csv(manifest, index=False)
    return manifest


def _cfg(tmp: Path, **over: Any) -> pipe.DenseFormerConfig:
    sets = [f"{k}={v}" for k, v in over.items()]
    cfg = pipe.load_denseformer_config("tiny", sets, seed=0, device="cpu")
    cfg.cache_dir = str(tmp / "cache")
    return cfg


def test_a_scan_that_cannot_hold_a_brain_is_refused_naming_it(cohort, tmp_path):
    """A 60 mm cube, a 30 mm slab or a localiser got a brain age, sex and diagnosis without a word; a whole head
    passes, also into a configured window smaller than the bound (the tiny preset's 32 voxels of 6 mm here)."""
    import nibabel as nib

    from neuromoe.data.structural import load_t1
    from neuromoe.errors import InputError

    cfg = _cfg(tmp_path)
    spec, size, t1 = pipe._spec(cfg), pipe._img_size(cfg), Path(cohort).parent / pd.read_csv(cohort)["t1"][0]
    assert load_t1(t1, spec, size).shape == (1, *size)
    img = nib.load(t1)
    cx, cy, cz = (n // 2 for n in img.shape[:3])
    for name, part in (("cube", img.slicer[cx - 5:cx + 5, cy - 5:cy + 5, cz - 5:cz + 5]),
                       ("slab", img.slicer[:, :, cz - 2:cz + 3])):
        nib.save(part, tmp_path / f"{name}.nii.gz")
        with pytest.raises(InputError, match=r"not a whole brain") as info:
            load_t1(tmp_path / f"{name}.nii.gz", spec, size)
        assert f"{name}.nii.gz" in str(info.value)
    # a 60 mm ball in a 120 mm field of view with a scanner noise floor: the noise was content, so it passed
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.arange(40) - 19.5] * 3, indexing="ij"))
    ball = np.where((g**2).sum(0) < 10**2, 100.0, 0.0)
    noisy = np.hypot(ball + rng.normal(0, 3, ball.shape), rng.normal(0, 3, ball.shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(noisy, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "ball.nii.gz")
    with pytest.raises(InputError, match=r"spans 66×66×66 mm: not a whole brain"):
        load_t1(tmp_path / "ball.nii.gz", spec, size)
    from neuromoe.data.structural import _check_coverage

    aff, window = np.diag([2.0, 2.0, 2.0, 1.0]), np.zeros((41, 46, 41))
    _check_coverage(window, aff, "x", [78.0, 88.0, 78.0])  # 80 mm less the edge voxel resampling leaves empty
    with pytest.raises(InputError, match="spans 60×88×78 mm"):
        _check_coverage(window, aff, "x", [60.0, 88.0, 78.0])


def test_label_encoding_masks_missing_and_rejects_unknown():
    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("dx_ad", "classification", "dx_ad", ["CN", "MCI", "AD"])]
    t = pd.DataFrame({"age": [70.0, np.nan, 60], "dx_ad": ["AD", "", None]})
    enc = encode_labels(t, tasks)
    assert enc["dx_ad"].tolist() == [2, -1, -1]
    assert np.isnan(enc["age"][1]) and enc["age"][0] == 70
    with pytest.raises(InputError, match="'XX'"):
        encode_labels(pd.DataFrame({"age": [1.0], "dx_ad": ["XX"]}), tasks, "m.csv")
    assert (encode_labels(pd.DataFrame({"age": [1.0]}), tasks)["dx_ad"] == -1).all()  # absent column
    # 0/1-coded classes: a column with a blank is read as float, and 1.0 must still be class "1"
    coded = [TaskSpec("dx_pd", "classification", "dx_pd", ["0", "1"])]
    assert encode_labels(pd.DataFrame({"dx_pd": [0.0, 1.0, np.nan]}), coded)["dx_pd"].tolist() == [0, 1, -1]


def test_splits_deterministic_and_stratified():
    t = pd.DataFrame({"cohort": ["a"] * 40 + ["b"] * 20})
    s1, s2 = assign_splits(t, seed=3), assign_splits(t, seed=3)
    assert s1.tolist() == s2.tolist()
    assert (s1[t.cohort == "b"] == "test").sum() == 3 and (s1[t.cohort == "a"] == "test").sum() == 6
    given = pd.DataFrame({"split": ["train", "val", "test"]})
    assert assign_splits(given).tolist() == ["train", "val", "test"]
    # a split column with blanks is refused: silently re-splitting would train on the user's test subjects
    with pytest.raises(InputError, match="blank for 1"):
        assign_splits(pd.DataFrame({"split": ["train", np.nan, "test"]}))


def test_splits_keep_the_sessions_of_a_subject_together():
    """Longitudinal cohorts (ADNI, PPMI) have several sessions per subject: a per-row split put 9 of 20 subjects'
    sessions in more than one split, i.e. tested models on subjects they were trained on."""
    t = pd.DataFrame({"subject": [f"s{i // 3}" for i in range(60)], "session": ["ses-1", "ses-2", "ses-3"] * 20,
                      "cohort": ["adni"] * 30 + ["ppmi"] * 30}).sample(frac=1.0, random_state=0)
    for seed in range(3):
        split = assign_splits(t, seed=seed)
        assert (t.assign(split=split).groupby("subject")["split"].nunique() == 1).all()
        assert set(split) == {"train", "val", "test"}
    given = t.assign(split=["train"] * 59 + ["test"])
    with pytest.raises(InputError, match="more than one split"):
        assign_splits(given)


def test_calibration_skips_a_regression_task_without_validation_labels():
    """A task labelled in one cohort only (e.g. MMSE on ADNI) may have no labelled validation subject."""
    tasks = [TaskSpec("mmse", "regression", "mmse")]
    cal = pipe._calibrate({"mmse": np.array([20.0, 25.0, 28.0])}, {"mmse": np.full(3, np.nan)},
                          np.ones(3, bool), tasks, pipe.EvalSection(), np.array(["a", "b", "c"]))
    assert cal["mmse"] == {}


def test_calibration_says_when_a_task_gets_no_conformal_calibrator(capsys):
    """One labelled validation subject: no prediction sets for the task, and training now says so."""
    tasks = [TaskSpec("dx", "classification", "dx", ["CN", "AD"])]
    cal = pipe._calibrate({"dx": np.full((3, 2), 0.5)}, {"dx": np.array([1, -1, -1])}, np.ones(3, bool), tasks,
                          pipe.EvalSection(), np.array(["a", "b", "c"]))
    assert "dx" not in cal
    assert "'dx' has 1 labelled validation subjects (at least 2 needed): no conformal prediction sets" in (
        capsys.readouterr().err)


def test_predicted_sets_draw_their_own_randomisation_per_scan():
    """predict() scores one scan at a time: each scan needs its own APS draw, or the sets over-cover."""
    from neuromoe.eval.conformal import ConformalClassifier, set_coverage

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (3000, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in probs])
    cc = ConformalClassifier(0.1, method="aps", seed=0).fit(probs[:1000], y[:1000])
    task = TaskSpec("dx", "classification", "dx", ["a", "b", "c"])
    extra = {"calibration": {"dx": {"conformal": cc.to_dict()}}}
    res = {"dx": probs[1000:]}
    sets = [pipe._prediction_row(res, i, [task], extra, None)["dx_set"].split("|")
            for i in range(len(y) - 1000)]
    member = np.array([[c in s for c in task.classes] for s in sets])
    assert abs(set_coverage(member, y[1000:]) - 0.9) < 0.025
    again = pipe._prediction_row(res, 0, [task], extra, None)["dx_set"]
    assert again == "|".join(sets[0])  # reproducible per scan


def test_a_scans_prediction_set_is_a_function_of_its_probabilities():
    """The APS draw was seeded by the file name, so copies of one scan got F or F|M by name; it is seeded by
    the probabilities now. Checked on a probability vector whose set the draw does decide."""
    from neuromoe.eval.conformal import ConformalClassifier

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (600, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in probs])
    cc = ConformalClassifier(0.1, method="aps", seed=0).fit(probs[:300], y[:300])
    decided = [p for p in probs[300:]
               if len({tuple(cc.predict(p[None], rng=np.random.default_rng(k))[0]) for k in range(20)}) > 1]
    assert decided  # the draw matters for these scans
    task = TaskSpec("dx", "classification", "dx", ["a", "b", "c"])
    extra = {"calibration": {"dx": {"conformal": cc.to_dict()}}}
    res = {"dx": np.stack([decided[0], decided[0]])}
    first, copy = (pipe._prediction_row(res, i, [task], extra, None)["dx_set"] for i in (0, 1))
    assert first == copy


def test_multitask_loss_masks_missing_labels():
    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("dx", "classification", "dx", ["a", "b"])]
    out = types.SimpleNamespace(outputs={"age": torch.zeros(3, 1, requires_grad=True),
                                         "dx": torch.zeros(3, 2, requires_grad=True)}, aux_loss=torch.tensor(0.0))
    labels = {"age": torch.tensor([1.0, float("nan"), 1.0]), "dx": torch.tensor([-1, -1, -1])}
    loss, logs = pipe.multitask_loss(out, labels, tasks, {"age": (0.0, 1.0)})
    assert torch.isfinite(loss) and "loss_dx" not in logs
    loss.backward()
    assert out.outputs["age"].grad[1].abs().sum() == 0  # the subject without age gets no gradient


def test_balance_task_gradients_does_what_it_says():
    big, small = torch.tensor([[10.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    torch.testing.assert_close(pipe.balance_task_gradients([big, small], "sum"), big + small)
    # normalize: both tasks contribute the mean norm (5.25) each, in their own direction
    torch.testing.assert_close(pipe.balance_task_gradients([big, small], "normalize"), torch.tensor([[5.25, 5.25]]))
    # pcgrad: a conflicting component is projected out, an agreeing gradient is left alone
    a, b = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.0])
    out = pipe.balance_task_gradients([a, b], "pcgrad")
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0]) + torch.tensor([-0.5, 0.5]))
    c = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(pipe.balance_task_gradients([a, c], "pcgrad"), a + c)
    with pytest.raises(ValueError, match="task_balance"):
        pipe.balance_task_gradients([a, b], "mean")


@pytest.mark.parametrize("method", ["normalize", "pcgrad"])
def test_balanced_training_step_sends_balanced_gradient_into_backbone(method, monkeypatch):
    """The surrogate path keeps the loss value, trains the head as usual and gives the backbone exactly the
    balanced pooled-feature gradient; with a plain-sum combiner it equals ordinary backprop."""
    from neuromoe.engine import TrainConfig
    from neuromoe.models.denseformer import PRESETS, DenseFormerMoE

    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("sex", "classification", "sex", ["F", "M"])]
    torch.manual_seed(0)
    model = DenseFormerMoE([t.model_dict() for t in tasks], head="separate", head_drop=0.0,
                           **{**PRESETS["tiny"], "norm": "instance"})
    batch = {"image": torch.randn(4, 1, 32, 32, 32),
             "labels": {"age": torch.tensor([50.0, 60.0, float("nan"), 70.0]), "sex": torch.tensor([0, 1, 1, -1])}}
    stats = {"age": (60.0, 10.0)}

    def grads(trainer):
        model.zero_grad()
        loss, logs = trainer.training_step(batch)
        loss.backward()
        return loss.detach(), logs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def make(balance):
        return pipe.FinetuneTrainer(model, TrainConfig(device="cpu"), [], None, tasks=tasks, target_stats=stats,
                                    layer_decay=1.0, freeze=False, task_balance=balance)

    loss0, logs0, g0 = grads(make("sum"))
    loss1, logs1, g1 = grads(make(method))
    torch.testing.assert_close(loss1, loss0)  # the surrogate adds nothing to the loss value
    assert logs1.keys() == logs0.keys()
    for n in g0:
        if n.startswith("head."):  # head parameters: ordinary gradients
            torch.testing.assert_close(g1[n], g0[n])
    assert any(not torch.allclose(g1[n], g0[n]) for n in g0 if n.startswith("backbone."))
    monkeypatch.setattr(pipe, "balance_task_gradients", lambda gs, m: torch.stack(list(gs)).sum(0))
    _, _, g2 = grads(make(method))
    for n in g0:
        torch.testing.assert_close(g2[n], g0[n], rtol=1e-4, atol=1e-6)


def test_validation_loss_is_the_per_task_mean_whatever_the_batching():
    """val_loss = Σ_task mean loss over the subjects labelled for that task; it was a size-weighted mean of
    per-batch sums, so a task labelled only in some batches (one cohort's diagnosis) counted by batch size."""
    tasks = [TaskSpec("dx", "classification", "dx", ["a", "b"]), TaskSpec("age", "regression", "age")]

    class Stub(torch.nn.Module):
        def forward(self, x):
            return types.SimpleNamespace(outputs={"dx": torch.cat([torch.zeros_like(x), x], 1), "age": x},
                                         aux_loss=torch.tensor(0.5))

    trainer = pipe.FinetuneTrainer.__new__(pipe.FinetuneTrainer)
    trainer.model, trainer.tasks, trainer.target_stats = Stub(), tasks, {"age": (1.0, 2.0)}
    img = torch.tensor([[0.0], [1.0], [2.0], [3.0], [0.5], [-1.0], [0.0], [2.5]])
    dx = torch.tensor([1, 1, 0, -1, -1, -1, -1, -1])  # 3 labelled, all in the first half
    age = torch.tensor([float("nan"), 3.0, 1.0, 5.0, 7.0, -1.0, float("nan"), 2.0])
    have_dx, have_age = dx >= 0, torch.isfinite(age)
    want_dx = torch.nn.functional.cross_entropy(torch.cat([torch.zeros(8, 1), img], 1)[have_dx], dx[have_dx])
    want_age = torch.nn.functional.smooth_l1_loss(img[have_age, 0], (age[have_age] - 1.0) / 2.0)
    for bs in (8, 4, 3, 2, 1):
        outs = [trainer.validation_step({"image": img[i : i + bs], "labels": {"dx": dx[i : i + bs],
                                                                              "age": age[i : i + bs]}})
                for i in range(0, 8, bs)]
        got = trainer.validation_end(outs)
        assert got["val_loss_dx"] == pytest.approx(float(want_dx), rel=1e-6)
        assert got["val_loss_age"] == pytest.approx(float(want_age), rel=1e-6)
        assert got["val_loss"] == pytest.approx(float(want_dx + want_age), rel=1e-6)


def test_regression_only_epochs_hide_classification_losses():
    """During the first ``regression_only_epochs`` only the regression task trains; then every task does."""
    from neuromoe.engine import TrainConfig
    from neuromoe.models.denseformer import PRESETS, DenseFormerMoE

    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("sex", "classification", "sex", ["F", "M"])]
    torch.manual_seed(0)
    model = DenseFormerMoE([t.model_dict() for t in tasks], head="separate", head_drop=0.0, **PRESETS["tiny"])
    batch = {"image": torch.randn(3, 1, 32, 32, 32),
             "labels": {"age": torch.tensor([50.0, 60.0, 70.0]), "sex": torch.tensor([0, 1, 1])}}
    trainer = pipe.FinetuneTrainer(model, TrainConfig(device="cpu"), [], None, tasks=tasks,
                                   target_stats={"age": (60.0, 10.0)}, layer_decay=1.0, freeze=False,
                                   regression_only_epochs=2)
    for epoch, sex_trains in ((0, False), (1, False), (2, True)):
        trainer.epoch = epoch
        model.zero_grad()
        loss, logs = trainer.training_step(batch)
        loss.backward()
        assert ("loss_sex" in logs) is sex_trains and "loss_age" in logs
        grad = model.head.out["sex"].weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) is sex_trains
    assert batch["labels"]["sex"].tolist() == [0, 1, 1]  # the caller's batch is not modified
    # classification still held back: no validation, so no checkpoint of untrained classification heads
    assert [trainer.validates(e) for e in range(4)] == [False, False, True, True]
    cfg = pipe.load_denseformer_config("tiny", ["finetune.regression_only_epochs=1"], seed=0, device="cpu")
    with pytest.raises(ConfigError, match="regression_only_epochs"):
        pipe.train("unused", "unused", cfg)  # train.epochs = 1: no epoch left for the classification tasks


def test_pretrain_train_evaluate_predict(cohort, tmp_path, capsys):
    cfg = _cfg(tmp_path)
    mae_run = pipe.pretrain(cohort, tmp_path / "mae", cfg)
    assert (mae_run / "model" / "config.json").is_file() and (mae_run / "reconstruction.png").stat().st_size > 0
    assert (mae_run / "report" / "section.json").is_file()
    cfg.finetune.pretrained = str(mae_run / "model")
    run = pipe.train(cohort, tmp_path / "ft", cfg)
    meta = json.loads((run / "model" / "config.json").read_text())
    cal = meta["extra"]["calibration"]
    assert meta["extra"]["split_seed"] == cfg.seed  # evaluate re-derives the same split (no training subject tested)
    assert "conformal" in cal["age"] and "dx_ad" in cal
    section = load_section(run)  # 'neuromoe report' of a fine-tuning run: setup and labelled subjects per task
    assert section.title == "DenseFormer-MoE: multi-task fine-tuning"
    table = next(i for i in section.items if i["kind"] == "table")
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["rows"]}
    assert list(rows) == [t.name for t in cfg.finetune.tasks]
    labelled = pd.read_csv(cohort).query("split == 'train'")["age"].notna().sum()
    assert rows["age"]["labelled train"] == str(labelled)
    ev = pipe.evaluate(run / "model", cohort, tmp_path / "eval", n_bootstrap=20, cache_dir=cfg.cache_dir)
    metrics = json.loads((ev / "metrics.json").read_text())
    age = metrics["tasks"]["age"]
    assert {"model", "bias_corrected", "predict_train_mean_mae", "conformal", "brain_age_gap",
            "tbv_baseline", "expert_usage"} <= set(age)
    # corrected metrics only where validation fitted a correction; the report says which (it claimed one always)
    assert ("model_bias_corrected" in age) is age["bias_corrected"] is ("bias" in cal["age"])
    assert len(age["model"]["mae"]) == 3 and sum(age["expert_usage"]) == metrics["n"] * 2
    assert (ev / "predictions.csv").is_file() and (ev / "report" / "section.json").is_file()
    # each coverage says how many subjects calibrated it and whether they were too few (coverage 1 by default)
    scored = {k: e["conformal"] for k, e in metrics["tasks"].items() if "conformal" in e}
    assert set(scored) == {k for k in metrics["tasks"] if "conformal" in cal.get(k, {})}
    for name, c in scored.items():
        assert c["n_calib"] == cal[name]["conformal"]["n_calib"]
        assert c["unbounded"] is math.isinf(cal[name]["conformal"]["q"])
        assert 0 <= c["shortfall_p"] <= 1 and (c["shortfall_p"] == 1) >= c["unbounded"]
    text = (ev / "report" / "section.json").read_text()
    assert ("mae (bias-corrected)" in text) is age["bias_corrected"] and "brain-age gap" in text
    assert ("age: not bias-corrected" in text) is not age["bias_corrected"] and "Held-out 'test'" in text
    # each row says how many labelled scans it rests on, and age sits beside the predict-the-mean floor
    test_ages = pd.read_csv(cohort).query("split == 'test'")["age"]
    assert age["n"] == test_ages.notna().sum() and "mae of predicting the training mean" in text
    section = load_section(ev)
    rows = next(i for i in section.items if i["kind"] == "table")
    assert rows["columns"][:3] == ["task", "n", "metric"]
    trivial = "too few calibration subjects" in text
    assert trivial is any(c["unbounded"] for c in scored.values())
    # a task without enough labelled test subjects is named as not scored, not silently missing
    table = pd.read_csv(cohort)
    table.loc[table["split"] == "test", "dx_pd"] = ""
    table["t1"] = [str(cohort.parent / p) for p in table["t1"]]
    table.to_csv(tmp_path / "no_pd.csv", index=False)
    ev = pipe.evaluate(run / "model", tmp_path / "no_pd.csv", tmp_path / "eval2", n_bootstrap=5,
                       cache_dir=cfg.cache_dir)
    metrics = json.loads((ev / "metrics.json").read_text())
    assert "dx_pd" not in metrics["tasks"] and "0 labelled 'test' subjects" in metrics["skipped"]["dx_pd"]
    # two visits of each test subject: every row says which visit it is, and counts say scans of how many subjects
    visits = pd.concat([table.assign(session="ses-1"), table[test := table["split"] == "test"].assign(session="ses-2")])
    visits.to_csv(tmp_path / "visits.csv", index=False)
    ev = pipe.evaluate(run / "model", tmp_path / "visits.csv", tmp_path / "eval_visits", n_bootstrap=5,
                       cache_dir=cfg.cache_dir)
    metrics = json.loads((ev / "metrics.json").read_text())
    frame = pd.read_csv(ev / "predictions.csv")
    assert list(frame.columns[:3]) == ["subject", "session", "t1"] and not frame.duplicated(["subject", "session"]).any()
    assert metrics["n"] == 2 * test.sum() and metrics["n_subjects"] == test.sum()
    assert "0 labelled 'test' subjects" in metrics["skipped"]["dx_pd"]
    # nothing to score at all: one clear error and no output folder (it used to write "tasks": {})
    pd.concat([table[~test], table[test].head(1)]).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(InputError, match="no task can be scored"):
        pipe.evaluate(run / "model", tmp_path / "one.csv", tmp_path / "eval3", n_bootstrap=5,
                      cache_dir=cfg.cache_dir)
    assert not (tmp_path / "eval3").exists()
    # the same scans without the split column: a new random split would score training scans as "test"
    table.drop(columns="split").to_csv(tmp_path / "nosplit.csv", index=False)
    capsys.readouterr()
    with pytest.raises(InputError, match="used to train, pretrain or calibrate"):
        pipe.evaluate(run / "model", tmp_path / "nosplit.csv", tmp_path / "eval4", n_bootstrap=5,
                      cache_dir=cfg.cache_dir)
    assert "has no split column: scoring the" in capsys.readouterr().err  # a cut external table is said
    # ... and the same scans reached through a symlinked folder (the guard compared absolute paths)
    root = cohort.parent.parent
    (tmp_path / "linked").symlink_to(root, target_is_directory=True)
    linked = table.drop(columns="split")
    linked["t1"] = [str(tmp_path / "linked" / os.path.relpath(os.path.normpath(p), root)) for p in linked["t1"]]
    linked.to_csv(tmp_path / "linked.csv", index=False)
    with pytest.raises(InputError, match="used to train, pretrain or calibrate"):
        pipe.evaluate(run / "model", tmp_path / "linked.csv", tmp_path / "eval5", n_bootstrap=5,
                      cache_dir=cfg.cache_dir)
    assert not (tmp_path / "eval5").exists()
    # an external cohort (here: the unseen test scans, without a split column) is scored whole with --split all;
    # without it only a seeded 'test' share was scored. Fitted scans among them are still refused.
    external = table[test].assign(split="")  # its own (blank) split column means nothing to --split all
    external.to_csv(tmp_path / "external.csv", index=False)
    ev = pipe.evaluate(run / "model", tmp_path / "external.csv", tmp_path / "eval6", split="all", n_bootstrap=5,
                       cache_dir=cfg.cache_dir)
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == len(external) and metrics["split"] == "all"
    assert "none left to fit it on" in metrics["tbv_baseline_skipped"]["age"]
    assert "Every subject of an external cohort" in (ev / "report" / "section.json").read_text()
    # refused into the folder of that run: its results go, a script checking metrics.json read them as this run's
    with pytest.raises(InputError, match="of this external table were used to train, pretrain or calibrate"):
        pipe.evaluate(run / "model", tmp_path / "nosplit.csv", ev, split="all", n_bootstrap=5,
                      cache_dir=cfg.cache_dir)
    assert not any((ev / name).exists() for name in ("metrics.json", "predictions.csv", "report/section.json"))

    # a model fine-tuned on 30 % of the labels: its TBV baseline learns from the same 30 %, not all of train
    frac = tmp_path / "frac_model"
    shutil.copytree(run / "model", frac)
    meta["extra"]["label_fraction"] = 0.3
    (frac / "config.json").write_text(json.dumps(meta))
    seen: list[int] = []
    real = pipe._tbv_baseline
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipe, "_tbv_baseline", lambda t, tbv, y, train, test: seen.append(int(train.sum()))
                   or real(t, tbv, y, train, test))
        pipe.evaluate(frac, cohort, tmp_path / "eval_frac", n_bootstrap=5, cache_dir=cfg.cache_dir)
    full = pd.read_csv(cohort)
    want = pipe._label_subsample(full, full["split"].eq("train").to_numpy(), 0.3, cfg.seed)
    assert set(seen) == {int(want.sum())} and want.sum() < full["split"].eq("train").sum()

    # a test-only table: the mean predictor still uses the training mean the model stored; the TBV baseline,
    # fitted on the table's training rows, is named as missing (both were dropped in silence)
    only_test = full[full["split"] == "test"].assign(t1=lambda f: [str(cohort.parent / p) for p in f["t1"]])
    only_test.to_csv(tmp_path / "only_test.csv", index=False)
    ev = pipe.evaluate(run / "model", tmp_path / "only_test.csv", tmp_path / "eval_ot", n_bootstrap=5,
                       cache_dir=cfg.cache_dir)
    ot = json.loads((ev / "metrics.json").read_text())
    assert ot["tasks"]["age"]["predict_train_mean_mae"] == pytest.approx(metrics["tasks"]["age"]["predict_train_mean_mae"])
    assert set(ot["tbv_baseline_skipped"]) == set(ot["tasks"]) and "tbv_baseline" not in ot["tasks"]["age"]

    # predict: a folder with one good and one corrupt file
    scans = tmp_path / "scans"
    scans.mkdir()
    good = pd.read_csv(cohort)["t1"][0]
    (scans / "good.nii.gz").write_bytes((cohort.parent / good).read_bytes())
    (scans / "bad.nii.gz").write_bytes(b"not a nifti")
    out_csv = tmp_path / "preds.csv"
    frame, failures = pipe.predict(run / "model", scans, out_csv, progress=False, cache_dir=cfg.cache_dir)
    assert len(frame) == 1 and len(failures) == 1 and "bad.nii.gz" in failures[0][0]
    cols = set(pd.read_csv(out_csv).columns)
    assert {"brain_age", "brain_age_corrected", "brain_age_lo", "brain_age_hi", "dx_ad", "dx_ad_p_AD",
            "dx_ad_set", "dx_ad_experts", "sex_experts"} <= cols
    # copies of one scan under other names get one prediction set (the APS draw was seeded by the file name)
    copies = tmp_path / "copies"
    copies.mkdir()
    for name in "abcdefgh":
        (copies / f"{name}.nii.gz").write_bytes((cohort.parent / good).read_bytes())
    same, _ = pipe.predict(run / "model", copies, tmp_path / "copies.csv", progress=False, cache_dir=cfg.cache_dir)
    set_cols = [c for c in same.columns if c.endswith("_set")]
    assert set_cols and (same[set_cols].nunique() == 1).all(), same[set_cols]
    rc = cli_main(["predict", "--family", "denseformer", "--model", str(run / "model"), "--input", str(scans),
                   "--output", str(tmp_path / "p2.csv"), "--no-progress", "--cache", cfg.cache_dir])
    assert rc == 1 and (tmp_path / "p2.csv").is_file()
    with pytest.raises(InputError):
        pipe.predict(run / "model", scans, tmp_path / "p3.csv", strict=True, progress=False,
                     cache_dir=cfg.cache_dir)
    assert not (tmp_path / "p3.csv").exists()
    # a failed rerun onto an earlier run's output leaves no predictions of that run under its name
    (scans / "good.nii.gz").unlink()
    (scans / "bad2.nii.gz").write_bytes(b"not a nifti either")
    for strict in (False, True):
        with pytest.raises(InputError):
            pipe.predict(run / "model", scans, tmp_path / "p2.csv", strict=strict, progress=False,
                         cache_dir=cfg.cache_dir)
        assert not (tmp_path / "p2.csv").exists()
        assert (tmp_path / "p2_failures.csv").exists() is not strict
    # predicting from a manifest gives brain-age gaps (age known)
    frame, failures = pipe.predict(run / "model", cohort, tmp_path / "p4.csv", progress=False,
                                   cache_dir=cfg.cache_dir)
    assert not failures and frame["brain_age_gap"].notna().all()
    # two sessions of one subject: the output tells them apart
    long = pd.read_csv(cohort).head(2).assign(subject="sub-long", session=["ses-1", "ses-2"])
    long["t1"] = [str(cohort.parent / p) for p in long["t1"]]
    long.to_csv(tmp_path / "long.csv", index=False)
    frame, _ = pipe.predict(run / "model", tmp_path / "long.csv", tmp_path / "p5.csv", progress=False,
                            cache_dir=cfg.cache_dir)
    assert pd.read_csv(tmp_path / "p5.csv")[["subject", "session"]].values.tolist() == [
        ["sub-long", "ses-1"], ["sub-long", "ses-2"]]
    # an output that is the manifest (or a scan) it reads is refused before any work; the input is intact
    before = (tmp_path / "long.csv").read_bytes()
    for out in (tmp_path / "long.csv", tmp_path / "." / "long.csv", Path(long["t1"][0])):
        with pytest.raises(InputError, match="overwrite the input"):
            pipe.predict(run / "model", tmp_path / "long.csv", out, progress=False, cache_dir=cfg.cache_dir)
    assert (tmp_path / "long.csv").read_bytes() == before
    # an Analyze pair is named as what it is (not "not a manifest")
    import nibabel as nib

    nib.save(nib.AnalyzeImage(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "scan.img")
    for f in ("scan.img", "scan.hdr"):
        with pytest.raises(InputError, match="not a NIfTI file name"):
            pipe.predict(run / "model", tmp_path / f, tmp_path / "p6.csv", progress=False)
    assert not (tmp_path / "p6.csv").exists()


def test_volume_stem_pretrain_then_finetune(cohort, tmp_path):
    """``model.backbone.stem: volume`` reaches MAE and fine-tuning, is saved with the model, and a patch-stem
    fine-tune refuses the volume-stem encoder; an edited model config is refused when loaded."""
    cfg = _cfg(tmp_path, **{"model.backbone.stem": "volume", "model.backbone.block_layers": "[2,2]",
                            "finetune.refit_heads": "true"})
    mae_run = pipe.pretrain(cohort, tmp_path / "mae", cfg)
    cfg.finetune.pretrained = str(mae_run / "model")
    run = pipe.train(cohort, tmp_path / "ft", cfg)
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["kwargs"]["stem"] == "volume"
    assert set(meta["extra"]["head_refit"]) == {"age", "sex", "dx_ad", "dx_pd"}
    # the encoder it started from, by weights: a shipped model folder carries no paths of the training machine
    assert meta["extra"]["pretrained"] == weights_digest(mae_run / "model")
    assert str(tmp_path) not in (run / "model" / "config.json").read_text()
    model, _ = pipe._load_multitask(run / "model")
    assert model.backbone.stem_type == "volume"
    patch_cfg = _cfg(tmp_path)
    patch_cfg.finetune.pretrained = str(mae_run / "model")
    with pytest.raises(ModelFormatError, match="does not match"):
        pipe.train(cohort, tmp_path / "ft_patch", patch_cfg)
    # an edited config: a missing key is one error naming it (it was a KeyError blamed on every scan), and
    # class names that no longer match the head are refused (every scan was labelled with the wrong class)
    for key, edit in (("calibration", lambda m: m["extra"].pop("calibration")),
                      ("do not match the model's output heads",
                       lambda m: m["tasks"][[t["name"] for t in m["tasks"]].index("dx_ad")]["classes"].pop())):
        edited = shutil.copytree(run / "model", tmp_path / f"edited_{len(key)}")
        m = json.loads((edited / "config.json").read_text())
        edit(m)
        (edited / "config.json").write_text(json.dumps(m))
        with pytest.raises(ModelFormatError, match=key):
            pipe._load_multitask(edited)


def test_finetune_refuses_test_scans_that_mae_pretraining_saw(cohort, tmp_path):
    """Without a split column each step splits by its seed: a fine-tune with another seed than the MAE's would
    test on scans the encoder was pretrained on, so it is refused; the same seed is fine."""
    manifest = tmp_path / "nosplit.csv"
    table = pd.read_csv(cohort).drop(columns="split")
    table["t1"] = [str(cohort.parent / p) for p in table["t1"]]
    table.to_csv(manifest, index=False)
    cfg = _cfg(tmp_path, **{"pretrain.max_steps": 1, "train.max_steps": 1})
    mae_run = pipe.pretrain(manifest, tmp_path / "mae", cfg)
    other = _cfg(tmp_path, **{"train.max_steps": 1})
    other.seed = 1
    other.finetune.pretrained = str(mae_run / "model")
    with pytest.raises(InputError, match="used for MAE pretraining"):
        pipe.train(manifest, tmp_path / "ft_leak", other)
    assert not (tmp_path / "ft_leak" / "model").exists()
    cfg.finetune.pretrained = str(mae_run / "model")
    assert (pipe.train(manifest, tmp_path / "ft", cfg) / "model" / "config.json").is_file()
    # the MAE's inputs count as fitted even where the fine-tuning table lacks them: evaluate then refuses them
    # as test on any table (only the fine-tuning scans were stored)
    table = pd.read_csv(manifest).assign(split=assign_splits(pd.read_csv(manifest), seed=cfg.seed).to_numpy())
    dropped = table[table["split"] == "train"].head(3)
    table.drop(dropped.index).to_csv(tmp_path / "fewer.csv", index=False)
    ft = json.loads((pipe.train(tmp_path / "fewer.csv", tmp_path / "ft2", cfg) / "model" / "config.json").read_text())
    assert pipe.scan_fingerprints(dropped["t1"]) <= set(ft["extra"]["fit_fingerprints"])


def test_cli_train_scratch_shared_head_and_bad_pretrained(cohort, tmp_path):
    rc = cli_main(["train", "--family", "denseformer", "--config", "tiny", "--data", str(cohort),
                   "--out", str(tmp_path / "ft"), "--head", "shared", "--label-fraction", "0.5",
                   "--cache", str(tmp_path / "cache"), "--device", "cpu"])
    assert rc == 0
    meta = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert meta["extra"]["head"] == "shared" and meta["extra"]["n_train"] < 18
    rc = cli_main(["train", "--family", "denseformer", "--config", "tiny", "--data", str(cohort),
                   "--out", str(tmp_path / "ft2"), "--pretrained", str(tmp_path / "ft" / "model"),
                   "--cache", str(tmp_path / "cache")])
    assert rc == 2  # a fine-tuned model is not an MAE encoder: one-line error, exit 2


def test_head_refit_replaces_an_untrained_output_layer_and_keeps_a_good_one() -> None:
    """A classification layer left at chance by SGD is replaced by the closed-form fit (its outputs then equal
    the fitted logistic model's); a regression layer that is already right is kept."""
    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("sex", "classification", "sex", ["F", "M"])]
    rng = np.random.default_rng(0)
    n, d = 120, 48
    X = rng.normal(size=(n, d))
    sex = (X[:, 3] + 0.3 * rng.normal(size=n) > 0).astype(float)
    age = 60 + 10 * X[:, 5]
    train, val = np.arange(n) < 80, np.arange(n) >= 80
    model = types.SimpleNamespace(head=types.SimpleNamespace(out=torch.nn.ModuleDict(
        {"age": torch.nn.Linear(d, 1), "sex": torch.nn.Linear(d, 2)})))
    with torch.no_grad():
        model.head.out["age"].weight.zero_()
        model.head.out["age"].weight[0, 5] = 1.0  # (age − 60) / 10 exactly: nothing to improve
        model.head.out["age"].bias.zero_()
        model.head.out["sex"].weight.zero_()
        model.head.out["sex"].bias.zero_()
    feats = {"age": X, "sex": X}
    rep = pipe._refit_heads(model, feats, {"age": age, "sex": sex}, train, val, tasks, {"age": (60.0, 10.0)})
    assert rep["sex"]["refit"] and rep["sex"]["val_loss_refit"] < 0.5 < rep["sex"]["val_loss_sgd"]
    assert not rep["age"]["refit"] and model.head.out["age"].weight[0, 5] == 1.0
    with torch.no_grad():
        p = model.head.out["sex"](torch.as_tensor(X[val], dtype=torch.float32)).softmax(-1)[:, 1].numpy()
    assert np.mean((p > 0.5) == sex[val]) >= 0.8  # chance 0.5; the SGD layer (all zeros) gives 0.5
    X[0, 0] = np.nan  # a non-finite representation leaves every layer as trained, with the reason
    before = model.head.out["sex"].weight.clone()
    rep = pipe._refit_heads(model, {"age": X, "sex": X}, {"age": age, "sex": sex}, train, val, tasks,
                            {"age": (60.0, 10.0)})
    assert not rep["sex"]["refit"] and "non-finite" in rep["sex"]["why"]
    assert torch.equal(model.head.out["sex"].weight, before)


def test_age_bias_correction_only_where_a_bias_is_there() -> None:
    """A model that regresses to the mean (slope 0.5) is corrected back onto the ages; a model that barely
    tracks age (or not at all) is left as it is instead of being stretched by 1/slope."""
    rng = np.random.default_rng(0)
    age = rng.uniform(45, 80, 40)
    shrunk = 0.5 * age + 31 + rng.normal(0, 1.0, 40)
    bias = pipe._age_bias(age, shrunk)
    assert bias is not None and bias["slope"] == pytest.approx(0.5, abs=0.05)
    corrected = pipe._corrected_age(shrunk, {"bias": bias})
    assert np.abs(corrected - age).mean() < np.abs(shrunk - age).mean() / 2
    flat = 62 + 0.08 * (age - 62) + rng.normal(0, 3.0, 40)  # weak slope: correcting would multiply noise by 12
    assert pipe._age_bias(age, flat) is None
    assert pipe._age_bias(age, rng.normal(62, 5, 40)) is None
    assert pipe._age_bias(age, np.full(40, 62.0)) is None


def test_bias_corrected_age_intervals_keep_their_coverage() -> None:
    """The conformal interval on the bias-corrected age covers new subjects at the nominal level even with a
    small validation set: calibrating on residuals corrected by the line fitted on those same subjects
    under-covers (≈ 0.74 here at nominal 0.80); leave-one-out residuals do not."""
    from neuromoe.eval.conformal import ConformalRegressor

    rng = np.random.default_rng(0)
    tasks = [TaskSpec("age", "regression", "age")]
    n, alpha, coverage = 12, 0.2, []
    for _ in range(300):
        age = rng.uniform(45, 80, n + 100)
        pred = 0.5 * age + 31 + rng.normal(0, 3.0, n + 100)  # regression to the mean, as small models do
        cal = pipe._calibrate({"age": pred[:n]}, {"age": age}, np.arange(n), tasks, pipe.EvalSection(alpha=alpha),
                              np.arange(n + 100))
        if "bias" not in cal["age"]:  # 2 of 300 draws: slope not significant at n = 12, nothing corrected
            continue
        lo, hi = ConformalRegressor.from_dict(cal["age"]["conformal"]).predict(
            pipe._corrected_age(pred[n:], cal["age"]))
        coverage.append(np.mean((age[n:] >= lo) & (age[n:] <= hi)))
    exact = 1 - np.floor(alpha * (n + 1)) / (n + 1)  # split-conformal coverage with n calibration points
    assert len(coverage) > 280
    assert exact - 0.02 < np.mean(coverage) < exact + 0.04


def test_paper_preset_preprocesses_to_its_backbone_input_and_cuda_without_gpu_is_a_config_error():
    """The paper preset had no preprocessing section: 2 mm / 64³ zero-padded into the 160×192×160 input."""
    cfg = pipe.load_denseformer_config("paper")
    spec = pipe._spec(cfg)
    assert spec.spacing == (1.0, 1.0, 1.0) and spec.shape == pipe._img_size(cfg) == (160, 192, 160)
    assert spec.register  # real T1s lie in the scanner's pose (docs/experiments.md, "Heads off the template's pose")
    if not torch.cuda.is_available():  # evaluate/predict crashed with a raw traceback here
        with pytest.raises(ConfigError, match="no CUDA"):
            pipe._device("cuda")


def test_tasks_without_any_label_are_dropped_not_trained_as_untrained_heads(cohort, tmp_path, capsys):
    """A UK Biobank manifest (age, sex, site; no dx columns): the preset's dx_ad/dx_pd tasks are dropped with a
    notice, so neither the model nor predict reports diagnoses from heads that never saw a label."""
    ukb = pd.read_csv(cohort).drop(columns=["dx_ad", "dx_pd"])
    ukb["t1"] = [str((cohort.parent / p).resolve()) for p in ukb["t1"]]  # the manifest's paths are relative to it
    ukb.to_csv(tmp_path / "ukb.csv", index=False)
    out = pipe.train(tmp_path / "ukb.csv", tmp_path / "ft", _cfg(tmp_path))
    assert "task 'dx_ad' dropped" in capsys.readouterr().err
    meta = json.loads((out / "model" / "config.json").read_text())
    assert [t["name"] for t in meta["tasks"]] == ["age", "sex"]
    assert "dx_ad" not in (out / "config.yaml").read_text()
    frame, _ = pipe.predict(out / "model", tmp_path / "ukb.csv", tmp_path / "p.csv", device="cpu", progress=False)
    assert not any(c.startswith("dx_") for c in frame.columns)
    none = ukb.drop(columns=["age", "sex"])
    none.to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(InputError, match="no training subject has a label of any task"):
        pipe.train(tmp_path / "none.csv", tmp_path / "ft2", _cfg(tmp_path))


def test_label_fraction_counts_subjects_not_sessions():
    """--label-fraction 0.3 on three sessions per subject keeps 30 % of the subjects with all their sessions (it
    kept 30 % of the rows, splitting subjects between labelled and unlabelled)."""
    table = pd.DataFrame({"subject": [f"s{i // 3}" for i in range(60)], "session": [f"ses-{i % 3}" for i in range(60)],
                          "cohort": ["adni"] * 30 + ["ppmi"] * 30})
    keep = pipe._label_subsample(table, np.ones(60, bool), 0.3, seed=0)
    per_subject = pd.Series(keep).groupby(table["subject"]).agg(["all", "any"])
    assert (per_subject["all"] == per_subject["any"]).all()
    kept = table.loc[keep].drop_duplicates("subject")
    assert kept["cohort"].value_counts().to_dict() == {"adni": 3, "ppmi": 3}  # ceil(0.3 × 10) per cohort


def test_loose_bids_named_files_are_predicted_under_their_subject_and_session():
    """predict --input folder/: sub-01_ses-2_T1w.nii.gz is subject sub-01, session ses-2 (it was 'sub-01_ses-2_T1w',
    which joins no participants table); other names, and BIDS names that would collide, keep the file stem."""
    table = pipe._file_table([Path("d/sub-01_ses-2_T1w.nii.gz"), Path("d/sub-01_ses-3_run-1_T1w.nii"),
                              Path("d/scan7.nii.gz")])
    assert table[["subject", "session"]].fillna("").values.tolist() == [["sub-01", "ses-2"], ["sub-01", "ses-3"],
                                                                        ["scan7", ""]]
    assert table["run"].fillna("").tolist() == ["", "1", ""]  # bare, as a BIDS folder gives it (was "run-1")
    clash = pipe._file_table([Path("d/sub-01_T1w.nii.gz"), Path("d/sub-01_acq-hi_T1w.nii.gz")])
    assert clash["subject"].tolist() == ["sub-01_T1w", "sub-01_acq-hi_T1w"]


def test_a_bids_folder_with_a_stray_top_level_scan_is_read_as_bids(tmp_path, capsys):
    """One group template at the top of a BIDS root made predict score that file alone (40 scans skipped)."""
    import nibabel as nib

    for sub in ("sub-01", "sub-02"):
        (tmp_path / sub / "anat").mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / sub / "anat" / f"{sub}_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "group_mean_T1w.nii.gz")
    table = pipe._prediction_inputs(tmp_path)
    assert table["subject"].tolist() == ["sub-01", "sub-02"]
    assert "1 NIfTI file(s) at the top of the BIDS folder" in capsys.readouterr().err
    assert pipe._prediction_inputs(tmp_path / "sub-01" / "anat")["subject"].tolist() == ["sub-01"]  # loose files


def test_conformal_calibration_uses_one_session_per_validation_subject():
    """Five sessions of one subject are one calibration point, not five (their errors are shared)."""
    rng = np.random.default_rng(0)
    subjects = np.repeat([f"sub-{i}" for i in range(12)], [5] + [1] * 11)  # 16 rows, 12 subjects
    age = np.repeat(rng.uniform(50, 80, 12), [5] + [1] * 11)
    pred = {"age": age + rng.normal(0, 3, 16), "dx": rng.dirichlet(np.ones(2), 16)}
    labels = {"age": age, "dx": rng.integers(0, 2, 16)}
    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("dx", "classification", "dx", ["a", "b"])]
    cal = pipe._calibrate(pred, labels, np.arange(16), tasks, pipe.EvalSection(), subjects)
    assert cal["age"]["conformal"]["n_calib"] == 12 and cal["dx"]["conformal"]["n_calib"] == 12


def test_leave_one_out_bias_correction_leaves_out_the_whole_subject():
    """A longitudinal subject's other sessions must not help fit the line that corrects it."""
    from scipy.stats import linregress

    rng = np.random.default_rng(0)
    age = np.r_[np.full(5, 60.0), rng.uniform(45, 80, 10)]
    pred = 0.6 * age + 25 + np.r_[np.full(5, 8.0), rng.normal(0, 2, 10)]  # sub-0: 5 sessions, 8 y off
    subjects = np.r_[np.zeros(5), np.arange(1, 11)].astype(int).astype(str)
    line = linregress(age[5:], pred[5:])
    out = pipe._loo_corrected_age(age, pred, {"slope": 0.6, "intercept": 25.0}, subjects)
    np.testing.assert_allclose(out[:5], (pred[:5] - line.intercept) / line.slope)
    rows = pipe._loo_corrected_age(age, pred, {"slope": 0.6, "intercept": 25.0}, np.arange(15).astype(str))
    assert abs(rows[0] - age[0]) < abs(out[0] - age[0])  # per row, its own sessions shrink its residual


def test_too_few_validation_subjects_for_the_coverage_level_are_reported(capsys) -> None:
    """8 validation subjects cannot give a 90 % split-conformal interval (9 needed): the calibrator is
    unbounded, as it must be, and training says so once per task instead of writing ±inf silently."""
    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("sex", "classification", "sex", ["F", "M"])]
    rng = np.random.default_rng(0)
    for n, warned in ((8, True), (9, False)):
        age = rng.uniform(50, 80, n)
        probs = rng.dirichlet([1, 1], n)
        cal = pipe._calibrate({"age": age + rng.normal(0, 3, n), "sex": probs},
                              {"age": age, "sex": rng.integers(0, 2, n)}, np.arange(n), tasks,
                              pipe.EvalSection(alpha=0.1), np.array([f"s{i}" for i in range(n)]))
        err = capsys.readouterr().err
        assert math.isinf(cal["age"]["conformal"]["q"]) is warned
        assert ("'age' conformal interval is unbounded: 8 validation subjects" in err) is warned
        assert ("'sex' conformal sets hold every class" in err) is warned


def test_figures_name_the_split_and_mask_ratio_they_show(tmp_path, monkeypatch) -> None:
    """Evaluation figures on `--split val` said "test", and the MAE figure said 75 % at any mask ratio."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from neuromoe.eval.report import Report
    from neuromoe.models.registry import create_model

    titles: list[str] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (
        titles.extend(ax.get_title() for ax in self.axes), save(self, *a, **k))[1])
    section = Report("x").section("y")
    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("dx", "classification", "dx", ["CN", "AD"])]
    n = 6
    frame = pd.DataFrame({"subject": list("abcdef"), "age": np.arange(n) + 60.0, "age_pred": np.arange(n) + 61.0,
                          "age_corrected": np.arange(n) + 60.5})
    metrics = {"split": "val", "n": n, "tasks": {"age": {"model": {"mae": (1.0, 0.5, 1.5)}},
                                                "dx": {"model": {"auc": (0.7, 0.5, 0.9)}}}}
    pred = {"age": np.arange(n) + 61.0, "dx": np.c_[1 - np.linspace(0, 1, n), np.linspace(0, 1, n)]}
    pipe._add_evaluation(section, metrics, frame, tasks, pred, np.ones(n, bool),
                         {"dx": np.array([0, 1, 0, 1, 0, 1]), "age": frame["age"].to_numpy()})
    captions = [item["caption"] for item in section.items if item["kind"] == "figure"]
    assert all("test" not in c for c in captions) and any("val subjects" in c for c in captions)
    assert "brain age (val, n=6)" in titles

    titles.clear()
    torch.manual_seed(0)
    mae = create_model("denseformer_mae", preset="tiny", mask_ratio=0.5)
    images = [{"image": torch.randn(1, 32, 32, 32)} for _ in range(2)]
    pipe._reconstruction_figure(mae, images, tmp_path / "recon.png", seed=0)
    assert {t.split(" ·")[0] for t in titles} == {"input", "masked (50 %)", "reconstruction"}


def test_an_encoder_pretrained_with_other_attention_heads_is_refused(tmp_path) -> None:
    """qkv/proj have the same shapes for any number of heads, so a strict load took a 4-head MAE into a
    2-head backbone and split every attention layer's weights differently."""
    from neuromoe.models.registry import create_model, save_model

    tasks = [{"name": "age", "type": "regression", "num_outputs": 1}]
    for heads in (2, 4):  # the tiny preset has 2
        save_model(create_model("denseformer_mae", preset="tiny", num_heads=heads), tmp_path / f"mae{heads}",
                   {"family": "denseformer", "extra": {"kind": "mae"}})
    pipe._load_pretrained(create_model("denseformer_tiny", tasks=tasks), tmp_path / "mae2")
    with pytest.raises(ModelFormatError, match="does not match"):
        pipe._load_pretrained(create_model("denseformer_tiny", tasks=tasks), tmp_path / "mae4")


@pytest.mark.parametrize("fraction", [0.0, -0.5, float("nan"), 1.5])
def test_a_label_fraction_outside_0_1_is_a_config_error(fraction, tmp_path) -> None:
    """0 and negative values trained on one subject per cohort (the report said '0 %'); NaN crashed."""
    from neuromoe.errors import ConfigError

    cfg = pipe.load_denseformer_config("tiny")
    cfg.finetune.label_fraction = fraction
    with pytest.raises(ConfigError, match=r"finetune\.label_fraction"):
        pipe.train(tmp_path / "nothing.csv", tmp_path / "out", cfg)
    with pytest.raises(ConfigError, match=r"finetune\.label_fraction"):
        pipe.load_denseformer_config("tiny", [f"finetune.label_fraction={fraction}"])


def test_mae_validation_loss_does_not_depend_on_the_batching():
    """The validation masks were seeded by each batch's first item, so the monitored loss moved with the batch
    size and the DDP ranks (1.0851 at batch 4, 1.0867 at batch 1 on the same weights)."""
    from neuromoe.models import create_model

    torch.manual_seed(0)
    tr = pipe.MAETrainer.__new__(pipe.MAETrainer)
    tr.model = create_model("denseformer_mae", preset="tiny").eval()
    image, index = torch.randn(4, 1, 32, 32, 32), torch.arange(10, 14)
    with torch.no_grad():
        got = []
        for bs in (1, 2, 4):
            outs = [tr.validation_step({"image": image[i : i + bs], "index": index[i : i + bs]})
                    for i in range(0, 4, bs)]
            got.append(sum(o["loss"] * o["n"] for o in outs) / 4)
    assert got == pytest.approx([got[2]] * 3, rel=1e-6)


def test_predictions_far_outside_the_training_range_are_flagged(capsys) -> None:
    """Uniform noise got brain age -24 y and a mask given as a T1 9.9 y, written like any other prediction."""
    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("sex", "classification", "sex", ["F", "M"])]
    extra = {"calibration": {}, "target_stats": {"age": (60.0, 8.0)}}
    res = {"age": np.array([-24.0, 63.0]), "sex": np.array([[0.4, 0.6], [0.7, 0.3]])}
    odd, fine = (pipe._prediction_row(res, i, tasks, extra, None) for i in (0, 1))
    assert "brain_age -24.0 is -10.5 SD from the training mean" in odd["warning"]
    assert fine["warning"] == ""  # the column is always there: one CSV schema whatever the scans


def test_pipeline_calls_leave_the_callers_random_streams_alone(cohort, tmp_path):
    """Training seeded Python, NumPy and torch from its config and left them so: a notebook looping over configs
    after np.random.seed(s) drew the same numbers after every call; loading a model consumed torch's stream."""
    import random

    from neuromoe.models.registry import load_model

    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    def seed(s: int) -> None:
        random.seed(s), np.random.seed(s), torch.manual_seed(s)

    seed(5)
    expected = draws()
    seed(5)
    run = pipe.pretrain(cohort, tmp_path / "mae", _cfg(tmp_path, **{"pretrain.max_steps": 1}))
    assert draws() == expected
    seed(5)
    load_model(run / "model")
    assert draws() == expected
    from neuromoe.pipelines import brainmoe, mome

    for module in (pipe, mome, brainmoe):  # every entry point, as pretrain above
        for verb in ("pretrain", "train", "evaluate", "demo"):
            assert hasattr(getattr(module, verb), "__wrapped__"), (module.__name__, verb)


def test_a_dropped_task_names_a_label_column_that_differs_only_in_case(capsys):
    """'Age' in the manifest: the age task was dropped with "no training subject has a 'age' label", and the
    model trained without it; the notice now points at the column."""
    table = pd.DataFrame({"Age": [60.0, 70.0], "sex": ["F", "M"]})
    tasks = [TaskSpec("age", "regression", "age"), TaskSpec("sex", "classification", "sex", ["F", "M"])]
    kept = pipe._learnable_tasks(table, tasks, np.array([True, True]), "m.csv")
    assert [t.name for t in kept] == ["sex"]
    assert "the table has 'Age': column names are case-sensitive" in capsys.readouterr().err


def test_volumes_past_the_memory_budget_are_read_back_from_the_cache(cohort, tmp_path, capsys, monkeypatch):
    """A cohort whose float16 stack does not fit (UK Biobank at 1 mm: ~10 MB a scan; all volumes were stacked in
    memory, through a float32 list at 5x the peak) is read back from the preprocessing cache per item: the same
    items, the same trained weights and the same evaluation as in memory."""
    from safetensors.torch import load_file

    from neuromoe.data import structural

    cfg = _cfg(tmp_path)
    table, tasks = pipe._resolve_table(cohort)[0], cfg.finetune.tasks
    args = (table, tasks, pipe._spec(cfg), pipe._img_size(cfg))
    held = structural.StructuralDataset(*args, cache=pipe._cache(cfg), in_memory=True)
    monkeypatch.setattr(structural, "memory_budget", lambda: 0.0)
    read = structural.StructuralDataset(*args, cache=pipe._cache(cfg))  # past the (patched) budget
    assert isinstance(held.images, np.ndarray) and isinstance(read.images, structural.DiskVolumes)
    assert "read back from the preprocessing cache per item" in capsys.readouterr().err
    # asked for, but with no cache to read them back from: held in memory, and said (not preprocessed every epoch)
    alone = structural.StructuralDataset(*args, cache=None, in_memory=False)
    assert isinstance(alone.images, np.ndarray) and "no usable preprocessing cache" in capsys.readouterr().err
    rows = np.arange(len(table)) % 3 == 0
    assert held.subset(rows).images is held.images  # a subset indexes its parent's stack (copies tripled the memory)
    keyed, key = [], type(read.images.cache).key
    monkeypatch.setattr(type(read.images.cache), "key", lambda *a: keyed.append(a) or key(*a))
    for a, b in zip(held.subset(rows), read.subset(rows), strict=True):
        assert torch.equal(a["image"], b["image"]) and a["index"] == b["index"]
    assert not keyed  # an item reads its cache entry, not its scan (keyed once, at construction)
    for f in Path(read.images.cache.root).glob(f"{read.images.keys[0]}.*"):  # an entry gone: preprocessed again
        f.unlink()
    assert np.array_equal(read.images[0], held.images[0])
    on_disk = pipe.train(cohort, tmp_path / "disk", _cfg(tmp_path, in_memory="false"))
    monkeypatch.setattr(structural, "memory_budget", lambda: math.inf)
    in_ram = pipe.train(cohort, tmp_path / "ram", _cfg(tmp_path))
    w_disk, w_ram = load_file(on_disk / "model" / "model.safetensors"), load_file(in_ram / "model" / "model.safetensors")
    assert all(torch.equal(w_disk[k], w_ram[k]) for k in w_ram)
    monkeypatch.setattr(structural, "memory_budget", lambda: 0.0)  # evaluate's own dataset (and TBV) from the cache
    ev = pipe.evaluate(on_disk / "model", cohort, tmp_path / "ev_disk", device="cpu", n_bootstrap=10,
                       cache_dir=cfg.cache_dir)
    monkeypatch.setattr(structural, "memory_budget", lambda: math.inf)
    ev_ram = pipe.evaluate(in_ram / "model", cohort, tmp_path / "ev_ram", device="cpu", n_bootstrap=10,
                           cache_dir=cfg.cache_dir)
    assert (ev / "metrics.json").read_text() == (ev_ram / "metrics.json").read_text()
