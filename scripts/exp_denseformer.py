"""DenseFormer-MoE experiment: does MAE pretraining help with 10 % labels, and which multi-task head is best?

On one synthetic structural cohort (ground truth known), with the ``demo`` preset:

1. MAE-pretrain the backbone once on the train+val scans (no labels).
2. Label-scarce regime: fine-tune with ``label_fraction`` (default 0.1) of the training subjects, from the
   MAE encoder vs from scratch, for each seed.
3. Head ablation (all labels, from the MAE encoder): ``moe`` vs ``shared`` vs ``separate``.

Each run is evaluated on the held-out test subjects (brain-age MAE, AD-vs-CN AUC, PD-vs-HC AUC, sex AUC).
Prints a JSON summary and a markdown table for ``docs/experiments.md``.

Usage (≈ 20–40 min on 2 shared cores)::

    OMP_NUM_THREADS=2 nice -n 10 python scripts/exp_denseformer.py --out runs/exp_df --seeds 0 1 2

``--set pretrain.epochs=20`` gives the MAE a longer pretraining than the demo's 3 epochs (the overrides
apply to every run; ``pretrain.*`` only affects the one MAE run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from neuromoe.io.atomic import atomic_write_json
from neuromoe.pipelines.denseformer import evaluate, load_denseformer_config, pretrain, train


def _summary(run: Path) -> dict[str, float]:
    m = json.loads((run / "metrics.json").read_text())["tasks"]
    out: dict[str, float] = {}
    if "age" in m:
        out["age_mae"] = m["age"]["model"]["mae"][0]
        out["age_mae_ratio_to_mean"] = m["age"]["mae_ratio_to_mean"]
    if "dx_ad" in m:
        out["ad_vs_cn_auc"] = m["dx_ad"].get("auc_AD_vs_CN", [np.nan])[0]
    if "dx_pd" in m:
        out["pd_vs_hc_auc"] = m["dx_pd"]["model"]["auc"][0]
    if "sex" in m:
        out["sex_auc"] = m["sex"]["model"]["auc"][0]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/exp_denseformer")
    ap.add_argument("--cohort", default=None, help="existing cohort folder (default: synthesise one)")
    ap.add_argument("--n-subjects", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--heads", nargs="*", default=["moe", "shared", "separate"],
                    help="head ablation on all labels, first seed (none: skip it)")
    ap.add_argument("--arms", nargs="*", default=["pretrained", "scratch"],
                    help="label-scarce runs: from the MAE encoder and/or from scratch")
    ap.add_argument("--mae", default=None, help="reuse this MAE run folder instead of pretraining one")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    cohort = Path(args.cohort) if args.cohort else out / "cohort"
    if not args.cohort:
        from neuromoe.data.synth import synth_cohort

        synth_cohort(cohort, n_structural=args.n_subjects, n_lesion=0, n_fmri=0, seed=1000, spacing=3.0)

    def cfg_for(seed: int, extra: list[str]) -> Any:
        cfg = load_denseformer_config(args.config, [*args.overrides, *extra], seed=seed)
        cfg.cache_dir = str(out / "cache")
        return cfg

    results: dict[str, Any] = {"config": args.config, "seeds": args.seeds, "label_fraction": args.label_fraction,
                               "n_subjects": args.n_subjects, "cohort": str(cohort), "overrides": args.overrides,
                               "runs": {}}
    mae_dir = Path(args.mae) if args.mae else out / "mae"
    if not args.mae:
        pretrain(cohort, mae_dir, cfg_for(0, []))
    results["mae"] = str(mae_dir)
    runs: list[tuple[str, int, list[str], bool]] = []
    for seed in args.seeds:
        frac = [f"finetune.label_fraction={args.label_fraction}"]
        runs += [(f"frac{args.label_fraction}_{arm}", seed, frac, arm == "pretrained") for arm in args.arms]
    runs += [(f"head_{h}", args.seeds[0], [f"model.head={h}"], True) for h in args.heads]
    for name, seed, extra, pretrained in runs:
        cfg = cfg_for(seed, extra)
        cfg.finetune.pretrained = str(mae_dir / "model") if pretrained else None
        run = out / f"{name}_s{seed}"
        train(cohort, run, cfg)
        evaluate(run / "model", cohort, run / "eval", seed=0, n_bootstrap=200, cache_dir=cfg.cache_dir)
        results["runs"].setdefault(name, {})[seed] = _summary(run / "eval")
        print(f"{name} seed {seed}: {results['runs'][name][seed]}", file=sys.stderr)
    results["minutes"] = (time.perf_counter() - t0) / 60
    lines = ["| run | seeds | age MAE (y) | MAE / mean-baseline | AD-vs-CN AUC | PD-vs-HC AUC | sex AUC |",
             "|---|---|---|---|---|---|---|"]
    for name, by_seed in results["runs"].items():
        vals = list(by_seed.values())

        def cell(key: str, vals: list[dict[str, float]] = vals) -> str:
            xs = np.array([v.get(key, np.nan) for v in vals], float)
            return f"{np.nanmean(xs):.3f}" + (f" ± {np.nanstd(xs):.3f}" if len(xs) > 1 else "")

        lines.append(f"| {name} | {','.join(map(str, by_seed))} | {cell('age_mae')} | "
                     f"{cell('age_mae_ratio_to_mean')} | {cell('ad_vs_cn_auc')} | {cell('pd_vs_hc_auc')} | "
                     f"{cell('sex_auc')} |")
    results["markdown"] = "\n".join(lines)
    atomic_write_json(out / "results.json", results)
    print(json.dumps(results, indent=2))
    print(results["markdown"])
    return results


if __name__ == "__main__":
    main()
