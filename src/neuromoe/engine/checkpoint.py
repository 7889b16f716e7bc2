"""Training checkpoints as ONE safetensors file: tensors in the payload, everything else as JSON metadata.

Holds model, optimiser and scheduler state, RNG states (torch CPU/CUDA, numpy, python) and the data
position, so ``fit(resume=True)`` continues bit-exactly (on CUDA only as far as its kernels are deterministic). No pickle anywhere: loading a checkpoint
cannot execute code. Written through :func:`neuromoe.io.atomic.atomic_path`, so a kill mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from neuromoe.errors import ModelFormatError
from neuromoe.io.atomic import atomic_path

FORMAT = "neuromoe-checkpoint-v1"


def _split(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested dict/list into ``tensors`` and leave ``{"__tensor__": key}`` markers."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(f"{prefix}.{k}", v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_split(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # the current GPU's stream only (a rank's own under torchrun): all visible GPUs' made a resume with fewer
        # of them fail, and reading them initialised CUDA for a CPU run on a GPU machine
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": json.loads(json.dumps(random.getstate())),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available():  # checkpoints before 2026-12-07 hold one state per visible GPU
        i = torch.cuda.current_device() if len(cuda) > 1 else 0
        if i < len(cuda):
            torch.cuda.set_rng_state(cuda[i])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) atomically to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split("s", state, tensors)
    meta = {"format": FORMAT, "state": json.dumps(skeleton)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError("checkpoint not found", path=path, fix="run without --resume to start fresh")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ModelFormatError(f"unreadable checkpoint ({exc})", path=path, fix="delete it to start fresh") from None
    if meta.get("format") != FORMAT:
        raise ModelFormatError("not a NeuroMoE training checkpoint", path=path, fix="point --resume at a run dir")
    return _join(json.loads(meta["state"]), tensors)
