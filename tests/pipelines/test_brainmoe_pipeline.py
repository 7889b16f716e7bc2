"""BrainMoE pipeline on a tiny synthetic fMRI cohort: pretrain → train → predict → embed → evaluate."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuromoe.data.synth import synth_cohort
from neuromoe.errors import InputError
from neuromoe.eval.report import load_section
from neuromoe.models import load_model
from neuromoe.models.registry import weights_digest
from neuromoe.pipelines import brainmoe as bm

N_ROIS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("bm_cohort")
    synth_cohort(out, n_structural=0, n_lesion=0, n_fmri=24, n_rois=N_ROIS, n_timepoints=48, progress=False)
    return out


def _cfg(**over):
    cfg = bm.load_brainmoe_config("tiny", device="cpu", seed=0)
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.fixture(scope="module")
def pretrained(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("bm_pre")
    return bm.pretrain(cohort, out, _cfg())


def test_pretrain_writes_one_expert_per_state_and_the_pooled_one(pretrained):
    manifest = json.loads((pretrained / "experts.json").read_text())
    assert manifest["states"] == ["emotion", "language", "motor", "rest", "wm"]
    assert manifest["pooled"] == "pooled" and manifest["kind"] == "state_clf"
    assert manifest["fc"]["n_rois"] == N_ROIS and manifest["fc"]["kind"] == "pearson"
    model, meta = load_model(pretrained / "experts" / "wm")
    assert meta["extra"]["state"] == "wm" and model.n_states == 2
    pooled, meta = load_model(pretrained / "experts" / "pooled")
    assert pooled.n_states == 5 and meta["extra"]["states"] == manifest["states"]


def test_commands_hold_a_chunk_of_series_at_a_time_and_none_while_experts_train(
    cohort, pretrained, tmp_path, monkeypatch
):
    """Only the FC matrices (and crops) are trained on: the ROI series are read a chunk at a time and let go
    (HCP: ~1.3 MB of series a rest run against 0.3 MB of FC at 264 ROIs); a whole cohort's were held at once."""
    import gc
    import weakref

    from neuromoe.data import fmri

    read, alive, peak = fmri.scan_timeseries, [], [0]

    def scan_timeseries(*args, **kwargs):
        gc.collect()
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        x = read(*args, **kwargs)
        alive.append(weakref.ref(x))
        return x

    fit = bm.ExpertTrainer.fit_best

    def fit_best(self, *args, **kwargs):
        gc.collect()
        assert alive and not any(r() is not None for r in alive)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(bm, "_READ_CHUNK", 3)
    monkeypatch.setattr(fmri, "scan_timeseries", scan_timeseries)
    monkeypatch.setattr(bm.ExpertTrainer, "fit_best", fit_best)
    bm.pretrain(cohort, tmp_path / "pre", _cfg(), states=["rest"], pooled=False)
    assert len(alive) > 6 and peak[0] <= 2 * 3  # the chunk being read, and the one its loop still names
    alive.clear()
    peak[0] = 0
    csv, _ = bm.embed(pretrained / "experts" / "rest", cohort, tmp_path / "emb.csv")
    assert len(alive) == len(pd.read_csv(csv)) > 6 and peak[0] <= 3  # the batch path keeps no chunk list


@pytest.mark.parametrize("kind", ["pearson", "tangent"])
def test_fc_read_in_chunks_equals_fc_of_the_whole_cohort_at_once(cohort, monkeypatch, kind):
    """The chunked reading (ROI count, tangent reference from the chunks' covariances, FC) gives the matrices
    of every series in memory at once."""
    from neuromoe.data.connectivity import tangent_reference
    from neuromoe.data.fmri import scan_timeseries

    table = bm.load_scans(cohort)
    ts = [scan_timeseries(r) for _, r in table.iterrows()]
    monkeypatch.setattr(bm, "_READ_CHUNK", 5)  # 24 scans: four full chunks and a short one
    spec = bm.FCSpec(kind, True, 0)
    if kind == "tangent":
        from neuromoe.data.connectivity import geometric_mean

        spec.reference = geometric_mean(bm._model_inputs(table, spec, cohort, covariances=True)["cov"]).tolist()
        np.testing.assert_allclose(spec.reference, tangent_reference(ts), rtol=1e-10, atol=1e-12)
    fc = bm._model_inputs(table, spec, cohort)["fc"]
    assert spec.n_rois == N_ROIS and fc.dtype == np.float32
    np.testing.assert_array_equal(fc, bm._fc(ts, spec))


def test_pretraining_report_lists_the_experts_of_every_call(cohort, tmp_path):
    """'neuromoe report' of a pretraining folder (it said "nothing to report"); an expert added by a later
    call with other --states joins the table and the curves."""
    from neuromoe.eval.report import build_report

    out = bm.pretrain(cohort, tmp_path / "pre", _cfg(), states=["rest"], pooled=False)
    bm.pretrain(cohort, out, _cfg(), states=["wm"], pooled=False)
    section = load_section(out)
    table = next(i for i in section.items if i["kind"] == "table")
    rows = [dict(zip(table["columns"], r)) for r in table["rows"]]
    assert [r["expert"] for r in rows] == ["rest", "wm"]
    assert all(int(r["scans"]) > 0 and np.isfinite(float(r["best val loss"])) for r in rows)
    assert sum(i["kind"] == "figure" for i in section.items) == 1
    assert "per-state expert pretraining" in build_report([out], tmp_path / "r.html").read_text()


