"""Model registry and the safe model-directory format.

A model directory is ``config.json`` + ``model.safetensors`` and nothing that can execute code:
loading reads JSON and safetensors only, rebuilds the architecture from *registered* factories (code
that ships with NeuroMoE) and never unpickles. Researchers exchange model directories, so everything
suspicious (pickle files, symlinks leaving the folder, unknown config keys, mis-shaped tensors, a
newer format) is refused with one line that names the file and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from neuromoe import __version__
from neuromoe.errors import ConfigError, ModelFormatError, NeuroMoEError
from neuromoe.io.atomic import atomic_write_bytes, atomic_write_json

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "create_model",
    "list_models",
    "load_model",
    "model_family",
    "register_model",
    "require_meta",
    "save_model",
    "weights_digest",
]

FORMAT_VERSION = 2  # 2: config.json holds the sha256 of its weights
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Modules whose import registers the families' presets; imported lazily on first lookup so that
# ``import neuromoe.models`` stays cheap and families can import this module without a cycle.
FAMILY_MODULES = (
    "neuromoe.models.simple",
    "neuromoe.models.denseformer",
    "neuromoe.models.mome",
    "neuromoe.models.brainmoe",
)

# config.json schema: key → accepted types (``None`` allowed where listed).
CONFIG_SCHEMA: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "neuromoe_version": (str,),
    "family": (str,),
    "architecture": (str,),
    "kwargs": (dict,),
    "preprocessing": (dict, type(None)),
    "tasks": (list,),
    "label_maps": (dict,),
    "extra": (dict,),
    "weights_sha256": (str,),
}
REQUIRED_KEYS = ("format_version", "family", "architecture", "kwargs")
META_KEYS = ("family", "preprocessing", "tasks", "label_maps", "extra")

# Anything torch/pickle could have produced. Refused by name and, for renamed files, by magic bytes.
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib", ".npy", ".npz"}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container (a zip holding data.pkl)
MAX_CONFIG_BYTES = 16 * 2**20  # a real config.json is a few kB; refuse to parse a huge one

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    family: str


_REGISTRY: dict[str, _Entry] = {}
_families_imported = False


def register_model(name: str, *, family: str) -> Callable[[Callable[..., M]], Callable[..., M]]:
    """Decorator registering a factory ``(**kwargs) -> nn.Module`` under ``name`` (a preset name)."""

    def decorator(factory: Callable[..., M]) -> Callable[..., M]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.factory is not factory and (
            existing.factory.__module__,
            existing.factory.__qualname__,
        ) != (factory.__module__, factory.__qualname__):
            raise ConfigError(f"model name '{name}' is registered twice", fix="pick a unique preset name")
        _REGISTRY[name] = _Entry(factory, family)
        return factory

    return decorator


def _import_families() -> None:
    """Import the bundled family modules once so their ``@register_model`` decorators run."""
    global _families_imported
    if _families_imported:
        return
    _families_imported = True
    for module in FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a family that is not installed/landed yet
            if exc.name != module:
                raise


def list_models(family: str | None = None) -> list[str]:
    """Sorted registered model names, optionally of one family."""
    _import_families()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        _import_families()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'", fix=f"use one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_family(name: str) -> str:
    """Family of a registered model name."""
    return _entry(name).family


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` overriding its preset.

    The result carries ``model.neuromoe_config = {"architecture": name, "kwargs": kwargs}`` so that
    :func:`save_model` can rebuild it later from JSON alone.
    """
    entry = _entry(name)
    try:
        model = entry.factory(**kwargs)
    except (NeuroMoEError, MemoryError, torch.OutOfMemoryError):  # a paper preset on a small machine is no bad value
        raise
    except Exception as exc:  # any bad value: preset='small' (KeyError), patch_size=0 (ZeroDivisionError) ...
        if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):  # the CPU allocator's
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        given = given if len(given) <= 200 else given[:200] + "…"
        raise ConfigError(f"invalid arguments for model '{name}' ({given}): {exc.__class__.__name__}: {exc}",
                          fix="check the model options") from exc
    model.neuromoe_config = {"architecture": name, "kwargs": dict(kwargs)}
    return model


# ----------------------------------------------------------------------------------------------- save


def _json_checked(obj: Any, what: str, directory: Path) -> Any:
    """Round-trip through JSON so that what is saved is exactly what will be loaded."""
    try:
        return json.loads(json.dumps(obj, default=_to_json))
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"{what} is not JSON-serialisable ({exc})", path=directory,
                               fix="pass plain numbers, strings, lists and dicts") from None


def _to_json(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch scalars and arrays
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU state dict with one exact-size storage per tensor (safetensors refuses shared/partial views,
    e.g. tied weights or slices); the copy costs one model's worth of memory, once per save."""
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for k, v in model.state_dict().items()}


