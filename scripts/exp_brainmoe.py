"""BrainMoE acceptance experiment on the synthetic fMRI cohort (phenotype only in the `wm` state).

For each seed: pretrain one expert per cognitive state + the pooled all-states expert, then stratified
k-fold cross-validation of BrainMoE (experts frozen or adapted as the preset says, FC router, transformer adapter) against the pooled
expert + MLP head and + SVM. Reports macro-F1 / accuracy (phenotype, sex) and age MAE/MSE, mean ± std
over folds per seed, the router's preference for the informative state's expert, the state router's
validation accuracy (when the preset fits one; the same subjects chose its epoch) and a linear probe of each expert's embedding (which expert
actually carries the phenotype: the router can only prefer the informative state's expert for a reason
if that expert is the more useful one).

    nice -n 5 python scripts/exp_brainmoe.py --out runs/exp_bm --seeds 0 1 2

Writes ``OUT/results.json`` and ``OUT/table.md`` (the table pasted into docs/experiments.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from neuromoe.io.atomic import atomic_write_json, atomic_write_text
from neuromoe.pipelines import brainmoe as bm

METRICS = ("phenotype_f1_macro", "phenotype_accuracy", "sex_f1_macro", "age_mae", "age_mse")


def probe(pretrain: Path, cohort: Path, cfg: bm.BrainMoEConfig, folds: int) -> dict[str, float]:
    """Phenotype macro-F1 of a logistic regression on each expert's standardised embedding (grouped CV)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names, experts, _, spec = bm._experts_for(pretrain)
    down = bm._downstream(cohort, cfg, spec)
    y = down.scans.tensors["phenotype"].numpy()
    groups = down.table["subject"].astype(str).to_numpy()
    pooled, _ = bm._load_expert(pretrain / "experts" / bm.POOLED)
    out = {}
    for name, expert in [*zip(names, experts, strict=True), (bm.POOLED, pooled)]:
        pred = cross_val_predict(
            make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
            bm._embeddings_single(expert, down.scans),
            y,
            groups=groups,
            cv=StratifiedGroupKFold(folds, shuffle=True, random_state=cfg.seed),
        )
        out[name] = float(f1_score(y, pred, average="macro"))
    return out


def run_seed(
    cohort: Path, out: Path, seed: int, preset: str, folds: int, kind: str | None, sets: list[str]
) -> dict:
    cfg = bm.load_brainmoe_config(preset, sets, seed=seed, device="cpu")
    cfg.eval.folds = folds
    if kind:
        cfg.expert.kind = kind
    t0 = time.time()
    bm.pretrain(cohort, out / "pretrain", cfg)
    t1 = time.time()
    bm.evaluate(out / "pretrain", cohort, out / "evaluate", cfg)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    informative = json.loads((cohort / "ground_truth.json").read_text())["fmri"]["informative_state"]
    router_cfg = out / "pretrain" / bm.ROUTER / "config.json"
    return {
        "seed": seed,
        "summary": metrics["summary"],
        "router": metrics["router"],
        "informative_state": informative,
        "expert_kind": metrics["expert_kind"],
        "state_router_val_acc": (
            json.loads(router_cfg.read_text())["extra"]["val_state_acc"] if router_cfg.is_file() else None
        ),
        "probe_f1": probe(out / "pretrain", cohort, cfg, folds),
        "pretrain_s": round(t1 - t0, 1),
        "evaluate_s": round(time.time() - t1, 1),
    }


def table(results: list[dict]) -> str:
    models = list(results[0]["summary"])
    lines = ["| seed | model | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for r in results:
        for m in models:
            cells = [f"{r['summary'][m][k][0]:.3f} ± {r['summary'][m][k][1]:.3f}" for k in METRICS]
            lines.append(f"| {r['seed']} | {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "| seed | informative expert selected (share of scans) | its mean router weight | "
        "dominant combination | state router validation accuracy |"
    )
    lines.append("|---|---|---|---|---|")
    for r in results:
        s = r["informative_state"]
        combo, n = next(iter(r["router"]["combinations"].items()))
        total = sum(r["router"]["combinations"].values())
        acc = "—" if r["state_router_val_acc"] is None else f"{r['state_router_val_acc']:.2f}"
        lines.append(
            f"| {r['seed']} | {r['router']['selected_share'][s]:.2f} | "
            f"{r['router']['mean_weight'][s]:.2f} | {combo} ({n / total:.0%}) | {acc} |"
        )
    experts = list(results[0]["probe_f1"])
    lines.append("")
    lines.append("| seed | linear probe phenotype macro-F1: " + " | ".join(experts) + " |")
    lines.append("|---|" + "---|" * len(experts))
    for r in results:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['probe_f1'][e]:.2f}" for e in experts) + " |")
    means = {m: np.mean([r["summary"][m]["phenotype_f1_macro"][0] for r in results]) for m in models}
    lines.append("")
    lines.append("Mean phenotype macro-F1 over seeds: " + ", ".join(f"{m} {v:.3f}" for m, v in means.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--cohort", type=Path, default=None, help="existing cohort (default: synthesise OUT/cohort)"
    )
    ap.add_argument("--n-fmri", type=int, default=240)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--expert-kind", default=None, choices=["fc_mae", "jepa", "state_clf"])
    ap.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides, e.g. model.unfreeze_experts=true")
    args = ap.parse_args()
    cohort = args.cohort
    if cohort is None:
        from neuromoe.data.synth import synth_cohort

        cohort = args.out / "cohort"
        if not (cohort / "manifests" / "fmri.csv").is_file():
            synth_cohort(cohort, n_structural=0, n_lesion=0, n_fmri=args.n_fmri, seed=0, progress=False)
    results = []
    for seed in args.seeds:
        results.append(
            run_seed(cohort, args.out / f"seed{seed}", seed, args.config, args.folds, args.expert_kind, args.set)
        )
        atomic_write_json(args.out / "results.json", results)
        atomic_write_text(args.out / "table.md", table(results))
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
