"""DenseFormer-MoE speed benchmark → JSON on stdout.

Measured in one run on the same input (default 64³, the ``demo`` preset):

* MAE pretraining step (fwd+bwd+AdamW) at mask 0.75 vs the same backbone's full-token step (mask 0.0,
  same decoder) and vs a supervised full-token step of the backbone alone — target ≤ 0.35×;
* fine-tune step and inference throughput (volumes/s) of DenseFormer-MoE vs MONAI DenseNet121-3D and
  MONAI's ViT of the same width, depth, heads and patch (``monai.networks.nets.ViT``; needs ``einops``, in
  the ``dev``/``bench`` extras);
* fp32 vs bf16 autocast;
* achieved GFLOP/s (FLOPs counted with ``torch.utils.flop_counter``; backward = 2× forward) as a fraction
  of a bf16 2048² matmul measured in the same run.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/bench_denseformer.py [--size 64] [--batch 2] [--repeats 3]
[--stem volume --block-layers 4 4]`` (the ``demo`` config's stem: ``--size 48 --stem volume --block-layers 4 4``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from monai.networks.nets import DenseNet121, ViT
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from neuromoe.engine.precision import cpu_features
from neuromoe.models.denseformer import MAE_DECODER, PRESETS, DenseFormer, DenseFormerMAE, DenseFormerMoE

TASKS = [{"name": "age", "type": "regression", "num_outputs": 1},
         {"name": "dx_ad", "type": "classification", "num_outputs": 3},
         {"name": "dx_pd", "type": "classification", "num_outputs": 2},
         {"name": "sex", "type": "classification", "num_outputs": 2}]


def _autocast(bf16: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn``. Counted with the math attention kernel: torch's counter has no formula for the CPU
    flash-attention op that ``scaled_dot_product_attention`` picks (our attention counted 0, MONAI's einsum
    attention in full); the math kernel does the same 4·B·H·L²·D work in countable matmuls."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, tuple):  # MAE: (loss, pred, mask); MONAI ViT: (logits, hidden states)
        return out[0] if out[0].ndim == 0 else out[0].float().mean()
    if hasattr(out, "outputs"):
        return sum(v.float().mean() for v in out.outputs.values()) + out.aux_loss
    return out.float().mean()


def _train_step(model: nn.Module, x: torch.Tensor, bf16: bool, **kw: Any) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(bf16):
            loss = _loss(model(x, **kw))
        loss.backward()
        opt.step()

    return step


def _infer(model: nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.inference_mode(), _autocast(bf16):
            model(x)

    return run


def matmul_gflops(bf16: bool, n: int = 2048, repeats: int = 5) -> float:
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, repeats) / 1e9


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--stem", choices=("patch", "volume"), default="patch")
    ap.add_argument("--block-layers", type=int, nargs="+", help="dense layers per stem block (preset's if unset)")
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                    help="autocast modes to time (bf16 is emulated, 2.5–11× slower, on CPUs without avx512_bf16/AMX)")
    ap.add_argument("--channels-last", action="store_true",
                    help="fine-tune/inference comparison with every network and the input in channels_last_3d")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    kw = {**PRESETS[args.preset], "img_size": args.size, "stem": args.stem}
    if args.block_layers:
        kw["block_layers"] = tuple(args.block_layers)
    x = torch.randn(args.batch, 1, *(args.size,) * 3)
    res: dict[str, Any] = {
        "benchmark": "denseformer", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "cpu": cpu_features(), "input": list(x.shape), "preset": args.preset,
        "stem": args.stem, "block_layers": list(kw["block_layers"]), "channels_last": args.channels_last,
        "matmul_gflops": {prec: matmul_gflops(prec == "bf16") for prec in args.precisions},
    }
    mae = DenseFormerMAE(**kw, **MAE_DECODER[args.preset])
    backbone = DenseFormer(**kw, num_outputs=1)
    res["params_million"] = {"backbone": sum(p.numel() for p in backbone.parameters()) / 1e6}
    res["gflops_forward_per_volume"] = {"backbone_full_tokens": _flops(lambda: backbone(x[:1])) / 1e9,
                                        "mae_mask_0.75": _flops(lambda: mae(x[:1])) / 1e9}
    mae_res: dict[str, Any] = {}
    for prec in args.precisions:
        bf16 = prec == "bf16"
        t_masked = _time(_train_step(mae, x, bf16, mask_ratio=0.75), args.repeats)
        t_full = _time(_train_step(mae, x, bf16, mask_ratio=0.0), args.repeats)
        t_sup = _time(_train_step(backbone, x, bf16), args.repeats)
        mae_res[prec] = {"mae_step_s_mask_0.75": t_masked, "mae_step_s_mask_0.0": t_full,
                         "supervised_full_token_step_s": t_sup, "ratio_vs_mae_full": t_masked / t_full,
                         "ratio_vs_supervised_full": t_masked / t_sup, "target_ratio": 0.35}
    res["mae_step"] = mae_res

    models = {
        "denseformer_moe": DenseFormerMoE(TASKS, **kw),
        "monai_densenet121_3d": DenseNet121(spatial_dims=3, in_channels=1, out_channels=1),
        "monai_vit": ViT(in_channels=1, img_size=args.size, patch_size=kw["patch_size"], hidden_size=kw["embed_dim"],
                         mlp_dim=4 * kw["embed_dim"], num_layers=kw["depth"], num_heads=kw["num_heads"],
                         classification=True, num_classes=1, spatial_dims=3),
    }
    if args.channels_last:  # the layout train.channels_last gives the Trainer's models and batches
        x = x.contiguous(memory_format=torch.channels_last_3d)
        for model in models.values():
            model.to(memory_format=torch.channels_last_3d)
    comp: dict[str, Any] = {}
    for name, model in models.items():
        fwd = _flops(lambda m=model: m(x)) / 1e9
        entry: dict[str, Any] = {"params_million": sum(p.numel() for p in model.parameters()) / 1e6,
                                 "gflops_forward_batch": fwd}
        for prec in args.precisions:
            bf16 = prec == "bf16"
            t_step = _time(_train_step(model, x, bf16), args.repeats)
            t_inf = _time(_infer(model, x, bf16), args.repeats)
            achieved = 3 * fwd / t_step
            entry[prec] = {"train_step_s": t_step, "train_volumes_per_s": args.batch / t_step,
                           "inference_volumes_per_s": args.batch / t_inf,
                           "train_gflops_per_s": achieved,
                           "fraction_of_matmul": achieved / res["matmul_gflops"][prec]}
            if "bf16" in res["matmul_gflops"]:  # the yardstick
                entry[prec]["fraction_of_bf16_matmul"] = achieved / res["matmul_gflops"]["bf16"]
        if {"fp32", "bf16"} <= entry.keys():
            entry["bf16_speedup_train"] = entry["fp32"]["train_step_s"] / entry["bf16"]["train_step_s"]
        comp[name] = entry
    res["finetune_and_inference"] = comp
    res["target_fraction_of_bf16_matmul"] = 0.5
    json.dump(res, sys.stdout, indent=2)
    print()
    return res


if __name__ == "__main__":
    main()
