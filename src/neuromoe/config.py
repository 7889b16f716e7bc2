"""Typed configuration: dataclasses filled from YAML presets and ``key.sub=value`` overrides.

Each family defines a (nested) dataclass. :func:`load_config` starts from the dataclass defaults, applies
a preset (a name under ``neuromoe/configs/<family>/`` or a YAML path), then CLI overrides, and checks
every key and type so a typo fails with one clear message instead of silently doing nothing. The
resolved config is saved in every run directory with :func:`save_config`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from neuromoe.errors import ConfigError
from neuromoe.io.atomic import atomic_write_text

T = TypeVar("T")

_NUMERIC_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader reading numbers and booleans as YAML 1.2's core schema does. PyYAML follows YAML 1.1, where
    ``epochs: 010`` is octal 8, ``1:30`` is base-60 90 and ``no``/``on`` are booleans (``[t1, no]`` was no list
    of strings); here they are 10 and the strings ``'1:30'`` and ``'no'``, and ``1e-3`` is a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _NUMERIC_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (  # int before float: the float pattern also matches "10"
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
     "-+.0123456789"),
):
    _Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """Decimal whatever its leading zeros; ``0o``/``0x`` prefixes for octal and hexadecimal (YAML 1.2)."""
    text = str(loader.construct_scalar(node))
    try:
        return int(text, 0) if text.startswith(("0o", "0x")) else int(text, 10)
    except ValueError:  # only reachable through an explicit !!int tag
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Dumper(yaml.SafeDumper):
    """Quotes a string that YAML 1.1 *or* 1.2 would read as another type (``'no'``, ``'1e3'``, ``'0o7'``), so a
    saved config reads back the same here and in any other YAML reader."""


for _first, _resolvers in _Yaml12Loader.yaml_implicit_resolvers.items():
    for _tag, _rx in _resolvers:
        if _tag in _NUMERIC_TAGS:
            _Dumper.add_implicit_resolver(_tag, _rx, [_first])


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass: no arbitrary objects


def preset_path(family: str, name: str) -> Path:
    """Path of a bundled preset YAML (``tiny``, ``demo``, ``paper``...) of a family."""
    path = Path(str(resources.files("neuromoe") / "configs" / family / f"{name}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ConfigError(
            f"unknown preset '{name}' for family '{family}'",
            fix=f"use one of {available} or a path to a YAML file",
        )
    return path


def inherited_preset(preset: str | Path | None, stage_dir: str | Path | None) -> str | Path:
    """``--config`` if given; else the resolved ``config.yaml`` of the run that wrote ``stage_dir`` (the
    pretraining folder, or its ``model``/``experts`` subfolder), so a later stage rebuilds the architecture
    its pretrained weights have; else the ``demo`` preset."""
    if preset is not None or stage_dir is None:
        return preset or "demo"
    d = Path(stage_dir)
    for candidate in (d / "config.yaml", *([d.parent / "config.yaml"] if d.name in ("model", "experts") else [])):
        if candidate.is_file():
            print(f"neuromoe: no --config given: using the pretraining run's {candidate}", file=sys.stderr)
            return candidate
    return "demo"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config file not found", path=path, fix="check the path") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML ({exc.__class__.__name__})", path=path, fix="fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of keys to values", path=path)
    return data


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.depth=2"]`` → nested dict; values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value", fix="write e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        try:
            value = _load_yaml(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier --set {part}=...",
                                  fix=f"set either '{part}' or its sub-keys, not both")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or cls.__name__}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}",
            fix=f"valid keys under '{where or 'top level'}': {', '.join(sorted(fields))}",
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    obj = cls(**kwargs)
    check_values(obj, where)
    return obj


def check_values(obj: Any, where: str) -> None:
    """Refuse values of the right type that are unusable (a dataclass's ``problems()``), named under ``where``."""
    for key, what, value in getattr(obj, "problems", lambda: [])():
        raise ConfigError(f"{where}{key} {what}", fix=f"e.g. --set {where}{key}={value}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, where=f"{key}.")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value in ("none", "None")):  # YAML's null is "null" or "~"
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"'{key}' has an invalid value {value!r}", fix=f"expected {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"'{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{key}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, key) for a, v in zip(args, value))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # "nan", "inf", "1_000": YAML 1.2 reads them as strings
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data (YAML/JSON-safe) view of a config dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def load_config(
    cls: type[T], family: str, preset: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Defaults of ``cls`` ← preset (name or YAML path) ← ``key=value`` overrides."""
    return from_dict(cls, deep_merge(_preset_data(family, preset), parse_overrides(overrides)))


def _preset_data(family: str, preset: str | Path | None) -> dict[str, Any]:
    if not preset:
        return {}
    p = Path(preset)
    return read_yaml(p if p.suffix in (".yaml", ".yml") or p.exists() else preset_path(family, str(preset)))


def load_family_config(
    cls: type[T],
    family: str,
    preset: str | Path | None = "demo",
    overrides: list[str] | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> T:
    """A family config (with ``seed``, ``pretrain`` and ``train`` sections): preset ← ``--set`` overrides ←
    ``--seed``/``--device``, which also reach both training configs so one flag sets every stage.

    A stage's own seed or device stays when it was asked for: by ``--set <stage>.seed=…``, or in the config
    file (a seed other than the file's top-level one, a device other than ``auto``), so a saved run config
    reloads as it was saved."""
    data = _preset_data(family, preset)
    cfg = from_dict(cls, deep_merge(data, parse_overrides(overrides)))
    explicit = parse_overrides(overrides)
    if seed is not None:
        cfg.seed = seed  # type: ignore[attr-defined]
    for stage in ("pretrain", "train"):
        tc = getattr(cfg, stage)
        given = explicit.get(stage) if isinstance(explicit.get(stage), dict) else {}
        in_file = data.get(stage) if isinstance(data.get(stage), dict) else {}
        own_seed = "seed" in given or ("seed" in in_file and in_file["seed"] != data.get("seed", 0))
        own_device = "device" in given or in_file.get("device", "auto") != "auto"
        if seed is not None or not own_seed:  # --seed wins; else the stage's own seed stays
            tc.seed = cfg.seed  # type: ignore[attr-defined]
        if device is not None and (device != "auto" or not own_device):  # "auto" = flag not given
            tc.device = device
    return cfg


# What a resumed run may change: where it runs and how it reports, not what it computes
RESUME_FREE = frozenset({"device", "progress", "num_workers", "log_every", "ckpt_every", "channels_last", "cache_dir"})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}{key}.").items()} or {prefix: {}}


def _same(a: Any, b: Any) -> bool:
    """Equal as YAML would write them (tuples as lists), NaN equal to NaN."""
    a, b = _load_yaml(yaml.dump(a, Dumper=_Dumper)), _load_yaml(yaml.dump(b, Dumper=_Dumper))
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def save_config(cfg: Any, run_dir: str | Path, name: str = "config.yaml", *, resume: bool = False) -> Path:
    """Write the resolved config. With ``resume`` the run's saved config must match it: the checkpoint continues
    the run as it was configured (optimiser, schedule, weights), so another learning rate, epoch count or
    ``top_k`` was recorded in the run folder without having been used (``RESUME_FREE`` keys may change).
    Under torchrun only rank 0 writes: the other ranks replaced the same file beside it on a shared filesystem."""
    path = Path(run_dir) / name
    text = yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)
    if resume and path.is_file():
        # the saved file read through the same dataclass: a key added since it was written takes its default
        # (a run saved before `resumable` existed read as "None → True", refusing the --config it suggests)
        try:
            old = _flat(to_dict(from_dict(type(cfg), read_yaml(path)))) if dataclasses.is_dataclass(cfg) else {}
        except ConfigError as exc:
            raise ConfigError(f"--resume: the run's config no longer loads ({exc})", path=path,
                              fix="start a new run in another --out folder") from None
        new = _flat(_load_yaml(text))
        changed = [k for k in dict.fromkeys([*old, *new])
                   if k.rsplit(".", 1)[-1] not in RESUME_FREE and not _same(old.get(k), new.get(k))]
        if changed:
            what = ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in changed[:4])
            raise ConfigError(f"--resume with another config than the run's ({what}"
                              f"{f' and {len(changed) - 4} more' if len(changed) > 4 else ''}); the checkpoint "
                              "continues the run as it was configured", path=path,
                              fix=f"resume with --config {path} (and the same flags), or start a new run in "
                                  "another --out folder")
    # torchrun: every rank checks a resume, rank 0 alone writes the file (a single process writes whatever RANK says)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(path, text)
    return path