def save_model(model: nn.Module, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``directory/config.json`` + ``directory/model.safetensors`` atomically; return ``directory``.

    ``meta`` may hold ``family``, ``preprocessing`` (a ``PreprocSpec.to_dict()``), ``tasks``,
    ``label_maps`` and a free ``extra`` dict. The model must come from :func:`create_model`.
    """
    directory = Path(directory)
    meta = dict(meta or {})
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise ModelFormatError(f"unknown model metadata keys {unknown}", path=directory,
                               fix=f"use only {list(META_KEYS)} and put the rest under 'extra'")
    nc = getattr(model, "neuromoe_config", None)
    if not isinstance(nc, dict) or "architecture" not in nc:
        raise ModelFormatError("model was not built by neuromoe.models.create_model", path=directory,
                               fix="create it with create_model(name, ...) so it can be rebuilt on load")
    family = model_family(nc["architecture"])
    if meta.get("family", family) != family:
        raise ModelFormatError(f"family '{meta['family']}' does not match architecture "
                               f"'{nc['architecture']}' ({family})", path=directory, fix="drop 'family'")
    config = {
        "format_version": FORMAT_VERSION,
        "neuromoe_version": __version__,
        "family": family,
        "architecture": nc["architecture"],
        "kwargs": _json_checked(nc.get("kwargs", {}), "model kwargs", directory),
        "preprocessing": _json_checked(meta.get("preprocessing"), "preprocessing", directory),
        "tasks": _json_checked(list(meta.get("tasks") or []), "tasks", directory),
        "label_maps": _json_checked(dict(meta.get("label_maps") or {}), "label_maps", directory),
        "extra": _json_checked(dict(meta.get("extra") or {}), "extra", directory),
    }
    # one metadata key: safetensors writes them in a random order, so two keys made the files of identical runs
    # differ byte-wise (the format version is in config.json)
    weights = save(_state_for_saving(model), metadata={"format": "pt"})
    # the config (preprocessing, label maps, calibration, threshold) is only right for these weights: a
    # model.safetensors copied in from another run of the same architecture loaded without a word
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    _check_config(config, directory / CONFIG_NAME, "pass save_model the metadata its docstring describes")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS_NAME, weights)
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


# ----------------------------------------------------------------------------------------------- load


def _looks_pickled(path: Path) -> bool:
    """True for a pickle stream (``\\x80`` + protocol 2–5) or a zip container (torch.save)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == ZIP_MAGIC


def _check_directory(directory: Path) -> None:
    """Refuse anything in the directory that is unsafe before reading a single byte of it as data."""
    if not directory.exists():
        raise ModelFormatError("model directory not found", path=directory, fix="check the path")
    if not directory.is_dir():
        raise ModelFormatError("not a model directory", path=directory,
                               fix=f"pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    root = directory.resolve()
    entries = [Path(d) / n for d, dirs, files in os.walk(directory, followlinks=False) for n in dirs + files]
    for entry in sorted(entries):
        if entry.is_symlink():
            target = entry.resolve()
            if target != root and root not in target.parents:
                raise ModelFormatError("symlink points outside the model directory", path=entry,
                                       fix="replace the link with the file itself or remove it")
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelFormatError("pickle-based file in a model directory (could execute code)", path=entry,
                                   fix=f"remove it; NeuroMoE loads only {CONFIG_NAME} + {WEIGHTS_NAME}")
        if entry.is_file() and _looks_pickled(entry):
            raise ModelFormatError("file contains pickle data (could execute code)", path=entry,
                                   fix=f"remove it; NeuroMoE loads only {CONFIG_NAME} + {WEIGHTS_NAME}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise ModelFormatError(f"missing {name}", path=directory,
                                   fix="pass a directory written by NeuroMoE's save_model / save_pretrained")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFormatError(f"config is larger than {MAX_CONFIG_BYTES // 2**20} MiB", path=path,
                               fix="restore the config.json written by NeuroMoE")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"invalid JSON ({exc.__class__.__name__})", path=path,
                               fix="restore the config.json written by NeuroMoE") from None
    if not isinstance(config, dict):
        raise ModelFormatError("config must be a JSON object", path=path, fix="restore the original file")
    _check_config(config, path, "restore the original file")
    config.setdefault("neuromoe_version", "unknown")
    config.setdefault("preprocessing", None)
    config.setdefault("tasks", [])
    config.setdefault("label_maps", {})
    config.setdefault("extra", {})
    return config


def _check_config(config: dict[str, Any], path: Path, fix: str) -> None:
    """The schema :func:`load_model` holds a config to; :func:`save_model` holds it too, so it never writes a
    folder that cannot be loaded."""
    version = config.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ModelFormatError(
            f"made by a newer NeuroMoE (format {version}, this is {__version__} reading format "
            f"{FORMAT_VERSION})", path=path, fix="upgrade NeuroMoE (pip install -U neuromoe)")
    unknown = sorted(set(config) - set(CONFIG_SCHEMA))
    if unknown:
        raise ModelFormatError(f"unknown config keys {unknown}", path=path,
                               fix=f"allowed keys: {', '.join(CONFIG_SCHEMA)}")
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ModelFormatError(f"missing config key '{key}'", path=path, fix=fix)
    for key, value in config.items():
        types_ = CONFIG_SCHEMA[key]
        if isinstance(value, bool) or not isinstance(value, types_):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types_)
            raise ModelFormatError(f"config key '{key}' must be {expected}, got {type(value).__name__}",
                                   path=path, fix=fix)
    if not all(isinstance(t, dict) for t in config.get("tasks", [])):
        raise ModelFormatError("config key 'tasks' must be a list of objects", path=path,
                               fix=fix)
    if version < 1:
        raise ModelFormatError(f"invalid format_version {version}", path=path, fix=fix)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"not a valid safetensors file ({exc})", path=path,
                               fix="re-save the model with NeuroMoE") from None


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        raise ModelFormatError("weights do not match the architecture in config.json: " + "; ".join(parts),
                               path=path, fix="keep config.json and model.safetensors from the same save")
    for key, ref in expected.items():
        got = tensors[key]
        if got.shape != ref.shape:
            raise ModelFormatError(f"tensor '{key}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}",
                                   path=path, fix="keep config.json and model.safetensors from the same save")
        if got.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise ModelFormatError(f"tensor '{key}' has dtype {got.dtype}, expected {ref.dtype}", path=path,
                                   fix="keep config.json and model.safetensors from the same save")


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a model directory → ``(model in eval mode, config dict)``; reads only JSON + safetensors.

    The config is also kept as ``model.neuromoe_meta`` (preprocessing to replay, tasks, label maps).
    """
    directory = Path(directory)
    _check_directory(directory)
    config = _read_config(directory)
    path = directory / CONFIG_NAME
    arch = config["architecture"]
    if arch not in _REGISTRY:
        _import_families()
    if arch not in _REGISTRY:
        raise ModelFormatError(f"unknown architecture '{arch}'", path=path,
                               fix=f"upgrade NeuroMoE or use one of: {', '.join(list_models())}")
    if _REGISTRY[arch].family != config["family"]:
        raise ModelFormatError(f"family '{config['family']}' does not match architecture '{arch}'",
                               path=path, fix="restore the original file")
    try:
        with torch.random.fork_rng(devices=[]):  # initial weights, replaced below: not from the caller's stream
            model = create_model(arch, **config["kwargs"])
    except ConfigError as exc:  # its own fix (check the model options) gives way to this one's
        reason = str(exc).removesuffix(f" — fix: {exc.fix}") if exc.fix else str(exc)
        raise ModelFormatError(f"cannot rebuild '{arch}': {reason}", path=path,
                               fix="restore the original file") from None
    tensors = _read_weights(directory / WEIGHTS_NAME)
    _check_tensors(model, tensors, directory / WEIGHTS_NAME)
    if "weights_sha256" in config and _sha256(directory / WEIGHTS_NAME) != config["weights_sha256"]:
        raise ModelFormatError(f"{WEIGHTS_NAME} is not the file this {CONFIG_NAME} was saved with (another run's "
                               "weights, an edited file or an interrupted save): the preprocessing, labels and "
                               "calibration the config holds would not fit them", path=directory / WEIGHTS_NAME,
                               fix="copy a model folder as a whole, never one file; save changed weights with "
                                   "save_model, which records them")
    model.load_state_dict(tensors, strict=True)
    model.to(map_location).eval()
    model.neuromoe_meta = config
    return model, config


def weights_digest(directory: str | Path) -> str:
    """``sha256:`` + 16 hex digits of a model folder's weights: which model another was built from, recorded
    without the training machine's paths (a shipped model folder carries no user or cohort folder names)."""
    return "sha256:" + _sha256(Path(directory) / WEIGHTS_NAME)[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_meta(meta: dict[str, Any], keys: Sequence[str], directory: str | Path) -> None:
    """Refuse a model config without what a family's inference reads (dotted keys, e.g. ``"extra.fc"``).

    Why: :func:`load_model` checks the schema every family shares; a family key missing from an edited or
    foreign ``config.json`` was a KeyError deep inside a prediction, reported against the scans."""
    for key in keys:
        node: Any = meta
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            raise ModelFormatError(f"config key '{key}' is missing (an edited config, or one another NeuroMoE "
                                   "version wrote)", path=Path(directory) / CONFIG_NAME,
                                   fix="use the model folder as training wrote it, or train it again")


class PretrainedMixin:
    """Gives a model class ``from_pretrained(dir)`` and ``save_pretrained(dir, **meta)``."""

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Any:
        model, _ = load_model(directory, map_location=map_location)
        if not isinstance(model, cls):
            raise ModelFormatError(f"holds a {type(model).__name__}, not a {cls.__name__}", path=directory,
                                   fix=f"load it with neuromoe.models.load_model or {type(model).__name__}")
        return model

    def save_pretrained(self, directory: str | Path, **meta: Any) -> Path:
        assert isinstance(self, nn.Module), "PretrainedMixin must be mixed into an nn.Module"
        return save_model(self, directory, meta)
