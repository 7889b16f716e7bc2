"""Trainer: learns, logs, resumes bit-exactly, stops early, writes checkpoints atomically."""

from __future__ import annotations

import copy
import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from neuromoe.config import from_dict
from neuromoe.engine import TrainConfig, Trainer, load_checkpoint, resolve_device
from neuromoe.errors import ConfigError, ModelFormatError
from neuromoe.layers.moe import ExpertMLP, MoELayer
from neuromoe.models.denseformer import PRESETS, DenseFormerMoE, layerwise_lr_groups


def _data(n: int = 40, seed: int = 0) -> TensorDataset:
    """Noisy linear regression; ``seed`` changes the samples, never the target function."""
    w = torch.randn(6, 1, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x @ w + 0.05 * torch.randn(n, 1, generator=g))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 1))


class MSETrainer(Trainer):
    fail_at: int | None = None

    def training_step(self, batch):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        return loss, {"mse": float(loss.detach())}

    def validation_step(self, batch):
        x, y = batch
        return {"loss": float(nn.functional.mse_loss(self.model(x), y))}


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=4, batch_size=8, lr=1e-2, device="cpu", progress=False, log_every=1, ckpt_every=4,
                accum_steps=2, warmup_frac=0.2, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_fit_learns_and_logs(tmp_path: Path) -> None:
    tr = MSETrainer(_model(), _cfg(epochs=15, accum_steps=1), _data(), _data(16, 1), run_dir=tmp_path)
    first = tr.validate()["val_loss"]
    res = tr.fit()
    assert res.best_metric < 0.3 * first
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {"step", "lr", "train_loss", "val_loss"} <= set(rows[0]) | set(rows[-1])
    assert any((tmp_path / "tb").iterdir())
    assert (tmp_path / "checkpoints" / "last.safetensors").is_file()
    assert from_dict(TrainConfig, yaml.safe_load((tmp_path / "config.yaml").read_text())) == tr.cfg


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    full = MSETrainer(_model(), _cfg(), _data(), _data(16, 1), run_dir=tmp_path / "a")
    full.fit()
    part = MSETrainer(_model(), _cfg(), _data(), _data(16, 1), run_dir=tmp_path / "b")
    part.fail_at = 5  # 3 steps/epoch: killed in epoch 1 after the mid-epoch checkpoint at step 4
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert (state["position"]["global_step"], state["position"]["epoch"], state["position"]["batch"]) == (4, 1, 2)
    resumed = MSETrainer(_model(), _cfg(), _data(), _data(16, 1), run_dir=tmp_path / "b")
    resumed.fit(resume=True)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert resumed.global_step == full.global_step


class _PlainItems(TensorDataset):
    random_items = False  # as BrainMoE's ScanSet: items draw no random numbers


def test_a_dataset_without_random_items_skips_reseeding_and_trains_the_same(tmp_path: Path) -> None:
    """Reseeding around every item (save, seed, restore three RNGs) took 8 s of the demo's BrainMoE step for
    items that draw nothing; skipping it must leave every random stream (dropout here) and the weights as they were."""
    seeded = MSETrainer(_model(), _cfg(), _data(), _data(16, 1), run_dir=tmp_path / "a")
    seeded.fit()
    x, y = _data().tensors
    plain = MSETrainer(_model(), _cfg(), _PlainItems(x, y), _data(16, 1), run_dir=tmp_path / "b")
    assert plain._loader(plain.train_set, [[0, 1]], 0).dataset is plain.train_set  # not wrapped
    plain.fit()
    for (name, p), q in zip(seeded.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_early_stopping_and_on_best(tmp_path: Path) -> None:
    calls: list[float] = []

    class Stale(MSETrainer):
        def validation_end(self, outputs):
            return {"score": 1.0}

        def on_best(self, metrics):
            calls.append(metrics["score"])

    tr = Stale(_model(), _cfg(epochs=10, monitor="score", monitor_mode="max", patience=2), _data(), _data(8),
               run_dir=tmp_path)
    res = tr.fit()
    assert tr.epoch == 2 and res.best_metric == 1.0 and calls == [1.0]


def test_kill_during_checkpoint_keeps_last_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = MSETrainer(_model(), _cfg(epochs=1, ckpt_every=1), _data(), run_dir=tmp_path)
    tr.fit()
    path = tmp_path / "checkpoints" / "last.safetensors"
    before = path.read_bytes()
    import neuromoe.engine.checkpoint as ck

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):  # a longer resumed run dies writing its first new checkpoint
        MSETrainer(_model(), _cfg(epochs=2, ckpt_every=1), _data(), run_dir=tmp_path).fit(resume=True)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["position"]["global_step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.safetensors"]


