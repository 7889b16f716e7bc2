"""MoE layer throughput benchmark → JSON on stdout.

Forward + backward tokens/s of :class:`neuromoe.layers.moe.MoELayer` at E = 4, 8, 16 experts, top-2, for
the three dispatch paths measured in the same run on the same weights and tokens:

* ``sparse``    — sort (token, slot) pairs by expert, one gather, one contiguous segment per expert, one
  index-copy + weighted sum (the production path);
* ``reference`` — loop over experts with ``nonzero`` + ``index_add_`` (the readable baseline);
* ``dense``     — every expert on every token, combined with the same top-k weights.

Targets (issue 3): sparse cost from E=4 to E=16 ≤ 1.2× while dense grows ≈ 4×; sparse ≥ 2× reference at
E = 16. ``ratios`` in the JSON reports exactly these numbers; every cell also reports its expert GFLOP/s
as a fraction of a 2048² matmul measured in the same run (how much room any dispatch scheme has left). Experts are either E separate
``nn.Module`` MLPs from a factory (``--experts modules``, what model code usually passes) or one stacked
:class:`ExpertMLP` (``--experts stacked``).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_moe.py [--tokens 4096] [--dim 256] [--hidden 1024]
[--experts modules stacked] [--dtypes fp32 bf16] [--repeats 3] [--out bench_out/bench_moe.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from typing import Any

import torch
from torch import nn

from neuromoe.io.atomic import atomic_write_json
from neuromoe.layers.moe import MoELayer

PATHS = ("sparse", "reference", "dense")


def _autocast(dtype: str, device: torch.device) -> Any:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_layer(experts: str, num_experts: int, dim: int, hidden: int, k: int) -> MoELayer:
    def factory(_e: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    return MoELayer(dim, num_experts, factory if experts == "modules" else None, k=k, expert_hidden=hidden)


def step_seconds(layer: MoELayer, x: torch.Tensor, dtype: str) -> float:
    """Wall seconds of one forward+backward (output loss + aux loss)."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    _sync(x.device)
    t0 = time.perf_counter()
    with _autocast(dtype, x.device):
        out = layer(x)
        loss = out.output.float().pow(2).mean() + out.aux_loss
    loss.backward()
    _sync(x.device)
    return time.perf_counter() - t0


def matmul_gflops(dtype: str, device: torch.device, n: int = 2048, repeats: int = 3) -> float:
    """Best GFLOP/s of an n×n matmul: the machine's practical ceiling, to read the MoE numbers against.

    Measured once per timing round (the best is kept) so it sees the same machine load as the MoE cells.
    """
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--num-experts", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--experts", nargs="+", choices=["modules", "stacked"], default=["modules", "stacked"])
    ap.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )

    peak = dict.fromkeys(args.dtypes, 0.0)
    results: list[dict[str, Any]] = []
    for experts in args.experts:
        for dtype in args.dtypes:
            # All (E, path) cells of one expert kind and dtype are timed round-robin, so load from other
            # processes on a shared machine hits every cell alike; the minimum over rounds is reported.
            layers, loads = {}, {}
            torch.manual_seed(args.seed)
            # the input needs a gradient, as inside a network (and as the FLOP count below assumes)
            x = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
            for e in args.num_experts:
                torch.manual_seed(args.seed)
                layers[e] = build_layer(experts, e, args.dim, args.hidden, args.k).to(device)
                with torch.no_grad():
                    loads[e] = layers[e](x).stats.load.tolist()
            cells = [(e, path) for e in args.num_experts for path in args.paths]
            times: dict[tuple[int, str], list[float]] = {c: [] for c in cells}
            for rnd in range(args.warmup + args.repeats):
                for e, path in cells:
                    layers[e].dispatch = path  # same weights and tokens for every path
                    t = step_seconds(layers[e], x, dtype)
                    if rnd >= args.warmup:
                        times[(e, path)].append(t)
                peak[dtype] = max(peak[dtype], matmul_gflops(dtype, device, repeats=1))
            for e, path in cells:
                best = min(times[(e, path)])
                # expert FLOPs of fwd+bwd (backward = 2× forward): k slots per token, or all E experts
                used = e if path == "dense" else args.k
                flops = 3 * args.tokens * used * 2 * 2 * args.dim * args.hidden
                results.append(
                    {
                        "experts": experts,
                        "dtype": dtype,
                        "num_experts": e,
                        "path": path,
                        "seconds": best,
                        "tokens_per_s": args.tokens / best,
                        "all_seconds": times[(e, path)],
                        "max_expert_load": max(loads[e]),
                        "expert_gflops_per_s": flops / best / 1e9,
                        "fraction_of_matmul_peak": flops / best / 1e9 / peak[dtype],
                    }
                )
                print(
                    f"{experts:8s} {dtype} E={e:2d} {path:9s} {args.tokens / best:10.0f} tok/s "
                    f"{flops / best / 1e9 / peak[dtype]:5.0%} of matmul peak",
                    file=sys.stderr,
                )
            del layers

    def secs(experts: str, dtype: str, e: int, path: str) -> float | None:
        for r in results:
            if (r["experts"], r["dtype"], r["num_experts"], r["path"]) == (experts, dtype, e, path):
                return r["seconds"]
        return None

    lo, hi = min(args.num_experts), max(args.num_experts)
    ratios = []
    for experts in args.experts:
        for dtype in args.dtypes:
            entry: dict[str, Any] = {"experts": experts, "dtype": dtype, "E_low": lo, "E_high": hi}
            for path in args.paths:
                a, b = secs(experts, dtype, lo, path), secs(experts, dtype, hi, path)
                entry[f"{path}_cost_E{hi}_over_E{lo}"] = b / a
            if {"sparse", "reference"} <= set(args.paths):
                entry[f"sparse_speedup_over_reference_E{hi}"] = secs(experts, dtype, hi, "reference") / secs(
                    experts, dtype, hi, "sparse"
                )
            if {"sparse", "dense"} <= set(args.paths):
                entry[f"sparse_speedup_over_dense_E{hi}"] = secs(experts, dtype, hi, "dense") / secs(
                    experts, dtype, hi, "sparse"
                )
            if set(PATHS) <= set(args.paths) and (lo, hi) == (4, 16):
                entry["targets_met"] = {
                    "sparse_cost_le_1.2x": entry["sparse_cost_E16_over_E4"] <= 1.2,
                    "dense_cost_about_4x": 3.0 <= entry["dense_cost_E16_over_E4"] <= 5.0,
                    "sparse_ge_2x_reference": entry["sparse_speedup_over_reference_E16"] >= 2.0,
                }
            ratios.append(entry)

    report = {
        "benchmark": "moe_layer_fwd_bwd",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(),
            "matmul_2048_gflops": peak,
        },
        "results": results,
        "ratios": ratios,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
