"""Typed configs: presets and overrides are checked key by key and type by type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from neuromoe.config import load_config, load_family_config, parse_overrides, read_yaml, save_config, to_dict
from neuromoe.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class Outer:
    name: str = "x"
    shape: tuple[int, int, int] = (16, 16, 16)
    tasks: list[str] = field(default_factory=lambda: ["age"])
    train: Inner = field(default_factory=Inner)
    note: str | None = None


def test_overrides_parse_nested_and_typed():
    assert parse_overrides(["train.lr=0.1", "name=abc", "shape=[1,2,3]"]) == {
        "train": {"lr": 0.1},
        "name": "abc",
        "shape": [1, 2, 3],
    }


def test_load_config_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 0.5\n  steps: 3\nshape: [8, 8, 8]\n")
    cfg = load_config(Outer, "none", preset, ["train.steps=7", "train.precision=bf16"])
    assert cfg.train.lr == 0.5 and cfg.train.steps == 7 and cfg.train.precision == "bf16"
    assert cfg.shape == (8, 8, 8)
    # an int is accepted where a float is expected
    assert load_config(Outer, "none", None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "unknown config key"),
        ("train.steps=1.5", "must be an integer"),
        ("train.precision=fp16", "must be one of"),
        ("shape=[1,2]", "must have 3 items"),
        ("tasks=abc", "must be a list"),
        ("noequals", "not key=value"),
    ],
)
def test_bad_overrides_fail_clearly(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(Outer, "none", None, [override])


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(Outer, "no-such-family", "tiny")


def test_save_roundtrip(tmp_path):
    cfg = load_config(Outer, "none", None, ["note=hello", "train.lr=0.25"])
    path = save_config(cfg, tmp_path)
    assert read_yaml(path) == to_dict(cfg)
    again = load_config(Outer, "none", path)
    assert again == cfg


def test_bad_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(Outer, "none", bad)


def test_exponent_floats_and_none_for_optional_fields(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as a string: ``--set train.lr=1e-3`` (the help's own example) was refused;
    ``none`` set an optional field to the string 'none'."""
    for text, value in (("1e-3", 1e-3), ("5e-4", 5e-4), ("1E-1", 0.1)):
        assert load_config(Outer, "none", None, [f"train.lr={text}"]).train.lr == value
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 1e-4\n")  # a user's preset written the same way
    assert load_config(Outer, "none", preset).train.lr == 1e-4
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(Outer, "none", None, ["train.lr=fast"])
    assert load_config(Outer, "none", None, ["note=hello", "note=none"]).note is None
    assert load_config(Outer, "none", None, ["name=none"]).name == "none"  # a plain string stays a string


def test_conflicting_overrides_fail_clearly():
    with pytest.raises(ConfigError, match="conflicts with an earlier"):
        parse_overrides(["train=3", "train.lr=0.1"])


def test_stage_level_seed_and_device_overrides_are_kept():
    """The CLI always passes device='auto' (its default) and seed=None when no flag is given: that must not
    silently replace ``--set train.device=cpu`` or ``--set pretrain.seed=7``."""
    from neuromoe.pipelines.denseformer import DenseFormerConfig

    sets = ["train.device=cpu", "pretrain.seed=7", "train.seed=5"]
    cfg = load_family_config(DenseFormerConfig, "denseformer", "tiny", sets, seed=None, device="auto")
    assert (cfg.train.device, cfg.pretrain.seed, cfg.train.seed) == ("cpu", 7, 5)
    assert cfg.pretrain.device == "auto"
    # an explicit --seed / --device flag still sets every stage
    cfg = load_family_config(DenseFormerConfig, "denseformer", "tiny", sets, seed=3, device="cpu")
    assert (cfg.pretrain.seed, cfg.train.seed, cfg.pretrain.device, cfg.train.device) == (3, 3, "cpu", "cpu")
    cfg = load_family_config(DenseFormerConfig, "denseformer", "tiny", [], seed=None, device="auto")
    assert cfg.pretrain.seed == cfg.train.seed == cfg.seed


