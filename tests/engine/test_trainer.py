"""Trainer: learns, logs, resumes bit-exactly, stops early, writes checkpoints atomically."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from neuromoe.config import from_dict
from neuromoe.engine import TrainConfig, Trainer, load_checkpoint, resolve_device
from neuromoe.errors import ConfigError, ModelFormatError


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
    with pytest.raises(KeyboardInterrupt):
        MSETrainer(_model(), _cfg(epochs=1, ckpt_every=1), _data(), run_dir=tmp_path).fit()
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