def test_train_predict_embed_round_trip(cohort, pretrained, tmp_path):
    run = bm.train(cohort, tmp_path / "ft", _cfg(), experts=pretrained)
    model, meta = load_model(run / "model")  # rebuilt from config.json + safetensors only
    assert meta["extra"]["experts"] == ["emotion", "language", "motor", "rest", "wm"]
    # which experts it was built from, by weights, not by the training machine's folder
    assert meta["extra"]["experts_weights"]["wm"] == weights_digest(Path(pretrained) / "experts" / "wm")
    assert str(Path(pretrained).resolve()) not in (run / "model" / "config.json").read_text()
    assert meta["label_maps"]["phenotype"] == ["control", "patient"]
    assert model.freeze_experts and len(model.experts) == 5
    section = load_section(run)  # 'neuromoe report' of a fine-tuning run: setup and router preference
    assert section.title == "BrainMoE: router + adapter fine-tuning"
    assert [i["kind"] for i in section.items] == ["text", "table", "figure"]

    frame, failures = bm.predict(run / "model", cohort, tmp_path / "pred.csv")
    assert failures == [] and not (tmp_path / "pred_failures.csv").exists()
    saved = pd.read_csv(tmp_path / "pred.csv")
    assert len(saved) == len(frame) == len(bm.load_scans(cohort))
    probs = saved[["phenotype_p_control", "phenotype_p_patient"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert set(saved["phenotype"]) <= {"control", "patient"} and saved["age"].notna().all()
    assert all(len(t.split()) == 2 for t in saved["top_experts"])

    one = sorted(cohort.glob("sub-*/func/*_timeseries.npy"))[0]
    single, _ = bm.predict(run / "model", one, tmp_path / "one.csv")
    assert len(single) == 1

    csv, _ = bm.embed(run / "model", cohort / "manifests" / "fmri.csv", tmp_path / "emb.csv")
    emb = pd.read_csv(csv)
    assert list(emb.columns[:3]) == ["subject", "session", "state"] and emb.shape[1] == 3 + model.dim
    npy, _ = bm.embed(pretrained / "experts" / "rest", cohort, tmp_path / "emb.npy")
    arr = np.load(npy)
    ids = pd.read_csv(tmp_path / "emb_subjects.csv")
    assert arr.shape == (len(ids), model.dim) and np.isfinite(arr).all()

    # an output that is an input (the manifest, or the one series) is refused and the input left intact
    manifest = cohort / "manifests" / "fmri.csv"
    before = manifest.read_bytes()
    with pytest.raises(InputError, match="overwrite the input"):
        bm.predict(run / "model", manifest, manifest)
    with pytest.raises(InputError, match="overwrite the input"):
        bm.embed(run / "model", manifest, manifest)
    assert manifest.read_bytes() == before
    series = tmp_path / "series.npy"
    series.write_bytes(one.read_bytes())
    with pytest.raises(InputError, match="overwrite the input"):
        bm.predict(run / "model", series, series)
    import nibabel as nib

    nib.save(nib.AnalyzeImage(np.ones((8, 8, 8, 4), np.float32), np.eye(4)), tmp_path / "bold.img")
    for f in ("bold.img", "bold.hdr"):
        with pytest.raises(InputError, match="not a time-series file, a NIfTI file name"):
            bm.predict(run / "model", tmp_path / f, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()
    # every scan failing: an earlier run's predictions and embeddings under these names are removed
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        np.save(bad / f"b{i}.npy", np.zeros((40, 3)))
    for fn, name in ((bm.predict, "pred.csv"), (bm.embed, "emb.npy")):
        with pytest.raises(InputError, match="no scan could be"):
            fn(run / "model", bad, tmp_path / name)
        assert not (tmp_path / name).exists()
    assert not (tmp_path / "emb_subjects.csv").exists()


def test_evaluate_reports_brainmoe_and_pooled_baselines(cohort, pretrained, tmp_path):
    out = bm.evaluate(pretrained, cohort, tmp_path / "eval", _cfg())
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "config.yaml").is_file() and metrics["experts_adapted"] is _cfg().model.unfreeze_experts
    folds = pd.read_csv(out / "predictions.csv")["fold"]
    assert sorted(folds.unique()) == list(range(metrics["folds"]))
    assert set(metrics["summary"]) == {"BrainMoE", "pooled+MLP", "pooled+SVM", "chance"}
    for model in metrics["summary"].values():
        f1, sd = model["phenotype_f1_macro"]
        assert 0.0 <= f1 <= 1.0 and sd >= 0.0
        assert "age_mae" in model and "sex_accuracy" in model
    # chance, recomputed: each fold's majority training phenotype class, and its mean training age
    frame = pd.read_csv(out / "predictions.csv")
    y = frame["phenotype"].map({c: i for i, c in enumerate(metrics["classes"])}).to_numpy()
    keys = ["subject", "session", "state"]
    age = frame[keys].merge(bm.load_scans(cohort)[[*keys, "age"]], on=keys, how="left")["age"].to_numpy(float)
    for f, fold in enumerate(metrics["per_fold"]["chance"]):
        test, train = (frame["fold"] == f).to_numpy(), (frame["fold"] != f).to_numpy()
        majority = np.bincount(y[train]).argmax()
        assert fold["phenotype_accuracy"] == pytest.approx(np.mean(y[test] == majority))
        assert fold["age_mae"] == pytest.approx(np.mean(np.abs(age[test] - np.nanmean(age[train]))))
    assert metrics["folds"] == 2 and len(metrics["per_fold"]["BrainMoE"]) == 2
    assert not list((out / "folds").rglob("*.safetensors"))  # folds are never resumed: nothing to write
    assert sum(metrics["router"]["combinations"].values()) == metrics["n_scans"]
    corr = np.asarray(metrics["expert_embedding_correlation"])
    assert corr.shape == (5, 5) and np.allclose(np.diag(corr), 1.0)
    section = json.loads((out / "report" / "section.json").read_text())
    assert sum(item["kind"] == "figure" for item in section["items"]) == 3
    assert len(pd.read_csv(out / "predictions.csv")) == metrics["n_scans"]


@pytest.mark.parametrize("kind", ["fc_mae", "jepa"])
def test_single_state_pretraining_of_the_other_expert_kinds(cohort, tmp_path, kind):
    cfg = _cfg(expert__kind=kind)
    out = bm.pretrain(cohort, tmp_path / kind, cfg, states=["rest"], pooled=False)
    manifest = json.loads((out / "experts.json").read_text())
    assert manifest["states"] == ["rest"] and manifest["pooled"] is None
    _, meta = load_model(out / "experts" / "rest")
    assert meta["extra"]["expert_kind"] == kind and np.isfinite(meta["extra"]["best_val_loss"])
    if kind == "jepa":
        assert manifest["fc"]["n_timepoints"] == cfg.expert.window * cfg.expert.n_windows
    emb, failures = bm.embed(out / "experts" / "rest", cohort, tmp_path / f"{kind}.npy")  # JEPA: BOLD windows
    assert failures == [] and np.isfinite(np.load(emb)).all() and len(np.load(emb)) == len(bm.load_scans(cohort))
    with pytest.raises(InputError, match="other FC settings or kind"):
        bm.pretrain(cohort, out, _cfg(), states=["wm"], pooled=False)


def test_batch_modes_skip_bad_scans_and_list_them(cohort, pretrained, tmp_path):
    """One bad scan in a manifest: the others are predicted/embedded, the bad one lands in a failures table."""
    table = bm.load_scans(cohort)  # absolute paths
    np.save(tmp_path / "nan.npy", np.full((48, N_ROIS), np.nan, np.float32))
    table.loc[0, "timeseries"] = str(tmp_path / "nan.npy")
    table.loc[1, "timeseries"] = str(tmp_path / "gone.npy")
    table.to_csv(tmp_path / "m.csv", index=False)
    expert = pretrained / "experts" / "rest"
    out, failures = bm.embed(expert, tmp_path / "m.csv", tmp_path / "emb.csv")
    assert len(pd.read_csv(out)) == len(table) - 2
    listed = pd.read_csv(tmp_path / "emb_failures.csv")
    assert list(listed["subject"]) == [str(table.loc[i, "subject"]) for i in (0, 1)] == [f["subject"] for f in failures]
    assert "nan.npy" in listed["error"][0] and "gone.npy" in listed["error"][1]
    bad = table.iloc[:2].copy()
    bad.to_csv(tmp_path / "all_bad.csv", index=False)
    with pytest.raises(InputError, match="no scan could be embedded"):
        bm.embed(expert, tmp_path / "all_bad.csv", tmp_path / "none.csv")
    assert not (tmp_path / "none.csv").exists()


def test_bad_inputs_are_input_errors(cohort, pretrained, tmp_path):
    with pytest.raises(InputError, match="not found"):
        bm.pretrain(tmp_path / "missing", tmp_path / "x", _cfg())
    with pytest.raises(InputError, match="no pretraining scans for state"):
        bm.pretrain(cohort, tmp_path / "x", _cfg(), states=["sleep"])
    with pytest.raises(InputError, match=r"experts\.json"):
        bm.train(cohort, tmp_path / "y", _cfg(), experts=tmp_path)
    table = bm.load_scans(cohort)
    table["age"] = table["age"].astype(object)
    table.loc[table["phenotype"].notna().idxmax(), "age"] = "old"
    table.to_csv(tmp_path / "bad_age.csv", index=False)
    with pytest.raises(InputError, match="'old' is not a number"):
        bm.train(tmp_path / "bad_age.csv", tmp_path / "w", _cfg(), experts=pretrained)
    with pytest.raises(InputError, match="JEPA expert needs at least"):
        bm.pretrain(cohort, tmp_path / "z", _cfg(expert__kind="jepa", expert__n_windows=20), states=["rest"])


def test_real_headers_go_through_extraction_fc_and_embed_or_are_refused(tmp_path):
    """nibabel's bundled EPI: example4d has 2 volumes (refused as too short); functional.nii reaches FC."""
    import os

    from nibabel.testing import data_path

    from neuromoe.data.fmri import extract_timeseries
    from neuromoe.models import create_model, save_model

    with pytest.warns(UserWarning, match="without voxels"):
        ts, valid = extract_timeseries(os.path.join(data_path, "functional.nii"), return_mask=True)
    expert = create_model("brainmoe_expert_tiny", kind="state_clf", n_rois=int(valid.sum()))
    fc = bm.FCSpec("pearson", True, int(valid.sum()))
    save_model(
        expert, tmp_path / "expert", {"family": "brainmoe", "extra": {"kind": "expert", "fc": fc.to_dict()}}
    )
    with pytest.raises(InputError, match="too short"):
        bm.embed(tmp_path / "expert", os.path.join(data_path, "example4d.nii.gz"), tmp_path / "e.csv")
    np.save(tmp_path / "functional.npy", ts[:, valid])
    out, _ = bm.embed(tmp_path / "expert", tmp_path / "functional.npy", tmp_path / "emb.csv")
    emb = pd.read_csv(out)
    assert emb.shape == (1, 1 + expert.dim) and np.isfinite(emb.iloc[0, 1:].to_numpy(float)).all()


def test_state_router_prior_and_dense_warmup_through_pretrain_and_train(cohort, pretrained, tmp_path):
    """Pretrain fits the state router; fine-tuning starts from it (same state order) and routes densely
    for the first half of the epochs only; predictions use top-k."""
    from neuromoe.errors import ConfigError

    cfg = _cfg(model__router_input="pca", model__router_pca=4, model__router_prior=True, expert__pooled=False)
    pre = bm.pretrain(cohort, tmp_path / "pre", cfg)
    assert json.loads((pre / "experts.json").read_text())["router"] == "router"
    prior, meta = load_model(pre / "router")
    assert meta["extra"]["states"] == ["emotion", "language", "motor", "rest", "wm"]
    assert 0.0 <= meta["extra"]["val_state_acc"] <= 1.0
    down = bm._downstream(cohort, cfg, bm.FCSpec(**meta["extra"]["fc"]))
    model, _, _ = bm._build_moe(pre, cfg, down)
    fc = down.scans.tensors["fc"][:4]
    torch.testing.assert_close(model.eval().route(fc).logits, prior.eval()(fc))

    cfg.train.epochs, cfg.train.log_every = 4, 1
    cfg.model.dense_warmup = 0.5
    run = bm.train(cohort, tmp_path / "ft", cfg, experts=pre)
    log = pd.read_csv(run / "metrics.csv").dropna(subset=["train_dense_routing"])
    assert log.groupby("epoch")["train_dense_routing"].first().tolist() == [1.0, 1.0, 0.0, 0.0]
    frame, _ = bm.predict(run / "model", cohort, tmp_path / "p.csv")
    assert all(len(t.split()) == 2 for t in frame["top_experts"])

    with pytest.raises(ConfigError, match="router_input=pca"):
        bm.train(cohort, tmp_path / "x", _cfg(model__router_prior=True), experts=pre)
    with pytest.raises(InputError, match="no state router"):
        bm.train(cohort, tmp_path / "y", _cfg(model__router_input="pca", model__router_prior=True),
                 experts=pretrained)


def test_unfrozen_experts_fine_tune_at_their_own_learning_rate(cohort, pretrained, tmp_path):
    """``model.unfreeze_experts`` trains the routed experts, at ``expert_lr_scale`` × lr, after the first
    ``expert_warmup`` share of the epochs; frozen by default."""
    cfg = _cfg(model__unfreeze_experts=True, model__expert_lr_scale=0.1, model__router_lr_scale=0.5)
    cfg.train.epochs = 2
    spec = bm.FCSpec(**json.loads((pretrained / "experts.json").read_text())["fc"])
    down = bm._downstream(cohort, cfg, spec)
    model, _, _ = bm._build_moe(pretrained, cfg, down)
    trainer = bm.FinetuneTrainer(
        model, cfg.train, down.scans, None, run_dir=tmp_path / "t", age_stats=(0.0, 1.0), msec=cfg.model
    )
    lr = {id(p): g["lr"] for g in trainer.param_groups() for p in g["params"]}
    assert len(lr) == sum(1 for _ in model.parameters())  # nothing left out
    experts, router = list(model.experts.parameters()), list(model.router.parameters())
    assert [lr[id(p)] for p in experts] == pytest.approx([0.1 * cfg.train.lr] * len(experts))
    assert [lr[id(p)] for p in router] == pytest.approx([0.5 * cfg.train.lr] * len(router))
    assert lr[id(model.queries)] == pytest.approx(cfg.train.lr)
    # inside the expert warm-up the experts are frozen in eval mode too (they ran with dropout, so the adapter
    # trained on embeddings validation never shows it); afterwards they train in train mode
    cfg.model.expert_warmup = 0.5
    model.train()
    trainer.on_epoch_start(0)
    assert not model.experts.training and not any(p.requires_grad for p in model.experts.parameters())
    model.train()
    trainer.on_epoch_start(1)
    assert model.experts.training and all(p.requires_grad for p in model.experts.parameters())
    cfg.model.expert_warmup = 0.0

    def changed(run):
        tuned, _ = load_model(run / "model")
        names = json.loads((pretrained / "experts.json").read_text())["states"]
        return [
            not torch.equal(e.encoder.proj.weight, load_model(pretrained / "experts" / n)[0].encoder.proj.weight)
            for e, n in zip(tuned.experts, names, strict=True)
        ]

    assert any(changed(bm.train(cohort, tmp_path / "unfrozen", cfg, experts=pretrained)))
    cfg.model.expert_warmup = 1.0  # frozen for every epoch of the run
    assert not any(changed(bm.train(cohort, tmp_path / "warmup", cfg, experts=pretrained)))
    cfg.model.expert_warmup = 0.0
    cfg.model.unfreeze_experts = False
    assert not any(changed(bm.train(cohort, tmp_path / "frozen", cfg, experts=pretrained)))


def test_balance_loss_pushes_probability_off_the_overloaded_expert():
    from neuromoe.models import create_model

    torch.manual_seed(0)
    model = create_model("brainmoe_tiny", n_rois=8, n_experts=4, top_k=1, dropout=0.0).train()
    with torch.no_grad():  # collapse: expert 0 wins every scan
        model.router.proj.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    fc = torch.randn(6, 8, 8)
    batch = {"phenotype": torch.tensor([0, 1] * 3), "sex": torch.full((6,), -1), "age": torch.full((6,), float("nan"))}
    out = model(fc)
    plain, _ = bm.finetune_loss(out, batch, (0.0, 1.0), bm.ModelSection())
    balanced, logs = bm.finetune_loss(out, batch, (0.0, 1.0), bm.ModelSection(balance_coef=0.5))
    assert logs["router_balance"] > 2.0  # E·f·P: 1 when uniform, up to E=4 when collapsed
    assert float((balanced - plain).detach()) == pytest.approx(0.5 * logs["router_balance"], rel=1e-5)
    model.zero_grad()
    (balanced - plain).backward()
    assert model.router.proj.bias.grad[0] > 0 > model.router.proj.bias.grad[1:].max()  # descent lowers expert 0


def test_embedding_correlation_is_a_matrix_for_any_number_of_experts():
    """RSA matrix of the report: E × E, symmetric, unit diagonal — also for a single expert (was a 0-d scalar
    that broke the report's heatmap)."""
    rng = np.random.default_rng(0)
    for e in (1, 3):
        corr = bm._embedding_correlation(rng.standard_normal((12, e, 4)))
        assert corr.shape == (e, e)
        np.testing.assert_allclose(np.diag(corr), 1.0)
        np.testing.assert_allclose(corr, corr.T)


def test_batch_modes_skip_a_scan_with_a_constant_roi_and_keep_sessions_apart(cohort, pretrained, tmp_path):
    """A constant ROI is a per-scan failure (was: the whole batch refused); two sessions of one subject and
    state stay two distinguishable rows (session column)."""
    table = bm.load_scans(cohort)
    x = np.load(table.loc[0, "timeseries"]).copy()
    x[:, 3] = 0.0
    np.save(tmp_path / "const.npy", x)
    table.loc[0, "timeseries"] = str(tmp_path / "const.npy")
    table.loc[2, ["subject", "state"]] = table.loc[1, ["subject", "state"]].to_numpy()
    table.loc[2, "session"] = "ses-2"
    table.to_csv(tmp_path / "m.csv", index=False)
    out, failures = bm.embed(pretrained / "experts" / "rest", tmp_path / "m.csv", tmp_path / "emb.csv")
    assert len(failures) == 1 and "const.npy" in failures[0]["error"] and "ROI 3 is constant" in failures[0]["error"]
    emb = pd.read_csv(out)
    assert len(emb) == len(table) - 1 and not emb.duplicated(["subject", "session", "state"]).any()


def test_a_folder_of_sub_named_series_files_is_not_a_bids_root(cohort, pretrained, tmp_path):
    import shutil

    for p in bm.load_scans(cohort)["timeseries"].head(3):
        shutil.copy(p, tmp_path)  # sub-XXXX_task-<state>_timeseries.npy
    out, failures = bm.embed(pretrained / "experts" / "rest", tmp_path, tmp_path / "e.csv")
    assert failures == [] and len(pd.read_csv(out)) == 3


def test_pretraining_scans_need_a_state(cohort, tmp_path):
    table = bm.load_scans(cohort)
    table.loc[0, "state"] = ""
    table.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(InputError, match="without a cognitive state"):
        bm.pretrain(tmp_path / "m.csv", tmp_path / "pre", _cfg())


def test_expert_validation_leaves_the_training_rng_alone(tmp_path):
    """Validation fixes its masks with its own seed; the training steps' RNG is not reset every epoch."""
    from neuromoe.engine import TrainConfig
    from neuromoe.models.brainmoe import FCMAEExpert

    torch.manual_seed(0)
    fc = torch.randn(16, 8, 8)
    scans = bm.ScanSet({"fc": (fc + fc.transpose(1, 2)) / 2})
    expert = FCMAEExpert(8, 8, 0, 2)
    drawn, orig = [], expert.random_mask
    expert.random_mask = lambda b, d, g=None: drawn.append(orig(b, d, g)) or drawn[-1]
    cfg = TrainConfig(epochs=3, batch_size=16, device="cpu", progress=False)
    bm.ExpertTrainer(expert, cfg, scans.subset(np.arange(12)), scans.subset(np.arange(12, 16)), run_dir=tmp_path).fit()
    train_masks = drawn[0::2]  # train, val, train, val, ...
    assert len(train_masks) == 3 and not torch.equal(train_masks[1], train_masks[2])
    assert torch.equal(drawn[1], drawn[3])  # validation masks are the same every epoch


def test_baselines_keep_every_class_column_when_a_fold_lacks_the_last_class():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 4))
    y = {"phenotype": np.array([0, 1] * 6)}
    base = bm._sklearn_baselines(x[:8], x[8:], {"phenotype": y["phenotype"][:8]}, bm.EvalSection(svm_c=[1.0]), 0,
                                 {"phenotype": 3})
    assert base["mlp"]["phenotype"].shape == (4, 3) and base["svm"]["phenotype"].shape == (4, 3)
    assert bm._fold_metrics(base["mlp"], {"phenotype": np.array([0, 1, 2, 2])})["phenotype_accuracy"] <= 1


