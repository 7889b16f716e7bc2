"""BrainMoE model benchmark: "FC + expert embedding" throughput vs nilearn's ConnectivityMeasure alone, and
router + adapter inference scans/s.

Workload (the issue's): 1,000 scans of 264 ROIs × 200 TRs (``bench_brainmoe_fc.ar1_series``). In one
process, on the same data: nilearn ``ConnectivityMeasure(kind="correlation")`` (EmpiricalCovariance, the
reference) vs our Pearson FC + Fisher z followed by the embeddings of all five per-state experts (target:
ours ≤ 1× nilearn's time). Then the full BrainMoE forward (router → top-k experts run sparsely → adapter)
and the adapter alone on cached expert embeddings (what fine-tuning runs), in scans/s. The router input
(``fc`` = MLP over all upper-triangle FC values, ``pca`` = over whitened principal components) defaults to
what the ``demo`` config uses; a ``pca`` basis is fitted (untimed) on the benchmark's own scans, as
pretraining fits it on the pretraining scans. Untrained weights otherwise: speed does not depend on them.
One JSON object on stdout.

    python benchmarks/bench_brainmoe.py [--n-scans 1000 --preset demo --kind state_clf --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence

import torch

from bench_brainmoe_fc import ar1_series
from neuromoe.data.connectivity import connectivity
from neuromoe.models import create_model
from neuromoe.pipelines.brainmoe import load_brainmoe_config


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@torch.no_grad()
def _batched(fn, n: int, batch: int) -> None:
    for s in range(0, n, batch):
        fn(slice(s, min(s + batch, n)))


def main(argv: Sequence[str] | None = None) -> dict:
    demo = load_brainmoe_config("demo").model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-scans", type=int, default=1000)
    ap.add_argument("--n-rois", type=int, default=264)
    ap.add_argument("--n-t", type=int, default=200)
    ap.add_argument("--preset", default="demo", choices=["tiny", "demo", "base"])
    ap.add_argument("--kind", default="state_clf", choices=["fc_mae", "state_clf"])
    ap.add_argument("--n-experts", type=int, default=5)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--router-input", default=demo.router_input, choices=["fc", "pca"])
    ap.add_argument("--router-pca", type=int, default=demo.router_pca)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch + BLAS threads (1 is fastest on a shared machine)"
    )
    args = ap.parse_args(argv)
    from nilearn.connectome import ConnectivityMeasure
    from sklearn.covariance import EmpiricalCovariance
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    limit = threadpool_limits(limits=args.threads, user_api="blas")
    x = ar1_series(args.n_scans, args.n_rois, args.n_t, seed=0)
    torch.manual_seed(0)
    model = create_model(
        f"brainmoe_{args.preset}",
        n_rois=args.n_rois,
        n_experts=args.n_experts,
        expert_kind=args.kind,
        top_k=args.top_k,
        router_input=args.router_input,
        router_pca=args.router_pca,
    ).eval()
    n, b = args.n_scans, args.batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance(store_precision=False))
        _, t_nilearn = _timed(lambda: cm.fit_transform(list(x)))
    fc_np, t_fc = _timed(lambda: connectivity(x, "pearson", fisher_z=True))
    fc = torch.from_numpy(fc_np)
    if args.router_input == "pca":
        model.set_router_basis(fc)
    emb = torch.empty(n, args.n_experts, model.dim)

    def embed(sl: slice) -> None:
        emb[sl] = model.expert_embeddings(fc[sl])

    _, t_embed = _timed(lambda: _batched(embed, n, b))
    _, t_moe = _timed(lambda: _batched(lambda sl: model(fc[sl]), n, b))
    _, t_adapter = _timed(lambda: _batched(lambda sl: model(fc[sl], expert_emb=emb[sl]), n, b))
    limit.restore_original_limits()
    result = {
        "benchmark": "brainmoe_model",
        "workload": {
            "n_scans": n,
            "n_rois": args.n_rois,
            "n_t": args.n_t,
            "preset": args.preset,
            "expert_kind": args.kind,
            "n_experts": args.n_experts,
            "top_k": args.top_k,
            "router_input": args.router_input,
            "router_pca": args.router_pca if args.router_input == "pca" else None,
            "batch": b,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "nilearn_connectivity_s": round(t_nilearn, 3),
        "ours_fc_s": round(t_fc, 3),
        "ours_embed_all_experts_s": round(t_embed, 3),
        "ours_fc_plus_embed_s": round(t_fc + t_embed, 3),
        "ratio_fc_plus_embed_over_nilearn": round((t_fc + t_embed) / t_nilearn, 3),
        "fc_plus_embed_scans_per_s": round(n / (t_fc + t_embed), 1),
        "brainmoe_forward_scans_per_s": round(n / t_moe, 1),
        "adapter_on_cached_embeddings_scans_per_s": round(n / t_adapter, 1),
        "params": {
            "total": sum(p.numel() for p in model.parameters()),
            "router": sum(p.numel() for p in [*model.router_mlp.parameters(), *model.router.parameters()]),
            "experts": sum(p.numel() for p in model.experts.parameters()),
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