def test_a_saved_config_reloads_with_its_stage_seeds_and_devices(tmp_path):
    """A stage seed or device written in the config file (a saved run's config.yaml, a user's YAML) was
    replaced by the top-level seed and 'auto' when no flag was given: a rerun trained with another seed."""
    from neuromoe.config import save_config
    from neuromoe.pipelines.denseformer import DenseFormerConfig

    cfg = load_family_config(DenseFormerConfig, "denseformer", "tiny", ["train.seed=5", "train.device=cpu"],
                             seed=None, device="auto")
    saved = save_config(cfg, tmp_path)
    again = load_family_config(DenseFormerConfig, "denseformer", saved, [], seed=None, device="auto")
    assert again == cfg and (again.train.seed, again.train.device) == (5, "cpu")
    # flags still set every stage, and --set seed=N reaches the stages without a seed of their own
    flags = load_family_config(DenseFormerConfig, "denseformer", saved, [], seed=9, device="cuda")
    assert (flags.train.seed, flags.pretrain.seed, flags.train.device) == (9, 9, "cuda")
    top = load_family_config(DenseFormerConfig, "denseformer", saved, ["seed=9"], seed=None, device="auto")
    assert (top.pretrain.seed, top.train.seed) == (9, 5)


def test_a_later_stage_without_config_inherits_the_pretraining_runs_config(tmp_path, capsys):
    from neuromoe.config import inherited_preset

    run = tmp_path / "mae"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 3\n")
    assert inherited_preset(None, run) == run / "config.yaml"
    assert inherited_preset(None, run / "model") == run / "config.yaml"
    assert "pretraining run's" in capsys.readouterr().err
    assert inherited_preset("tiny", run) == "tiny"  # --config wins
    assert inherited_preset(None, None) == "demo"
    other = run / "elsewhere"
    other.mkdir()
    assert inherited_preset(None, other) == "demo"  # only model/ and experts/ look one folder up


@pytest.mark.parametrize("override, key", [("pretrain.lr=-1", "pretrain.lr"), ("pretrain.lr=.nan", "pretrain.lr"),
                                           ("pretrain.log_every=0", "pretrain.log_every"),
                                           ("train.num_workers=-1", "train.num_workers"),
                                           ("pretrain.precision=fp16", "pretrain.precision"),
                                           ("train.warmup_frac=2", "train.warmup_frac"),
                                           ("train.device=gpu", "train.device")])
def test_training_values_of_the_right_type_but_unusable_are_named_under_their_section(override, key) -> None:
    """lr=-1, log_every=0, num_workers=-1 passed the type check and crashed later with tracebacks; fp16 was
    refused as 'train.precision' whatever section it was in."""
    from neuromoe.errors import ConfigError
    from neuromoe.pipelines.denseformer import load_denseformer_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_denseformer_config("tiny", [override])


def test_a_resume_refuses_another_config_than_the_runs(tmp_path):
    """--resume with another lr or top_k ran on with the checkpoint's optimiser and weights while the run folder
    recorded the new values; where it runs and how it reports (device, progress) may change."""
    from neuromoe.pipelines.mome import load_mome_config

    save_config(load_mome_config("tiny", device="cpu"), tmp_path)
    save_config(load_mome_config("tiny", ["train.progress=false"], device="cuda"), tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"train\.lr 0\.003 → 0\.5.*resume with --config") as info:
        save_config(load_mome_config("tiny", ["train.lr=0.5"], device="cpu"), tmp_path, resume=True)
    assert str(tmp_path / "config.yaml") in str(info.value)
    with pytest.raises(ConfigError, match=r"model\.top_k"):
        save_config(load_mome_config("tiny", ["model.top_k=1"], device="cpu"), tmp_path, resume=True)
    assert read_yaml(tmp_path / "config.yaml")["train"]["lr"] != 0.5  # the refused config is not written
    save_config(load_mome_config("tiny", ["train.lr=0.5"], device="cpu"), tmp_path)  # a new run: written
    assert read_yaml(tmp_path / "config.yaml")["train"]["lr"] == 0.5
    # a run saved before a key existed (resumable, 2026-12-06) resumes: the missing key is its default
    text = (tmp_path / "config.yaml").read_text().replace("  resumable: true\n", "")
    assert "resumable" not in text
    (tmp_path / "config.yaml").write_text(text)
    save_config(load_mome_config(tmp_path / "config.yaml"), tmp_path, resume=True)