@pytest.mark.parametrize("native", ["1", "0"])
def test_bf16_max_steps_and_config(tmp_path: Path, cpu_bf16, native: str) -> None:
    cpu_bf16(native)
    cfg = from_dict(TrainConfig, {"precision": "bf16", "max_steps": 2, "device": "cpu", "progress": False,
                                  "epochs": 5})
    res = MSETrainer(_model(), cfg, _data(), run_dir=tmp_path).fit()
    assert math.isnan(res.best_metric) and res.history[-1]["step"] == 2
    # the run directory says what ran: bf16 only where the CPU computes it natively
    info = json.loads((tmp_path / "runtime.json").read_text())
    assert info["precision_requested"] == "bf16" and info["precision"] == ("bf16" if native == "1" else "fp32")
    assert info["device"] == "cpu" and info["world_size"] == 1 and "avx512_bf16" in info["cpu"]
    with pytest.raises(ConfigError):
        MSETrainer(_model(), _cfg(precision="fp8"), _data(), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="monitor"):
        MSETrainer(_model(), _cfg(monitor="nope"), _data(), _data(8), run_dir=tmp_path / "m").fit()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            resolve_device("cuda")
    with pytest.MonkeyPatch.context() as mp:  # a GPU index beyond those visible: a config error, not a traceback
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 2)
        assert resolve_device("cuda:1") == torch.device("cuda", 1)
        with pytest.raises(ConfigError, match="only 2 GPU"):
            resolve_device("cuda:2")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelFormatError):
        load_checkpoint(tmp_path / "bad.safetensors")


