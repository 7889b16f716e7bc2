"""Work-around for a wrong bf16 Conv3d weight gradient on CPU (oneDNN, seen with torch 2.13).

On CPU, a bf16 ``conv3d`` whose input depth (the first spatial axis) is at least 2 but smaller than the
kernel's depth — a 3×3×3 conv on a 2-voxel-deep map, e.g. the bottleneck of a U-Net trained on 16³
patches or the last dense block of a patch-local DenseNet stem — returns a weight gradient full of
1e30s, infs and NaNs, while its output and input gradient are right, fp32 is right, and so is the
non-oneDNN kernel (``tests/engine/test_precision.py`` shows it). Training then diverges or stops with
a non-finite loss. The wrong kernel is oneDNN's AVX-512 (``avx512_core`` / ``avx512_core_bf16``)
backward-weights convolution; CPUs with AMX take another kernel and are right, so whether a machine is
affected depends on its ISA (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` reproduces it on an AMX CPU).
Those convolutions act on a handful of voxels, so the guard runs just them in fp32 on every CPU.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def cpu_features() -> dict[str, object]:
    """What decides CPU speed and the bug above: ATen's vector ISA and the bf16 / AMX flags (Linux only).

    Benchmarks record it, because bf16 results differ by ISA (AMX doubles a bf16 matmul, not a conv).
    """
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            **{f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16")}}


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or ``amx_bf16``); ``NEUROMOE_CPU_BF16=1|0`` overrides,
    read at every call (the warning tells users to set it, also from Python after a first model ran)."""
    forced = os.environ.get("NEUROMOE_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpu_has_bf16()


@cache
def _cpu_has_bf16() -> bool:
    feats = cpu_features()
    return bool(feats["avx512_bf16"] or feats["amx_bf16"])


def native_cuda_bf16(device: torch.device | str) -> bool:
    """Whether this GPU computes bf16 natively: compute capability 8.0 (Ampere) or newer, or ROCm.

    Older GPUs (V100, T4, P100) accept bf16 tensors but have no bf16 math units, so PyTorch's own check
    (``torch.cuda.is_bf16_supported()``, which counts emulation) lets a bf16 autocast run there, slowly.
    Without CUDA there is nothing to decide (the CLI refuses ``--device cuda`` before this matters).
    """
    if torch.version.hip or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability(torch.device(device).index)[0] >= 8


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision to actually run: ``bf16`` asked for on a CPU or GPU without native bf16 runs as ``fp32``.

    Why: oneDNN emulates bf16 there, and a DenseFormer MAE step (48³, batch 4, one thread) took 2.5× the
    fp32 time with AVX-512 alone and 11× with AVX2, where with AMX it takes 0.6×; pre-Ampere GPUs emulate
    it too. So the ``bf16`` of a config means "bf16 where it is faster"; ``NEUROMOE_CPU_BF16=1`` forces it
    on a CPU (e.g. for its memory savings).
    """
    kind = torch.device(device).type
    if precision == "bf16" and kind == "cpu" and not native_cpu_bf16():
        _warn_once("this CPU has no native bf16 (avx512_bf16 / amx_bf16): running in fp32, which is faster "
                   "here; set NEUROMOE_CPU_BF16=1 to force bf16")
        return "fp32"
    if precision == "bf16" and kind == "cuda" and not native_cuda_bf16(device):
        _warn_once("this GPU has no native bf16 (compute capability below 8.0): running in fp32")
        return "fp32"
    return precision


@cache
def _warn_once(why: str) -> None:
    log.warning(f"bf16 requested, but {why}")


def _needs_fp32(conv: nn.Conv3d, x: Tensor) -> bool:
    depth, k_depth = x.shape[2], conv.kernel_size[0]
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return (x.device.type == "cpu" and bf16 and 2 <= depth < k_depth and torch.is_grad_enabled()
            and conv.weight.requires_grad)


class _ShallowSafeConv3d(nn.Conv3d):
    """``nn.Conv3d`` that computes in fp32 exactly when the CPU bf16 weight gradient would be wrong."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not _needs_fp32(self, input):
            return super()._conv_forward(input, weight, bias)
        with torch.autocast("cpu", enabled=False):
            out = super()._conv_forward(input.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16)  # the dtype autocast (or a bf16 model) would have produced


def guard_bf16_conv3d(model: nn.Module) -> int:
    """Make every plain ``nn.Conv3d`` of ``model`` fall back to fp32 where bf16 gradients are wrong on CPU.

    Swaps the class in place (parameters, state-dict keys and hooks unchanged); returns how many
    convolutions were guarded.
    """
    n = 0
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = _ShallowSafeConv3d
            n += 1
    return n
