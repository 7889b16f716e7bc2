"""Inference wall time / peak RSS of sparse top-k MoME+ vs dense MoME+ vs one MONAI DynUNet (same widths).

Usage: OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_mome.py --size 160 192 160 --out bench_mome.json
(the issue's setting; smaller --size for a quick look). Each variant runs in its own process so the
peak RSS (ru_maxrss of that child) is its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch


def _run(variant: str, size: tuple[int, ...], k: int, bf16: bool, queue: mp.Queue) -> None:
    from monai.networks.nets import DynUNet

    from neuromoe.models import create_model
    from neuromoe.models.mome import PRESETS

    torch.manual_seed(0)
    mods = ("t1", "t1c", "t2", "flair")
    widths = PRESETS["demo"]["widths"]
    if variant == "dynunet":
        n = len(widths)
        model = DynUNet(3, 1, 2, [3] * n, [1] + [2] * (n - 1), [2] * (n - 1), filters=list(widths))
        x, call = torch.randn(1, 1, *size), (lambda m, x: m(x))
    else:
        model = create_model("mome_demo", modalities=mods, multimodal=True, top_k=k if variant == "sparse" else 0)
        x = torch.randn(1, len(mods), *size)
        call = lambda m, x: m(x, torch.ones(1, len(mods))).logits[0]  # noqa: E731
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t = time.perf_counter()
        out = call(model, x)
        wall = time.perf_counter() - t
    queue.put({"variant": variant, "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "params": params, "out_shape": list(out.shape)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, nargs=3, default=(160, 192, 160))
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default="bench_mome.json")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for variant in ("dynunet", "sparse", "dense"):
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(variant, tuple(a.size), a.top_k, a.bf16, q))
        p.start()
        rows.append(q.get())
        p.join()
        print(rows[-1], flush=True)
    by = {r["variant"]: r for r in rows}
    summary = {"size": a.size, "top_k": a.top_k, "bf16": a.bf16, "threads": torch.get_num_threads(), "rows": rows,
               "sparse_over_unet": by["sparse"]["wall_s"] / by["dynunet"]["wall_s"],
               "dense_over_sparse": by["dense"]["wall_s"] / by["sparse"]["wall_s"]}
    from neuromoe.io.atomic import atomic_write_json

    atomic_write_json(a.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
