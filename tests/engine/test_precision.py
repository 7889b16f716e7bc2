"""The bf16 Conv3d guard: the oneDNN weight gradient it works around is wrong, the guarded one is right."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from neuromoe.engine.precision import cpu_features, guard_bf16_conv3d, resolve_precision


def _weight_grad(conv: nn.Module, x: torch.Tensor, g: torch.Tensor, bf16: bool) -> torch.Tensor:
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = conv(x)
    out.float().backward(g)
    return conv.weight.grad.clone()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 6, 6)])
def test_guarded_conv_matches_fp32_where_onednn_bf16_is_wrong(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(32, 16, 3, padding=1, bias=True)
    x, g = torch.randn(8, 32, *shape), torch.randn(8, 16, *shape)
    ref = _weight_grad(conv, x, g, bf16=False)
    assert guard_bf16_conv3d(conv) == 1
    fixed = _weight_grad(conv, x, g, bf16=True)
    assert _rel_err(fixed, ref) < 1e-2  # the output gradient is rounded to bf16 on its way back
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16  # what autocast would have produced


_AVX512_BUG = """
import torch
from torch import nn
from neuromoe.engine.precision import cpu_features, guard_bf16_conv3d, resolve_precision
torch.manual_seed(0)
conv = nn.Conv3d(32, 16, 3, padding=1)
x, g = torch.randn(8, 32, 2, 2, 2), torch.randn(8, 16, 2, 2, 2)
def grad(bf16):
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = conv(x)
    out.float().backward(g)
    return conv.weight.grad.clone()
ref, raw = grad(False), grad(True)
guard_bf16_conv3d(conv)
fixed = grad(True)
err = lambda a: float((a - ref).abs().max() / ref.abs().max())
print(err(raw), err(fixed))
"""


@pytest.mark.skipif(not cpu_features()["avx512f"], reason="the wrong kernel is oneDNN's AVX-512 one")
def test_onednn_avx512_bf16_weight_gradient_is_still_wrong() -> None:
    """The bug the guard exists for, on the AVX-512 kernel (AMX CPUs take another one unless capped).

    When a torch release makes this fail (the raw gradient is right), the guard can go.
    """
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _AVX512_BUG], env=env, capture_output=True, text=True, check=True)
    raw, fixed = map(float, out.stdout.split())
    assert not raw < 0.05  # NaN counts as wrong
    assert fixed < 1e-2


def test_guard_leaves_deep_inputs_on_the_bf16_path() -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 4, 3, padding=1)
    guard_bf16_conv3d(conv)
    x = torch.randn(2, 8, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        expected = nn.functional.conv3d(x.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16(), padding=1)
    assert torch.equal(out, expected)
    assert set(conv.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("native", ["1", "0"])
def test_trainer_guards_bf16_cpu_models_and_falls_back_without_native_bf16(tmp_path, cpu_bf16, native) -> None:
    from neuromoe.engine.trainer import TrainConfig, Trainer

    cpu_bf16(native)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ConvTranspose3d(2, 1, 2, stride=2))
    trainer = Trainer(model, TrainConfig(precision="bf16", device="cpu"), [], run_dir=tmp_path)
    assert trainer.precision == ("bf16" if native == "1" else "fp32")
    assert (type(model[0]).__name__ == "_ShallowSafeConv3d") == (native == "1")
    assert type(model[1]) is nn.ConvTranspose3d
    with trainer._autocast():
        assert (model(torch.zeros(1, 1, 4, 4, 4)).dtype == torch.bfloat16) == (native == "1")
    plain = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1))
    Trainer(plain, TrainConfig(precision="fp32", device="cpu"), [], run_dir=tmp_path / "b")
    assert type(plain[0]) is nn.Conv3d


def test_resolve_precision(cpu_bf16) -> None:
    cpu_bf16("0")
    assert resolve_precision("bf16", "cpu") == "fp32"  # emulated bf16 is 2.5–11× slower than fp32
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cuda") == "bf16"
    cpu_bf16("1")
    assert resolve_precision("bf16", "cpu") == "bf16"
    cpu_bf16("")
    feats = cpu_features()
    assert resolve_precision("bf16", "cpu") == ("bf16" if feats["avx512_bf16"] or feats["amx_bf16"] else "fp32")


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                                      ((9, 0), "bf16")])
def test_bf16_on_a_gpu_without_bf16_units_runs_fp32(monkeypatch, capability, expected) -> None:
    """V100 / T4 accept a bf16 autocast (PyTorch counts emulation as support) and run it slowly."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert resolve_precision("bf16", "cuda") == expected
    assert resolve_precision("bf16", "cuda:0") == expected
    assert resolve_precision("fp32", "cuda") == "fp32"


def test_the_bf16_override_is_read_at_every_call(monkeypatch) -> None:
    """The fp32-fallback warning says "set NEUROMOE_CPU_BF16=1 to force bf16"; set from Python after a first
    model ran, it had no effect (the answer was cached for the process)."""
    monkeypatch.setenv("NEUROMOE_CPU_BF16", "0")
    assert resolve_precision("bf16", "cpu") == "fp32"
    monkeypatch.setenv("NEUROMOE_CPU_BF16", "1")
    assert resolve_precision("bf16", "cpu") == "bf16"
