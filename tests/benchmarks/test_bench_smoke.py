"""Every benchmark script runs end to end at a toy size and prints the JSON its docs quote.

Benchmarks are run by hand at real sizes, so nothing else notices when a refactor breaks one; these runs
check that each script still starts, times every network it compares and reports finite ratios. The
numbers themselves mean nothing at this size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# script -> (toy arguments, keys whose values must be finite positive numbers, dotted into the JSON)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "bench_moe": (["--tokens", "64", "--dim", "16", "--hidden", "32", "--num-experts", "4", "--repeats", "1",
                   "--dtypes", "fp32"],
                  ["ratios.0.sparse_speedup_over_dense_E4"]),
    # fp32 only (here and bench_moe): bf16 is emulated, ≈ 11× slower, on CPUs without avx512_bf16 / AMX
    "bench_denseformer": (["--size", "32", "--batch", "2", "--repeats", "1", "--preset", "tiny", "--precisions", "fp32"],
                          ["mae_step.fp32.ratio_vs_mae_full", "matmul_gflops.fp32",
                           "finetune_and_inference.denseformer_moe.fp32.fraction_of_matmul",
                           "finetune_and_inference.monai_densenet121_3d.fp32.inference_volumes_per_s"]),
    "bench_mome": (["--size", "32", "32", "32", "--train-size", "16", "16", "16"],
                   ["sparse_over_unet_time", "dense_over_sparse_time", "dense_ref_over_sparse_time"]),
    "bench_norm": (["--patch", "16", "--repeats", "1", "--threads", "1"],
                   ["ratios.train_step_ms_ours_over_group_norm_cl", "ratios.inference_ms_ours_over_contiguous"]),
    "bench_preprocess": (["--n", "2", "--workers", "1"], ["cold_vol_per_s", "cached_vol_per_s"]),
    "bench_brainmoe": (["--n-scans", "16", "--n-rois", "20", "--n-t", "40", "--preset", "tiny", "--batch", "8"],
                       ["ratio_fc_plus_embed_over_nilearn", "brainmoe_forward_scans_per_s"]),
    "bench_brainmoe_fc": (["--n-scans", "16", "--n-rois", "20", "--n-t", "40", "--repeats", "1"],
                          ["fc.pearson.ratio_ours_over_nilearn"]),
}


def _get(doc: object, dotted: str) -> object:
    for part in dotted.split("."):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]  # type: ignore[index]
    return doc


def _run(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_prints_finite_ratios(script: str, tmp_path: Path) -> None:
    args, keys = CASES[script]
    proc = _run(script, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    for key in keys:
        value = _get(doc, key)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_synth_benchmark_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "synth.json"
    proc = _run("bench_synth", ["--n", "1", "--spacing", "6", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_subject = json.loads(out.read_text())["per_subject_s"]
    assert set(per_subject) == {"structural", "lesion", "fmri"}
    assert all(v > 0 for v in per_subject.values())


def test_denseformer_benchmark_counts_attention_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's FLOP counter has no formula for the CPU flash-attention op: our attention counted 0 (10 % of the
    demo model's FLOPs), MONAI ViT's einsum attention in full, so GFLOP/s and its ratios were unfair."""
    import torch
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_denseformer import _flops

    b, h, length, d = 2, 3, 16, 8
    q = torch.randn(b, h, length, d)
    assert _flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 4 * b * h * length * length * d