def test_only_rank_zero_writes_the_config(tmp_path, monkeypatch):
    """Under torchrun every rank replaced the run's config.yaml beside rank 0 on a shared filesystem; a resume is
    still checked on every rank, so all of them refuse a changed config."""
    from neuromoe.pipelines.mome import load_mome_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    save_config(load_mome_config("tiny", device="cpu"), tmp_path / "alone")  # RANK without torchrun's WORLD_SIZE
    assert (tmp_path / "alone" / "config.yaml").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    save_config(load_mome_config("tiny", device="cpu"), tmp_path)
    assert not (tmp_path / "config.yaml").exists()
    monkeypatch.setenv("RANK", "0")
    save_config(load_mome_config("tiny", device="cpu"), tmp_path)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"train\.lr"):
        save_config(load_mome_config("tiny", ["train.lr=0.5"], device="cpu"), tmp_path, resume=True)


@dataclass
class Counts:
    epochs: int = 10
    lr: float = 1e-3
    flag: bool = False
    modalities: list[str] = field(default_factory=lambda: ["t1"])
    name: str = "x"


def test_numbers_and_booleans_read_as_yaml_1_2(tmp_path):
    """PyYAML's YAML 1.1 read ``epochs=010`` as octal 8, ``1:30`` as base-60 90 and ``no`` as false: an epoch
    count silently changed and a modality list ``[t1, no]`` was refused as 'must be a string, got False'."""
    assert load_config(Counts, "none", None, ["epochs=010"]).epochs == 10
    with pytest.raises(ConfigError, match="must be an integer, got '1:30'"):
        load_config(Counts, "none", None, ["epochs=1:30"])
    assert load_config(Counts, "none", None, ["modalities=[t1, no, on, yes, off]"]).modalities == [
        "t1", "no", "on", "yes", "off"]
    with pytest.raises(ConfigError, match="must be true or false, got 'yes'"):
        load_config(Counts, "none", None, ["flag=yes"])
    assert parse_overrides(["a=true", "b=False", "c=-5", "d=0x1F", "e=0o17", "f=3.0e-3", "g=.inf", "h=1."]) == {
        "a": True, "b": False, "c": -5, "d": 31, "e": 15, "f": 3.0e-3, "g": float("inf"), "h": 1.0}
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 010\nmodalities: [t1, no]\nname: 1:30\nlr: 1e-4\n")
    cfg = load_config(Counts, "none", preset)
    assert (cfg.epochs, cfg.modalities, cfg.name, cfg.lr) == (10, ["t1", "no"], "1:30", 1e-4)


def test_strings_that_look_like_numbers_survive_a_save(tmp_path):
    """Strings YAML 1.1 leaves as strings but 1.2 reads as numbers (``1e3``, ``0o7``) are quoted when saved, and
    those 1.1 reads as numbers or booleans (``no``, ``010``) too, so the saved config reloads the same."""
    cfg = load_config(Counts, "none", None, ["name='1e3'", "modalities=['0o7', 'no', '010', '1:30']"])
    again = load_config(Counts, "none", save_config(cfg, tmp_path))
    assert again == cfg and again.name == "1e3" and again.modalities == ["0o7", "no", "010", "1:30"]


