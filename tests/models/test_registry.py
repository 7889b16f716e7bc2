"""Registry and safe model-directory format: round trip, and every unsafe directory refused."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from neuromoe.errors import ConfigError, ModelFormatError
from neuromoe.models import PretrainedMixin, create_model, list_models, load_model, register_model, save_model
from neuromoe.models.registry import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME


class _TinyNet(PretrainedMixin, nn.Module):
    def __init__(self, dim: int = 4, hidden: int = 8, tie: bool = False):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.norm = nn.BatchNorm1d(hidden)
        if tie:
            self.out2 = self.out  # tied module: shared storage in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x))))


@register_model("test_registry_tiny", family="testfam")
def _tiny(**kw) -> _TinyNet:
    return _TinyNet(**kw)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("test_registry_tiny", hidden=6, tie=True)
    model.train()
    model(torch.randn(16, 4))  # update BatchNorm running stats: buffers must round-trip too
    return save_model(model.eval(), tmp_path / "m", {"tasks": [{"name": "age", "type": "regression"}],
                                                      "label_maps": {"sex": ["F", "M"]},
                                                      "preprocessing": {"spacing": [2.0, 2.0, 2.0]},
                                                      "extra": {"note": "x", "n": 3}})


def test_registry_lists_and_rejects_unknown() -> None:
    assert "test_registry_tiny" in list_models()
    assert list_models("testfam") == ["test_registry_tiny"]
    with pytest.raises(ConfigError, match=r"unknown model 'nope'.*test_registry_tiny"):
        create_model("nope")
    with pytest.raises(ConfigError, match="invalid arguments"):
        create_model("test_registry_tiny", no_such_option=1)
    model = create_model("test_registry_tiny", hidden=5)
    assert model.neuromoe_config == {"architecture": "test_registry_tiny", "kwargs": {"hidden": 5}}


def test_round_trip_identical_outputs(saved: Path) -> None:
    config = json.loads((saved / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION and config["family"] == "testfam"
    assert config["kwargs"] == {"hidden": 6, "tie": True}
    model, meta = load_model(saved)
    assert not model.training and model.neuromoe_meta == meta
    assert meta["label_maps"] == {"sex": ["F", "M"]} and meta["extra"]["n"] == 3
    torch.manual_seed(0)
    ref = create_model("test_registry_tiny", hidden=6, tie=True)
    ref.train()
    ref(torch.randn(16, 4))
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), ref.eval()(x), rtol=0, atol=0)
    again = _TinyNet.from_pretrained(saved)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.save_pretrained(saved.parent / "again", extra={"k": 1}).joinpath(WEIGHTS_NAME).is_file()


def test_identical_models_write_identical_bytes(saved: Path) -> None:
    """Checksums of weights (content-addressed storage, reproducibility checks) must not depend on the run."""
    model, _ = load_model(saved)
    digests = {(save_model(model, saved.parent / f"copy{i}") / WEIGHTS_NAME).read_bytes() for i in range(8)}
    assert len(digests) == 1


def test_weights_of_another_run_are_refused(saved: Path, tmp_path: Path) -> None:
    """The config holds what fits its weights (preprocessing, label maps, calibration); another run's
    model.safetensors of the same architecture loaded silently. A folder written before the digest still loads."""
    torch.manual_seed(1)
    other = save_model(create_model("test_registry_tiny", hidden=6, tie=True), tmp_path / "other")
    shutil.copy(other / WEIGHTS_NAME, saved / WEIGHTS_NAME)
    with pytest.raises(ModelFormatError, match=r"not the file this config\.json was saved with") as info:
        load_model(saved)
    assert str(saved / WEIGHTS_NAME) in str(info.value) and "as a whole" in str(info.value)
    config = json.loads((saved / CONFIG_NAME).read_text())
    del config["weights_sha256"]
    config["format_version"] = 1
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    load_model(saved)


def test_loading_runs_no_unpickling(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "load", boom)
    model, _ = load_model(saved)
    assert isinstance(model, _TinyNet)


@pytest.mark.parametrize("name", ["weights.pt", "extra.pth", "state.pkl", "pytorch_model.bin", "a.ckpt"])
def test_planted_pickle_by_name_refused(saved: Path, name: str) -> None:
    torch.save({"x": torch.zeros(1)}, saved / name)
    with pytest.raises(ModelFormatError, match="pickle"):
        load_model(saved)


def test_planted_pickle_by_magic_refused(saved: Path) -> None:
    (saved / "README").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFormatError, match="pickle data"):
        load_model(saved)
    (saved / "README").unlink()
    torch.save({"x": torch.zeros(1)}, saved / "notes.txt")  # zip container holding data.pkl
    with pytest.raises(ModelFormatError, match="pickle data"):
        load_model(saved)


def test_weights_replaced_by_pickle_refused(saved: Path) -> None:
    torch.save({"x": torch.zeros(1)}, saved / WEIGHTS_NAME)
    with pytest.raises(ModelFormatError, match="pickle data"):
        load_model(saved)


def test_symlink_escaping_refused(saved: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.move(saved / WEIGHTS_NAME, outside)
    os.symlink(outside, saved / WEIGHTS_NAME)
    with pytest.raises(ModelFormatError, match="symlink points outside"):
        load_model(saved)


def test_symlink_inside_allowed(saved: Path) -> None:
    shutil.move(saved / WEIGHTS_NAME, saved / "w.safetensors")
    os.symlink("w.safetensors", saved / WEIGHTS_NAME)
    load_model(saved)


def _edit_config(saved: Path, **changes) -> None:
    path = saved / CONFIG_NAME
    config = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k)
        else:
            config[k] = v
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"surprise": 1}, "unknown config keys"),
        ({"kwargs": "hidden=6"}, "'kwargs' must be dict"),
        ({"format_version": "1"}, "'format_version' must be int"),
        ({"format_version": True}, "'format_version' must be int"),
        ({"architecture": None}, "missing config key 'architecture'"),
        ({"architecture": "os.system"}, "unknown architecture"),
        ({"family": "denseformer"}, "does not match"),
        ({"kwargs": {"__class__": 1}}, "cannot rebuild"),
        ({"format_version": FORMAT_VERSION + 1}, "newer NeuroMoE"),
        ({"tasks": ["age"]}, "list of objects"),
        ({"extra": "x" * (17 * 2**20)}, "larger than 16 MiB"),
    ],
)
def test_bad_config_refused(saved: Path, changes: dict, message: str) -> None:
    _edit_config(saved, **changes)
    with pytest.raises(ModelFormatError, match=message):
        load_model(saved)


def test_invalid_json_and_missing_files(saved: Path, tmp_path: Path) -> None:
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ModelFormatError, match="invalid JSON"):
        load_model(saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(ModelFormatError, match=r"missing config\.json"):
        load_model(saved)
    with pytest.raises(ModelFormatError, match="not found"):
        load_model(tmp_path / "nowhere")


def test_tensor_mismatches_refused(saved: Path) -> None:
    good, _ = load_model(saved)
    state = {k: v.clone() for k, v in good.state_dict().items() if k != "out2.weight" and k != "out2.bias"}
    state["inp.weight"] = torch.zeros(7, 4)
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(ModelFormatError, match="missing tensors"):
        load_model(saved)
    state = {k: v.clone() for k, v in good.state_dict().items()}
    state["inp.weight"] = torch.zeros(7, 4)
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(ModelFormatError, match=r"'inp.weight' has shape \(7, 4\)"):
        load_model(saved)
    state["inp.weight"] = torch.zeros(6, 4)
    state["rogue"] = torch.zeros(1)
    save_file(state, str(saved / WEIGHTS_NAME))
    with pytest.raises(ModelFormatError, match="unexpected tensors"):
        load_model(saved)
    (saved / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelFormatError, match="not a valid safetensors"):
        load_model(saved)


def test_save_requires_registered_model_and_known_meta(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="create_model"):
        save_model(_TinyNet(), tmp_path / "a")
    model = create_model("test_registry_tiny")
    with pytest.raises(ModelFormatError, match="unknown model metadata"):
        save_model(model, tmp_path / "b", {"weights_path": "/x"})
    with pytest.raises(ModelFormatError, match="not JSON"):
        save_model(model, tmp_path / "c", {"extra": {"obj": object()}})
    assert not (tmp_path / "c").exists()  # nothing half-written


def test_from_pretrained_checks_class(saved: Path) -> None:
    class Other(PretrainedMixin, nn.Module):
        pass

    with pytest.raises(ModelFormatError, match="holds a _TinyNet, not a Other"):
        Other.from_pretrained(saved)


def test_core_presets_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("simple_cnn_moe_tiny", num_experts=3).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    loaded, meta = load_model(save_model(model, tmp_path / "core", {"extra": {"target_mean": 60.0}}))
    assert meta["family"] == "core" and meta["kwargs"] == {"num_experts": 3}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).prediction, model(x).prediction, rtol=0, atol=0)


def test_directory_symlinks_are_not_followed(saved: Path, tmp_path: Path) -> None:
    os.symlink(".", saved / "self")  # a loop inside the directory is harmless and not walked
    load_model(saved)
    os.symlink(tmp_path, saved / "sub")
    with pytest.raises(ModelFormatError, match="symlink points outside"):
        load_model(saved)


class _WidthsNet(PretrainedMixin, nn.Module):
    def __init__(self, widths: list[int] | None = None):
        super().__init__()
        widths = [int(w) for w in (widths if widths is not None else [4, 4])]
        self.layers = nn.Sequential(*(nn.Linear(a, b) for a, b in itertools.pairwise(widths)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model("test_registry_widths", family="testfam_arrays")  # own family: list_models("testfam") is pinned
def _widths(**kw) -> _WidthsNet:
    return _WidthsNet(**kw)


@pytest.mark.parametrize("array", [np.array, torch.tensor], ids=["numpy", "torch"])
def test_array_valued_kwargs_are_saved_as_lists(tmp_path: Path, array: Callable[[list[int]], Any]) -> None:
    """A numpy array / tensor kwarg (e.g. layer widths read from a config) is saved as a JSON list: every
    array has ``.item()``, so trying it before ``.tolist()`` refused (numpy) or crashed (torch) the save."""
    torch.manual_seed(0)
    model = create_model("test_registry_widths", widths=array([4, 6, 2])).eval()
    extra = {"scale": array([0.5, 2.0]), "n": np.int64(3), "t": torch.tensor(0.25)}  # scalars stay numbers
    loaded, meta = load_model(save_model(model, tmp_path / "m", {"extra": extra}))
    assert meta["kwargs"] == {"widths": [4, 6, 2]} and meta["extra"] == {"scale": [0.5, 2.0], "n": 3, "t": 0.25}
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_save_model_refuses_metadata_load_model_would_refuse(tmp_path) -> None:
    """tasks=['age'] or preprocessing='zscore' were saved, then every load_model failed on the folder."""
    model = create_model("simple_cnn_moe_tiny")
    for meta in ({"tasks": ["age"]}, {"preprocessing": "zscore"}):
        with pytest.raises(ModelFormatError, match="must be"):
            save_model(model, tmp_path / "m", meta)
        assert not (tmp_path / "m").exists()


def test_bad_constructor_values_are_config_errors_and_model_format_errors_on_load(tmp_path) -> None:
    """A bad value (not only a bad name) is one ConfigError, and a tampered saved kwarg one ModelFormatError
    naming the file; they were raw KeyError / ValueError tracebacks."""
    with pytest.raises(ConfigError, match="denseformer_mae"):
        create_model("denseformer_mae", preset="small")
    with pytest.raises(ConfigError, match="denseformer_tiny"):
        create_model("denseformer_tiny", head="bogus")
    d = save_model(create_model("denseformer_tiny"), tmp_path / "df")
    config = json.loads((d / "config.json").read_text())
    config["kwargs"]["head"] = "bogus"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="cannot rebuild 'denseformer_tiny'") as info:
        load_model(d)
    assert "config.json" in str(info.value)
    # one fix: it kept the ConfigError's inside its message ("— fix: check the model options — fix: restore ...")
    assert str(info.value).count("fix:") == 1 and str(info.value).endswith("fix: restore the original file")


@pytest.mark.parametrize("name, kwargs, raw", [("denseformer_tiny", {"patch_size": 0}, ZeroDivisionError),
                                               ("brainmoe_tiny", {"n_experts": 0}, IndexError)])
def test_any_failure_building_a_model_is_one_config_error_naming_model_and_kwargs(name, kwargs, raw) -> None:
    """patch_size=0 / n_experts=0 escaped as raw ZeroDivisionError / IndexError tracebacks: only TypeError,
    ValueError and KeyError were turned into a ConfigError."""
    key = next(iter(kwargs))
    with pytest.raises(ConfigError, match=rf"model '{name}' \({key}=0\).*fix: check the model options") as info:
        create_model(name, **kwargs)
    assert isinstance(info.value.__cause__, raw)  # the original stays for debugging


def test_running_out_of_memory_while_building_is_not_called_a_bad_argument(monkeypatch) -> None:
    """A paper preset on a small machine: 'DefaultCPUAllocator: can't allocate memory' came out as "invalid
    arguments for model" with the fix "check the model options"."""
    from neuromoe.models import registry

    def oom(**kw):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    entry = registry._entry("denseformer_tiny")
    monkeypatch.setitem(registry._REGISTRY, "denseformer_tiny", registry._Entry(oom, entry.family))
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        create_model("denseformer_tiny")


def test_require_meta_names_the_missing_family_key(tmp_path) -> None:
    from neuromoe.models.registry import require_meta

    meta = {"preprocessing": None, "extra": {"fc": {"kind": "tangent"}, "age": 0}}
    require_meta(meta, ("extra.fc", "extra.fc.kind", "extra.age"), tmp_path)  # 0 is a value, not missing
    for key in ("preprocessing", "extra.age_stats", "label_maps", "extra.fc.kind.x"):
        with pytest.raises(ModelFormatError, match=f"config key '{key}' is missing") as info:
            require_meta(meta, (key,), tmp_path)
        assert str(tmp_path / "config.json") in str(info.value)