def test_svm_baseline_inner_cv_never_splits_a_subject(monkeypatch):
    """Several scans (runs) per subject: the C chosen by the SVM's inner CV must come from subject-disjoint folds."""
    from sklearn.model_selection import GridSearchCV

    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(12), 3)  # 12 subjects × 3 runs
    x = rng.standard_normal((36, 4)) + subjects[:, None] * 0.1
    y = {"phenotype": (subjects % 2).astype(np.int64), "age": 20.0 + subjects.astype(float)}
    seen, fit = [], GridSearchCV.fit

    def spy(self, xx, yy, groups=None, **kw):
        seen.append((self.cv, xx, yy, groups))
        return fit(self, xx, yy, groups=groups, **kw)

    monkeypatch.setattr(GridSearchCV, "fit", spy)
    bm._sklearn_baselines(x[:30], x[30:], {k: v[:30] for k, v in y.items()}, bm.EvalSection(svm_c=[0.1, 1.0]), 0,
                          {"phenotype": 2}, subjects[:30])
    assert len(seen) == 2  # phenotype and age
    for cv, xx, yy, groups in seen:
        assert groups is not None and hasattr(cv, "split")
        assert all(not set(groups[tr]) & set(groups[te]) for tr, te in cv.split(xx, yy, groups))