@pytest.mark.parametrize("family, override, key", [
    ("mome", "eval.threshold=nan", "eval.threshold"),  # segment wrote lesion volume 0 for every case
    ("mome", "eval.threshold=1.5", "eval.threshold"),
    ("mome", "eval.n_overlays=-1", "eval.n_overlays"),
    ("mome", "data.fg_fraction=1.5", "data.fg_fraction"),
    ("mome", "data.modality_dropout=-0.1", "data.modality_dropout"),
    ("mome", "data.patch_size=[16,16]", "data.patch_size"),
    ("mome", "data.patch_size=[16,0,16]", "data.patch_size"),
    ("mome", "data.samples_per_epoch=-1", "data.samples_per_epoch"),
    ("mome", "model.top_k=6", "model.top_k"),
    ("mome", "model.modalities=[]", "model.modalities"),
    ("mome", "gate_supervision=-1", "gate_supervision"),
    ("brainmoe", "eval.folds=1", "eval.folds"),
    ("brainmoe", "eval.svm_c=[0.0,1.0]", "eval.svm_c"),
    ("brainmoe", "eval.mlp_hidden=0", "eval.mlp_hidden"),
    ("brainmoe", "model.top_k=0", "model.top_k"),
    ("brainmoe", "model.router_noise=-0.5", "model.router_noise"),
    ("brainmoe", "model.balance_coef=nan", "model.balance_coef"),
    ("brainmoe", "model.z_coef=-1", "model.z_coef"),
    ("brainmoe", "model.dropout=1", "model.dropout"),
    ("brainmoe", "model.dense_warmup=2", "model.dense_warmup"),
    ("brainmoe", "model.router_pca=0", "model.router_pca"),
    ("brainmoe", "expert.kind=fc_mae expert.mask_ratio=1", "expert.mask_ratio"),
    ("denseformer", "eval.alpha=0", "eval.alpha"),
    ("denseformer", "eval.alpha=1.2", "eval.alpha"),
    ("denseformer", "eval.n_bootstrap=-1", "eval.n_bootstrap"),
    ("denseformer", "model.top_k=9", "model.top_k"),
    ("denseformer", "model.num_experts=0", "model.num_experts"),
    ("denseformer", "model.head_drop=1", "model.head_drop"),
    ("denseformer", "model.mask_ratio=1", "model.mask_ratio"),
    ("denseformer", "model.balance_coef=-0.01", "model.balance_coef"),
    # a monitor typo surfaced after the first epoch; a Dice monitored with mode 'min' kept the worst checkpoint
    ("mome", "train.monitor=val_dce", "train.monitor"),
    ("mome", "pretrain.monitor=val_dice", "pretrain.monitor_mode"),
    ("brainmoe", "train.monitor=val_acc", "train.monitor"),
    ("denseformer", "pretrain.monitor=val_loss_age", "pretrain.monitor"),
    ("denseformer", "train.monitor=val_loss_agee", "train.monitor"),
])
def test_section_values_of_the_right_type_but_unusable_are_refused_at_load(family, override, key) -> None:
    """Only the train sections and DenseFormer's finetune refused unusable values: a NaN or 1.5 MoME threshold,
    one fold or a negative router noise were accepted, stored in config.json and failed (or ran wrong) later."""
    import importlib

    load = getattr(importlib.import_module(f"neuromoe.pipelines.{family}"), f"load_{family}_config")
    sets = ["eval.tune_threshold=false"] if family == "mome" else []
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} .*fix: e\.g\. --set {key.replace('.', '[.]')}="):
        load("tiny", [*sets, *override.split()])
    for preset in ("tiny", "demo", "paper"):  # the bundled presets stay valid
        load(preset, sets)


def test_section_checks_follow_what_the_setting_is_used_for() -> None:
    """Values that look out of range but are used: a MoME+ modality dropout of 1 keeps one modality per case,
    a JEPA window setting is not checked for a state classifier, nor top_k for a head without experts."""
    from neuromoe.pipelines.brainmoe import load_brainmoe_config
    from neuromoe.pipelines.denseformer import load_denseformer_config
    from neuromoe.pipelines.mome import load_mome_config

    assert load_mome_config("tiny", ["data.modality_dropout=1", "data.fg_fraction=0"]).data.modality_dropout == 1
    assert load_mome_config("tiny", ["model.kind=unet", "model.top_k=9"]).model.top_k == 9
    assert load_brainmoe_config("tiny", ["expert.kind=state_clf", "expert.n_windows=1"]).expert.n_windows == 1
    with pytest.raises(ConfigError, match=r"expert\.n_windows"):
        load_brainmoe_config("tiny", ["expert.kind=jepa", "expert.n_windows=1"])
    assert load_denseformer_config("tiny", ["model.head=shared", "model.top_k=0"]).model.top_k == 0
    assert load_mome_config("tiny", ["train.monitor=val_dice", "train.monitor_mode=max"]).train.monitor == "val_dice"
    assert load_denseformer_config("tiny", ["train.monitor=val_loss_age"]).train.monitor == "val_loss_age"
