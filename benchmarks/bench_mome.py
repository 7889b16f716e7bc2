"""MoME+ cost: sparse top-k vs dense vs one MONAI DynUNet of the same widths, plus training memory vs 5 U-Nets.

Inference (one whole-volume forward, 4 modalities, ``--size``, default the issue's 160×192×160 at 1 mm):

* ``dynunet``    one MONAI DynUNet, demo widths, 1 input channel (the "one U-Net" reference)
* ``sparse``     MoME+ with a case-level top-k router: only k experts + the light demo gate run
* ``dense``      MoME+ with every expert + the light demo gate
* ``dense_ref``  MoME+ with every expert + a gate as wide as an expert (the reference design)

Training (one forward+backward at ``--train-size``): dense MoME (5 experts + gate) vs one expert U-Net
(5 separate U-Nets trained one after another peak at one U-Net; at once at 5×); parameter counts.

Each measurement runs in its own process so peak RSS (``ru_maxrss`` of that child) is its own;
``added_rss_mb`` is that peak above the child's state before its first forward (imports, weights, input:
about 0.4 GB every variant pays), and the memory ratios use it.
Usage: ``OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_mome.py [--size 160 192 160] [--bf16]``;
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from typing import Any

import torch

from neuromoe.engine.precision import cpu_features

MODS = ("t1", "t1c", "t2", "flair")


def _model(variant: str, k: int) -> tuple[Any, Any]:
    from monai.networks.nets import DynUNet

    from neuromoe.models import create_model
    from neuromoe.models.mome import PRESETS

    widths = PRESETS["demo"]["widths"]
    if variant in ("dynunet", "unet_train"):
        n = len(widths)
        net = DynUNet(3, 1, 2, [3] * n, [1] + [2] * (n - 1), [2] * (n - 1), filters=list(widths))
        return net, lambda m, x: m(x[:, :1])
    if variant == "mome_train":
        net = create_model("mome_demo")  # 5 experts + gate, one modality per sample (MoME)
        return net, lambda m, x: m(x[:, :1]).logits[0]
    kw: dict[str, Any] = {"modalities": MODS, "multimodal": True, "top_k": k if variant == "sparse" else 0}
    if variant == "dense_ref":
        kw["gate_widths"] = widths
    net = create_model("mome_demo", **kw)
    return net, lambda m, x: m(x, torch.ones(x.shape[0], len(MODS))).logits[0]


def _run(variant: str, size: tuple[int, ...], k: int, bf16: bool, train: bool, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, call = _model(variant, k)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, len(MODS), *size)
    # the process's peak before any forward (interpreter, torch, MONAI, the weights, the input): every
    # variant pays it, so the memory ratios use the peak above it
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if train:
            model.train()
            t = time.perf_counter()
            out = call(model, x)
            out.float().square().mean().backward()
        else:
            model.eval()
            with torch.no_grad():
                call(model, torch.randn(1, len(MODS), 32, 32, 32))  # warm-up (oneDNN primitive creation)
                t = time.perf_counter()
                out = call(model, x)
        wall = time.perf_counter() - t
    queue.put(
        {
            "variant": variant,
            "wall_s": round(wall, 3),
            "params": params,
            "out_shape": list(out.shape),
            "peak_rss_mb": round(peak := resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "base_rss_mb": round(base, 1),
            "added_rss_mb": round(peak - base, 1),
        }
    )


def _measure(variant: str, size: tuple[int, ...], k: int, bf16: bool, train: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run, args=(variant, size, k, bf16, train, q))
    p.start()
    row = q.get()
    p.join()
    print(json.dumps(row), flush=True, file=__import__("sys").stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs=3, default=(160, 192, 160))
    ap.add_argument("--train-size", type=int, nargs=3, default=(64, 64, 64))
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    a = ap.parse_args()
    size = tuple(a.size)
    inf = {v: _measure(v, size, a.top_k, a.bf16, False) for v in ("dynunet", "sparse", "dense", "dense_ref")}
    res: dict[str, Any] = {
        "size": list(size),
        "modalities": len(MODS),
        "top_k": a.top_k,
        "bf16": a.bf16,
        "threads": 1,
        "cpu": cpu_features(),
        "inference": inf,
        "sparse_over_unet_time": inf["sparse"]["wall_s"] / inf["dynunet"]["wall_s"],
        "dense_over_sparse_time": inf["dense"]["wall_s"] / inf["sparse"]["wall_s"],
        "dense_ref_over_sparse_time": inf["dense_ref"]["wall_s"] / inf["sparse"]["wall_s"],
        "sparse_over_unet_mem": inf["sparse"]["added_rss_mb"] / inf["dynunet"]["added_rss_mb"],
        "dense_over_sparse_mem": inf["dense"]["added_rss_mb"] / inf["sparse"]["added_rss_mb"],
    }
    if not a.skip_train:
        tr = {
            v: _measure(v, tuple(a.train_size), a.top_k, a.bf16, True) for v in ("unet_train", "mome_train")
        }
        res["train"] = {
            "size": a.train_size,
            **tr,
            "mome_over_one_unet_mem": tr["mome_train"]["added_rss_mb"] / tr["unet_train"]["added_rss_mb"],
            "mome_params_over_5_unets": tr["mome_train"]["params"] / (5 * tr["unet_train"]["params"]),
        }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