def test_svm_baseline_with_a_one_subject_class_fits_no_single_class_svm(capsys):
    """A small cohort's fold can hold one subject of a class: the inner C search then fitted SVMs on one class
    (sklearn printed FitFailedWarning tracebacks and picked C from all-NaN scores). Now: defaults, said once."""
    from sklearn.exceptions import FitFailedWarning

    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4))
    y = np.array([0, 0, 0, 0, 0, 0, 1, 0, 1, 0])  # training part (first 8): one subject of class 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", FitFailedWarning)
        warnings.simplefilter("error", UserWarning)
        out = bm._sklearn_baselines(x[:8], x[8:], {"phenotype": y[:8]}, bm.EvalSection(svm_c=[0.1, 1.0]), 0,
                                    {"phenotype": 2}, np.arange(8))
    assert out["svm"]["phenotype"].shape == (2, 2)
    assert "a class has one labelled training subject" in capsys.readouterr().err


def test_pooled_baselines_say_which_task_they_skip(capsys):
    """A fold with too few labelled scans for a task leaves that baseline out of the summary: it is now said."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4))
    y = {"phenotype": np.r_[np.zeros(5), np.ones(5)].astype(np.int64), "age": np.r_[20.0, 30.0, [np.nan] * 8]}
    out = bm._sklearn_baselines(x[:8], x[8:], {k: v[:8] for k, v in y.items()}, bm.EvalSection(svm_c=[1.0]), 0,
                                {"phenotype": 2}, np.arange(8))
    assert "phenotype" in out["svm"] and "age" not in out["svm"]
    assert "pooled baselines skip 'age' in this fold: 2 labelled training scans" in capsys.readouterr().err


def test_train_and_pretrain_resume_after_a_kill(cohort, pretrained, tmp_path, monkeypatch):
    """BrainMoE had no --resume: an interrupted fine-tune or pretraining could only start over. Killed after the
    step-3 checkpoint and resumed, the fine-tune ends with the uninterrupted run's weights; a finished pretraining
    resumed trains nothing again."""
    import neuromoe.engine.trainer as trainer_mod
    from neuromoe.models.registry import load_model

    def cfg():
        c = _cfg(train__epochs=4)
        c.train.ckpt_every = 1
        return c

    full = bm.train(cohort, tmp_path / "full", cfg(), experts=pretrained)
    save = trainer_mod.save_checkpoint

    def killed(path, state):
        save(path, state)
        if state.get("position", {}).get("global_step", 0) >= 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        bm.train(cohort, tmp_path / "res", cfg(), experts=pretrained)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", save)
    assert not (tmp_path / "res" / "model").exists()
    bm.train(cohort, tmp_path / "res", cfg(), experts=pretrained, resume=True)
    a, _ = load_model(full / "model")
    b, _ = load_model(tmp_path / "res" / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    before = {p: p.stat().st_mtime_ns for p in (pretrained / "experts").glob("*/train/checkpoints/last*")}
    assert before
    bm.pretrain(cohort, pretrained, _cfg(), resume=True)
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # nothing trained again: no checkpoint rewritten


def test_pooled_baselines_learn_age_in_years():
    """The pooled+MLP baseline regresses standardised ages: on ages in years it did not converge in 2000
    epochs and stayed at the predict-the-mean MAE, an unfairly weak baseline."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(0)
    n, d = 120, 32
    age = rng.uniform(20, 80, n + 60)
    x = rng.normal(size=(n + 60, d)) + np.outer((age - 50) / 17, rng.normal(size=d)) * 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        out = bm._sklearn_baselines(x[:n], x[n:], {"age": age[:n]}, bm.EvalSection(), 0)
    mean_mae = np.abs(age[n:] - age[:n].mean()).mean()
    for model in ("mlp", "svm"):
        assert np.abs(out[model]["age"] - age[n:]).mean() < 0.6 * mean_mae