class _ConvTrainer(Trainer):
    def training_step(self, batch):
        x, y = batch
        self.layouts.append(
            x.is_contiguous(memory_format=torch.channels_last_3d)
            and self.model[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
        )
        loss = nn.functional.mse_loss(self.model(x).mean((2, 3, 4)), y)
        return loss, {"mse": float(loss.detach())}


def test_channels_last_trains_the_same_model_and_restores_the_layout(tmp_path: Path) -> None:
    """``channels_last``: batches and conv weights are channels_last_3d during training, the result equals
    the default layout's (float reordering aside), and the model comes back in the default layout."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 2, 5, 5, 5, generator=g), torch.randn(16, 1, generator=g))
    weights = {}
    for cl in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.GELU(), nn.Conv3d(4, 1, 1))
        cfg = _cfg(epochs=2, accum_steps=1, channels_last=cl)
        tr = _ConvTrainer(model, cfg, data, run_dir=tmp_path / str(cl))
        tr.layouts = []
        tr.fit()
        assert tr.layouts and all(tr.layouts) == cl and any(tr.layouts) == cl
        assert model[0].weight.is_contiguous()
        weights[cl] = model[0].weight.detach().clone()
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-4, atol=1e-5)


def test_best_weights_survive_a_resume(tmp_path: Path) -> None:
    """The best validation weights are those of the whole run, also when it was killed after the best epoch."""

    class Worsening(MSETrainer):
        def validation_end(self, outputs):
            return {"val_loss": float(self.epoch)}  # epoch 0 is the best, every later one worse

    full = Worsening(_model(), _cfg(), _data(), _data(8), run_dir=tmp_path / "a")
    full.fit_best()
    part = Worsening(_model(), _cfg(), _data(), _data(8), run_dir=tmp_path / "b")
    part.fail_at = 7  # 3 steps/epoch: killed in epoch 2, after epochs 0 (the best) and 1 were validated
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed = Worsening(_model(), _cfg(), _data(), _data(8), run_dir=tmp_path / "b")
    res = resumed.fit_best(resume=True)
    assert res.best_metric == 0.0 and res.best_step == 3
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    last = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors")["model"]
    assert not all(torch.equal(last[k], v) for k, v in resumed.model.state_dict().items())
    # a fresh run in the same directory does not inherit the earlier run's best weights
    fresh = Worsening(_model(), _cfg(epochs=1), _data(), run_dir=tmp_path / "b")
    fresh.fit()
    assert not (tmp_path / "b" / "checkpoints" / "best.safetensors").exists() and not fresh.load_best()


def test_skipped_validations_do_not_stop_the_run(tmp_path: Path) -> None:
    """Epochs a family does not validate (e.g. DenseFormer's age-first curriculum) run no validation pass
    and are no stalls for early stopping."""

    calls: list[int] = []

    class Curriculum(MSETrainer):
        def validates(self, epoch):
            return epoch >= 3

        def validation_end(self, outputs):
            calls.append(self.epoch)
            return {"val_loss": 1.0}

    tr = Curriculum(_model(), _cfg(epochs=5, patience=1), _data(), _data(8), run_dir=tmp_path)
    res = tr.fit()
    assert calls == [3, 4] and tr.epoch == 4 and res.best_metric == 1.0
    assert [r["epoch"] for r in res.history if "val_loss" in r] == [3, 4]


def test_resume_after_the_last_step_only_validates(tmp_path: Path) -> None:
    """max_steps reached mid-epoch, killed during the final validation: the resume must validate and stop,
    not train on the rest of the epoch (it took one extra optimiser step)."""

    class DiesInValidation(MSETrainer):
        die = False

        def validation_step(self, batch):
            if self.die:
                raise KeyboardInterrupt("simulated kill during validation")
            return super().validation_step(batch)

    cfg = _cfg(epochs=3, max_steps=3, accum_steps=1, ckpt_every=1)  # 5 batches/epoch: step 3 is mid-epoch
    full = DiesInValidation(_model(), cfg, _data(), _data(16, 1), run_dir=tmp_path / "a")
    full.fit()
    part = DiesInValidation(_model(), cfg, _data(), _data(16, 1), run_dir=tmp_path / "b")
    part.die = True
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    pos = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors")["position"]
    assert (pos["global_step"], pos["epoch"], pos["batch"]) == (3, 0, 3)
    resumed = DiesInValidation(_model(), cfg, _data(), _data(16, 1), run_dir=tmp_path / "b")
    resumed.fit(resume=True)
    assert resumed.global_step == full.global_step == 3
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert resumed.history == full.history  # the same train rows and one validation row


def test_resume_of_an_early_stopped_run_stays_stopped(tmp_path: Path) -> None:
    """A re-queued ``--resume`` of a run that stopped early (patience) must be a no-op, like that of a run
    that finished all its epochs; before, it trained at least one more epoch."""

    class Stale(MSETrainer):
        def validation_end(self, outputs):
            return {"score": 1.0}  # never improves after the first validation

    cfg = _cfg(epochs=10, accum_steps=1, monitor="score", monitor_mode="max", patience=2, ckpt_every=0)
    first = Stale(_model(), cfg, _data(), _data(8), run_dir=tmp_path)
    first.fit()
    assert first.epoch == 2 and first.global_step == 15  # stopped early: 3 of 10 epochs
    resumed = Stale(_model(), cfg, _data(), _data(8), run_dir=tmp_path)
    resumed.fit(resume=True)
    assert resumed.global_step == 15 and resumed.history == first.history
    for (name, p), q in zip(first.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name


class _Augmented(Dataset):
    """Random augmentation inside ``__getitem__``, drawn in the DataLoader worker that fetches the item."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x), y


class _RecordingTrainer(MSETrainer):
    """Records each step's first augmented input value."""

    def training_step(self, batch):
        if self.fail_at is None or self.global_step != self.fail_at:
            self.seen[self.global_step] = float(batch[0][0, 0])
        return super().training_step(batch)


def _recorded_fit(run_dir: Path, num_workers: int, fail_at: int | None = None,
                  resume: bool = False) -> _RecordingTrainer:
    tr = _RecordingTrainer(_model(), _cfg(epochs=1, accum_steps=1, ckpt_every=2, num_workers=num_workers),
                           _Augmented(_data()), run_dir=run_dir)
    tr.seen, tr.fail_at = {}, fail_at
    if fail_at is None:
        tr.fit(resume=resume)
    else:
        with pytest.raises(KeyboardInterrupt):
            tr.fit()
    return tr


def test_resume_is_bit_exact_with_workers_and_random_augmentation(tmp_path: Path) -> None:
    """With ``num_workers > 0`` the augmentation was drawn from per-worker RNGs that a resume does not
    restore (and a resumed loader hands batches to other workers): now each item's augmentation depends
    on (seed, epoch, index) only, so a resume, and a ``num_workers=0`` run, see the same batches."""
    full = _recorded_fit(tmp_path / "a", num_workers=2)
    _recorded_fit(tmp_path / "b", num_workers=2, fail_at=3)  # killed after the checkpoint at step 2
    resumed = _recorded_fit(tmp_path / "b", num_workers=2, resume=True)
    assert sorted(resumed.seen) == [2, 3, 4]
    assert resumed.seen == {s: full.seen[s] for s in resumed.seen}
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    in_process = _recorded_fit(tmp_path / "c", num_workers=0)
    assert in_process.seen == full.seen
    for (name, p), q in zip(full.model.named_parameters(), in_process.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_dataset_randomness_leaves_the_callers_rng_streams_alone(tmp_path: Path) -> None:
    """Items fetched in the main process (``num_workers=0``) draw under their own seeds and restore the
    global torch / numpy / random state after, so dropout and other training-step randomness do not
    depend on how much randomness the dataset used."""

    class Greedy(Dataset):
        def __init__(self, base: Dataset) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            torch.rand(3), np.random.rand(3), random.random()
            return self.base[i]

    class Drawing(MSETrainer):
        def training_step(self, batch):
            self.draws.append((float(torch.rand(())), float(np.random.rand()), random.random()))
            return super().training_step(batch)

    draws = {}
    for name, data in (("plain", _data()), ("greedy", Greedy(_data()))):
        tr = Drawing(_model(), _cfg(epochs=1, accum_steps=1), data, run_dir=tmp_path / name)
        tr.draws = []
        tr.fit()
        draws[name] = tr.draws
    assert len(draws["plain"]) == 5 and draws["greedy"] == draws["plain"]


def test_expert_biases_get_no_weight_decay(tmp_path: Path) -> None:
    """The stacked ExpertMLP biases ``b1 (E, H)`` / ``b2 (E, D)`` are 2-D but biases: the ``ndim >= 2``
    rule decayed them (unlike the same biases in ``nn.ModuleList`` experts)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = MoELayer(8, 4, k=2)
            self.lin = nn.Linear(8, 1)

    # also for a deep copy (EMA, model soups): copy.deepcopy drops attributes set on a Parameter
    for i, net in enumerate((Net(), copy.deepcopy(Net()))):
        tr = Trainer(net, _cfg(weight_decay=0.05), _data(), run_dir=tmp_path / str(i))
        names = {id(p): n for n, p in tr.model.named_parameters()}
        by_decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in tr.param_groups()}
        assert by_decay == {
            0.05: ["lin.weight", "moe.experts.w1", "moe.experts.w2", "moe.router.proj.weight"],
            0.0: ["lin.bias", "moe.experts.b1", "moe.experts.b2", "moe.router.proj.bias"],
        }


def test_denseformer_layer_decay_groups_skip_stacked_expert_biases() -> None:
    """DenseFormer's layer-decay param groups follow the same rule: with stacked (grouped) experts in the
    MoE head, their 2-D biases get no weight decay, their weights do."""
    torch.manual_seed(0)
    tasks = [{"name": "age", "type": "regression", "num_outputs": 1}]
    m = DenseFormerMoE(tasks, head="moe", num_experts=4, **PRESETS["tiny"])
    dim = PRESETS["tiny"]["embed_dim"]
    m.head.moe.experts = ExpertMLP(4, dim, 2 * dim)
    wd = {id(p): g["weight_decay"] for g in layerwise_lr_groups(m, 1e-3, 0.05) for p in g["params"]}
    experts = m.head.moe.experts
    assert [wd[id(p)] for p in (experts.w1, experts.w2, experts.b1, experts.b2)] == [0.05, 0.05, 0.0, 0.0]
    assert wd[id(m.head.out["age"].bias)] == 0.0 and wd[id(m.head.out["age"].weight)] == 0.05
    # the task-attention pool's per-task queries are embeddings like task_embed: no decay (they had 0.05)
    pooled = DenseFormerMoE(tasks, head="moe", num_experts=4, head_pool="task_attention", **PRESETS["tiny"])
    wd = {id(p): g["weight_decay"] for g in layerwise_lr_groups(pooled, 1e-3, 0.05) for p in g["params"]}
    assert wd[id(pooled.head.pool.query)] == 0.0 and wd[id(pooled.head.pool.kv.weight)] == 0.05


def test_a_log_key_is_averaged_over_the_micro_batches_that_logged_it(tmp_path: Path) -> None:
    """A key logged by only some micro-batches (e.g. a per-task loss when the batch has no label for that
    task) was summed over those but divided by all of them: a constant 1.0 came out as 0.5."""

    class Sometimes(MSETrainer):
        calls = 0

        def training_step(self, batch):
            loss, logs = super().training_step(batch)
            self.calls += 1
            return loss, {**logs, **({"task": 1.0} if self.calls % 2 else {})}

    # 5 micro-batches/epoch, accum 2: steps of 2, 2, 1 micro-batches; rows at steps 2 and 3 (the last)
    tr = Sometimes(_model(), _cfg(epochs=1, accum_steps=2, log_every=2), _data(), run_dir=tmp_path)
    tr.fit()
    rows = [r for r in tr.history if "train_loss" in r]
    assert [r["step"] for r in rows] == [2, 3]
    assert [r["train_task"] for r in rows] == [1.0, 1.0]


def test_non_resumable_run_writes_no_checkpoint_and_trains_the_same(tmp_path: Path) -> None:
    """``resumable: false`` (CV folds) skips the last.safetensors writes and changes nothing else."""
    a = MSETrainer(_model(), _cfg(), _data(), _data(16, 1), run_dir=tmp_path / "a")
    b = MSETrainer(_model(), _cfg(resumable=False), _data(), _data(16, 1), run_dir=tmp_path / "b")
    ra, rb = a.fit_best(), b.fit_best()
    assert (tmp_path / "a" / "checkpoints" / "last.safetensors").is_file()
    assert not (tmp_path / "b" / "checkpoints").exists()
    assert ra.best_metric == rb.best_metric
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])


def test_on_optimizer_step_runs_once_per_optimiser_step(tmp_path: Path) -> None:
    """With accumulation the hook runs per optimiser step (5 micro-batches, accum 2 → 3 steps per epoch)."""

    hook_steps: list[int] = []

    class Counting(MSETrainer):
        def on_optimizer_step(self) -> None:
            hook_steps.append(self.global_step)

    tr = Counting(_model(), _cfg(epochs=2, accum_steps=2), _data(), run_dir=tmp_path)
    tr.fit()
    assert hook_steps == list(range(1, tr.global_step + 1)) and tr.global_step == 6


def test_default_validation_mean_is_weighted_by_batch_size_when_given() -> None:
    """Batch means averaged unweighted: a last short batch (or another split over DDP ranks) moved val_loss
    with the weights unchanged (5.41 vs 5.08 in the review's 1- vs 2-rank run)."""
    tr = MSETrainer.__new__(MSETrainer)
    outs = [{"loss": 1.0, "n": 4}, {"loss": 6.0, "n": 1}]
    assert tr.validation_end(outs) == {"val_loss": pytest.approx(2.0)}
    assert tr.validation_end([{"loss": 1.0}, {"loss": 3.0}]) == {"val_loss": pytest.approx(2.0)}  # no n: as before


def test_a_fresh_run_in_an_old_folder_leaves_nothing_for_resume_to_continue(tmp_path: Path, capsys) -> None:
    """Run A finishes; run B (other seed) is killed before its first checkpoint; ``B --resume`` used to continue
    A from A's last checkpoint (weights, optimiser, history)."""
    MSETrainer(_model(), _cfg(), _data(), _data(16, 1), run_dir=tmp_path).fit()
    b = MSETrainer(_model(), _cfg(seed=4), _data(), _data(16, 1), run_dir=tmp_path)
    b.fail_at = 0
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    assert not (tmp_path / "checkpoints" / "last.safetensors").exists()
    resumed = MSETrainer(_model(), _cfg(seed=4), _data(), _data(16, 1), run_dir=tmp_path)
    resumed.fit(resume=True)
    assert "starts from the beginning" in capsys.readouterr().err
    fresh = MSETrainer(_model(), _cfg(seed=4), _data(), _data(16, 1), run_dir=tmp_path / "fresh")
    fresh.fit()
    for p, q in zip(fresh.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resuming_a_checkpoint_of_another_architecture_is_one_clear_error(tmp_path: Path) -> None:
    from neuromoe.errors import InputError

    MSETrainer(_model(), _cfg(), _data(), _data(16, 1), run_dir=tmp_path).fit()
    other = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 1))
    with pytest.raises(InputError, match="another architecture"):
        MSETrainer(other, _cfg(), _data(), _data(16, 1), run_dir=tmp_path).fit(resume=True)


def test_a_diverged_loss_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    from neuromoe.errors import TrainingDiverged

    class NaNTrainer(MSETrainer):
        def training_step(self, batch):
            loss, logs = super().training_step(batch)
            return loss * float("nan"), logs

    with pytest.raises(TrainingDiverged, match="lower lr"):
        NaNTrainer(_model(), _cfg(), _data(), run_dir=tmp_path).fit()


def test_a_rerun_records_its_own_training_config_but_keeps_a_family_config(tmp_path: Path) -> None:
    """Per-expert and per-fold folders kept the first run's config.yaml forever (written only when missing)."""
    MSETrainer(_model(), _cfg(epochs=1), _data(), run_dir=tmp_path / "expert").fit()
    MSETrainer(_model(), _cfg(epochs=2, lr=5e-3), _data(), run_dir=tmp_path / "expert").fit()
    saved = yaml.safe_load((tmp_path / "expert" / "config.yaml").read_text())
    assert (saved["epochs"], saved["lr"]) == (2, 5e-3)
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "config.yaml").write_text("model: {preset: tiny}\ntrain: {epochs: 2}\n")
    MSETrainer(_model(), _cfg(epochs=1), _data(), run_dir=tmp_path / "family").fit()
    assert "model" in yaml.safe_load((tmp_path / "family" / "config.yaml").read_text())


def test_a_resumed_runs_log_equals_the_uninterrupted_one_when_checkpoints_fall_inside_a_log_window(
        tmp_path: Path) -> None:
    """ckpt_every 2, log_every 3: the steps before the checkpoint were missing from the resumed run's average."""
    kw = dict(epochs=2, accum_steps=1, ckpt_every=2, log_every=3)  # 10 steps per epoch
    MSETrainer(_model(), _cfg(**kw), _data(80), run_dir=tmp_path / "a").fit()
    part = MSETrainer(_model(), _cfg(**kw), _data(80), run_dir=tmp_path / "b")
    part.fail_at = 5  # after the checkpoint at step 4, inside the window of steps 4-6
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    MSETrainer(_model(), _cfg(**kw), _data(80), run_dir=tmp_path / "b").fit(resume=True)

    def rows(run: str) -> list[dict[str, str]]:
        return [r for r in csv.DictReader((tmp_path / run / "metrics.csv").open()) if r.get("train_loss")]

    assert rows("a") == rows("b")


def test_checkpoints_keep_the_current_gpus_random_stream_only(monkeypatch) -> None:
    """All visible GPUs' streams were saved and restored: a run resumed with fewer GPUs (one per process under
    SLURM) failed with IndexError, and a rank got its streams by position. CUDA is faked: none here."""
    from neuromoe.engine import checkpoint

    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    state = checkpoint.rng_state()
    assert [int(s[0]) for s in state["cuda"]] == [7]
    checkpoint.set_rng_state(state)
    older = {**state, "cuda": [torch.tensor([0], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)]}
    checkpoint.set_rng_state(older)  # one state per visible GPU: this process's GPU's (1)
    checkpoint.set_rng_state({**state, "cuda": [torch.tensor([5], dtype=torch.uint8)] * 3})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 4)
    checkpoint.set_rng_state(older)  # more GPUs than it was saved with: nothing to restore, no IndexError
    assert restored == [7, 1, 5]


@pytest.mark.parametrize(("device", "backend", "bound"), [("cpu", "gloo", None), ("cuda", "nccl", 1)])
def test_the_process_group_backend_follows_the_runs_device(monkeypatch, device, backend, bound) -> None:
    """A --device cpu run under torchrun on a GPU machine opened an nccl group and failed at its first collective;
    a CUDA rank is bound to LOCAL_RANK modulo the GPUs it sees, before the group opens. CUDA is faked."""
    from neuromoe.engine import distributed

    opened: list[tuple[str, Any]] = []
    bound_to: list[int] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", bound_to.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: bound_to[-1])
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, init_method, **kw: opened.append((backend, kw.get("device_id"))))
    distributed.init_distributed(torch.device(device))
    assert opened[0][0] == backend and bound_to == ([bound] if bound is not None else [])
    assert opened[0][1] == (torch.device("cuda", 1) if bound is not None else None)
