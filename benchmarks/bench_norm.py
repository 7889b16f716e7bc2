"""Instance norm on channels-last CPU tensors → JSON on stdout.

The CPU trainers and ``predict_volume`` run MoME's 3D U-Nets in ``channels_last_3d`` (oneDNN's convolutions
are faster there). :class:`neuromoe.layers.norm.InstanceNormGN` normalises such an input in the default
layout and hands it back channels-last; this benchmark measures, in one run on the same tensors:

* ``norm``: forward + backward of one norm at the demo U-Net's level shapes (batch 4, ``--patch`` 32³;
  widths 8..64), bf16 autocast, for ``ours`` (InstanceNormGN), ``group_norm_cl`` (PyTorch ``GroupNorm`` on the
  channels-last tensor, what InstanceNormGN did before) and ``instance_norm_cl`` (``nn.InstanceNorm3d``);
* ``mome_step``: one demo MoME training step (5 experts + gate, batch 4 of 32³, AdamW) with each norm path,
  and the same model in the default layout (``contiguous``); ``inference``: one no-grad forward of 4 windows.

Usage: ``python benchmarks/bench_norm.py [--threads 2] [--repeats 8] [--patch 32]``; ratios are ``ours / other``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from neuromoe.engine.precision import cpu_features, guard_bf16_conv3d
from neuromoe.layers.norm import InstanceNormGN
from neuromoe.models import create_model

CL = torch.channels_last_3d


def _ms(fn: Callable[[], Any], repeats: int) -> float:
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round((time.perf_counter() - t) / repeats * 1000, 2)


@contextlib.contextmanager
def _plain_group_norm() -> Iterator[None]:
    """InstanceNormGN as it was: PyTorch's ``group_norm`` on whatever layout comes in."""
    forward = InstanceNormGN.forward
    InstanceNormGN.forward = nn.GroupNorm.forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        InstanceNormGN.forward = forward  # type: ignore[method-assign]


def _norm_rows(patch: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for c, s in ((8, patch), (16, patch // 2), (32, patch // 4), (64, patch // 8)):
        x0 = torch.randn(4, c, s, s, s).to(torch.bfloat16).contiguous(memory_format=CL)
        ours = InstanceNormGN(c)
        variants = {
            "ours": ours,
            "group_norm_cl": lambda x, c=c, ours=ours: nn.functional.group_norm(x, c, ours.weight, ours.bias),
            "instance_norm_cl": nn.InstanceNorm3d(c, affine=True),
        }
        row: dict[str, Any] = {"shape": [4, c, s, s, s]}
        for name, norm in variants.items():
            x = x0.detach().requires_grad_()

            def step(norm: Callable[[torch.Tensor], torch.Tensor] = norm, x: torch.Tensor = x) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = norm(x)
                y.backward(torch.ones_like(y))

            row[f"{name}_ms"] = _ms(step, repeats * 4)
        row["ours_over_group_norm_cl"] = round(row["ours_ms"] / row["group_norm_cl_ms"], 3)
        row["ours_over_instance_norm_cl"] = round(row["ours_ms"] / row["instance_norm_cl_ms"], 3)
        rows.append(row)
    return rows


def _mome(layout: torch.memory_format, patch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model("mome_demo")
    guard_bf16_conv3d(model)
    model.to(memory_format=layout)
    x = torch.randn(4, 1, patch, patch, patch).contiguous(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = sum(lg.float().square().mean() for lg in out.logits)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)

    model.train()
    train = _ms(step, repeats)
    model.eval()
    return {"train_step_ms": train, "inference_ms": _ms(infer, repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--patch", type=int, default=32, help="patch edge (the demo's 32; a multiple of 8)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mome = {"ours": _mome(CL, a.patch, a.repeats)}
    with _plain_group_norm():
        mome["group_norm_cl"] = _mome(CL, a.patch, a.repeats)
    mome["contiguous"] = _mome(torch.contiguous_format, a.patch, a.repeats)
    res = {
        "threads": a.threads,
        "cpu": cpu_features(),
        "torch": torch.__version__,
        "patch": a.patch,
        "norm": _norm_rows(a.patch, a.repeats),
        "mome_step": mome,
        "ratios": {
            f"{what}_ours_over_{other}": round(mome["ours"][what] / mome[other][what], 3)
            for what in ("train_step_ms", "inference_ms") for other in ("group_norm_cl", "contiguous")
        },
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