def test_the_adapter_preset_does_not_resize_pretrained_experts(cohort, pretrained, tmp_path):
    """Experts pretrained with ``tiny`` (dim 32) under an adapter of the ``demo`` preset (dim 64): the
    experts keep their own width. train and evaluate used to stop with a state-dict size mismatch."""
    cfg = bm.load_brainmoe_config("demo", ["model.router_prior=false", "train.max_steps=2"], device="cpu",
                                  seed=0)
    run = bm.train(cohort, tmp_path / "ft", cfg, experts=pretrained)
    model, _ = load_model(run / "model")
    assert model.dim == 32 and len(model.experts) == 5
    cfg.eval.folds = 2
    metrics = json.loads((bm.evaluate(pretrained, cohort, tmp_path / "ev", cfg) / "metrics.json").read_text())
    assert "BrainMoE" in json.dumps(metrics)


def test_jepa_target_moves_once_per_optimiser_step(tmp_path, monkeypatch) -> None:
    """With gradient accumulation the EMA target takes one step per optimiser step; it used to take one per
    micro-batch, i.e. an effective decay of ema**accum_steps."""
    from neuromoe.engine import TrainConfig
    from neuromoe.models.brainmoe import JEPAExpert

    calls = []
    monkeypatch.setattr(JEPAExpert, "update_target", lambda self: calls.append(1))
    torch.manual_seed(0)
    data = bm.ScanSet({"fc": torch.randn(8, 6, 6), "ts": torch.randn(8, 8, 6)})
    model = JEPAExpert(6, 8, 0, 2, window=2, n_windows=4)
    cfg = TrainConfig(epochs=1, batch_size=1, accum_steps=4, device="cpu", progress=False, resumable=False)
    trainer = bm.ExpertTrainer(model, cfg, data, run_dir=tmp_path)
    trainer.fit()
    assert trainer.global_step == 2 and len(calls) == 2


