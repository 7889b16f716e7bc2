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

from pathlib import Path

import torch
from torch import Tensor, nn


def cpu_features() -> dict[str, object]:
    """What decides CPU speed and the bug above: ATen's vector ISA and the bf16 / AMX flags (Linux only).

    Benchmarks record it, because bf16 results differ by ISA (AMX doubles a bf16 matmul, not a conv).
    """
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.exists() else set()
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            **{f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16")}}


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