def test_a_folder_of_series_takes_csv_files_too(tmp_path) -> None:
    """A folder with a.csv and b.npy predicted only b (exit 0, a.csv neither predicted nor listed as failed)."""
    import numpy as np

    from neuromoe.pipelines.brainmoe import _input_scans

    x = np.random.default_rng(0).standard_normal((20, 8))
    np.savetxt(tmp_path / "a.csv", x, delimiter=",")
    np.save(tmp_path / "b.npy", x)
    (tmp_path / "list.csv").write_text("subject,timeseries\nx,a.csv\n")  # a manifest is not a series
    table = _input_scans(tmp_path)
    assert sorted(p.rsplit("/", 1)[-1] for p in table["timeseries"]) == ["a.csv", "b.npy"]


def test_pretraining_errors_name_the_scan_file(tmp_path) -> None:
    """A constant ROI was 'scan 2', a short scan named the manifest, and a first scan stored ROI × time set the
    ROI count so that the error blamed a good file."""
    import numpy as np
    import pandas as pd

    from neuromoe.errors import InputError
    from neuromoe.pipelines import brainmoe as bm

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        x = rng.standard_normal((40, 12))
        if i == 2:
            x[:, 3] = 1.0
        np.save(tmp_path / f"s{i}.npy", x.T if i == 0 else x)
        rows.append({"subject": f"sub-{i}", "state": "rest", "timeseries": f"s{i}.npy"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = bm.load_brainmoe_config("tiny", seed=0, device="cpu")
    with pytest.raises(InputError, match=r"s0\.npy: scan has 40 ROIs, the model expects 12 \(it has 12 rows"):
        bm.pretrain(tmp_path / "m.csv", tmp_path / "run", cfg)
    np.save(tmp_path / "s0.npy", rng.standard_normal((40, 12)))
    with pytest.raises(InputError, match=r"s2\.npy: ROI 3 is constant"):
        bm.pretrain(tmp_path / "m.csv", tmp_path / "run", cfg)


def test_the_cohorts_roi_count_is_its_most_common_one_across_chunks(tmp_path, monkeypatch) -> None:
    """The series are read a chunk at a time: a first chunk of scans stored ROI × time must not set the ROI
    count and blame the good scans of later chunks."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        x = rng.standard_normal((40, 12))
        np.save(tmp_path / f"s{i}.npy", x.T if i < 2 else x)
        rows.append({"subject": f"sub-{i}", "state": "rest", "timeseries": f"s{i}.npy"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    monkeypatch.setattr(bm, "_READ_CHUNK", 2)
    cfg = bm.load_brainmoe_config("tiny", seed=0, device="cpu")
    with pytest.raises(InputError, match=r"s0\.npy: scan has 40 ROIs, the model expects 12 \(it has 12 rows"):
        bm.pretrain(tmp_path / "m.csv", tmp_path / "run", cfg)
    assert not (tmp_path / "run" / "experts.json").exists()


def test_demo_report_says_which_states_the_downstream_scans_are(cohort, tmp_path):
    """The router-preference plots were shown without the downstream scans' states (all 'wm' in the demo, so
    a 97 % share for the wm expert is the expected answer, not a finding), and without a chance row."""
    out = bm.demo(cohort, tmp_path / "demo", device="cpu", preset="tiny")
    section = json.loads((out / "report" / "section.json").read_text())
    texts = " ".join(i["text"] for i in section["items"] if i["kind"] == "text")
    labelled = bm.load_scans(cohort).query("phenotype == phenotype")["state"].value_counts()
    assert f"Downstream (labelled) scans by state: {', '.join(f'{k} {v}' for k, v in sorted(labelled.items()))}" in texts
    table = next(i for i in section["items"] if i["kind"] == "table")
    assert "chance" in table["columns"]


def test_roi_series_extracted_from_bold_are_cached_across_commands(tmp_path, monkeypatch) -> None:
    """Every command (pretrain, train, evaluate, predict, embed) extracted every BOLD run again: ~3 min a run at
    HCP size, 8,000 runs. The series are now cached per file under $NEUROMOE_CACHE/timeseries."""
    from neuromoe.data import fmri

    calls = []
    rng = np.random.default_rng(0)

    zero_rois: list[int] = []

    def series(table):
        return [x for _, _, chunk in bm._series_chunks(table) for x in chunk]

    def extract(path, atlas=None, **kw):
        calls.append(path)
        x = rng.normal(size=(60, 12)).astype(np.float32)
        x[:, zero_rois] = 0  # ROIs without voxels: extraction warns (not this fake), a cache hit says it again
        return x

    monkeypatch.setattr(fmri, "extract_timeseries", extract)
    monkeypatch.setenv("NEUROMOE_CACHE", str(tmp_path / "cache"))
    for i in range(2):
        (tmp_path / f"bold{i}.nii.gz").write_bytes(f"scan {i}".encode())
    table = pd.DataFrame({"subject": ["s0", "s1"], "bold": [str(tmp_path / f"bold{i}.nii.gz") for i in range(2)]})
    first = series(table)
    meta = {"extra": {"fc": bm.FCSpec("pearson", True, 12).to_dict()}}
    _, kept, failures = bm._batch_scans(meta, table, tmp_path, "embedded")  # another command, same scans
    assert len(calls) == 2 and not failures and len(kept) == 2
    np.testing.assert_array_equal(series(table)[1], first[1])
    assert len(calls) == 2 and len(list((tmp_path / "cache" / "timeseries").glob("*.npy"))) == 2
    # an extraction default that changes (another sphere radius) is another entry, not the old series
    monkeypatch.setitem(fmri._EXTRACT_DEFAULTS, "radius_mm", 6.0)
    zero_rois.append(3)
    series(table)
    assert len(calls) == 4
    with pytest.warns(UserWarning, match="1 of 12 ROI columns are zero"):
        series(table)  # read from the cache: extraction's warning said again
    assert len(calls) == 4
