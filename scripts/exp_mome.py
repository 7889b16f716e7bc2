"""MoME / MoME+ acceptance experiments on a synthetic lesion cohort (held-out test split).

Steps (each writes ``OUT/<step>/`` and can run in its own process; ``summary`` reads what exists):

* ``experts``   stage 1: one expert U-Net per modality (``pretrain``)
* ``mome``      MoME from the stage-1 experts, softmax gate (default), quadratic curriculum
* ``mome_raw``  the same with raw (un-normalised) gate weights, like the reference code
* ``unet``      one U-Net trained on all modalities pooled on as many patches as MoME sees in stage 1 (all
  experts) + stage 2 together
* ``mome_plus`` MoME+ (all modalities at once, modality dropout) from the stage-1 experts; evaluated with
  all modalities present and with a seeded random non-empty subset missing per case
* ``sparse_plus`` MoME+ with the sparse case-level top-2 router, vs ``mome_plus`` (dense); also evaluated
  with modalities missing
* ``missing``   only the missing-modality evaluation of the trained ``mome_plus`` / ``sparse_plus``
* ``missing_all`` the same over every non-empty proper subset of each case's modalities
* ``summary``   tables (markdown) + ``OUT/summary.json``

Usage::

    OMP_NUM_THREADS=1 nice -n 5 python scripts/exp_mome.py --cohort runs/mome/cohort60 --out runs/mome/exp \\
        --steps experts mome unet mome_raw mome_plus summary [--set train.epochs=6 ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neuromoe.data.preprocess import PreprocSpec
from neuromoe.io.atomic import atomic_write_json
from neuromoe.models.registry import load_model
from neuromoe.pipelines import mome


def _cfg(args: argparse.Namespace, extra: list[str] | None = None) -> mome.MoMEConfig:
    cfg = mome.load_mome_config(args.preset, [*args.overrides, *(extra or [])], seed=args.seed, device="cpu")
    cfg.cache_dir = args.cache
    return cfg


def _timed(out: Path, fn: Any) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    atomic_write_json(
        out / "time.json", {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    )


def _train_eval(args: argparse.Namespace, name: str, extra: list[str], experts: bool) -> None:
    out = Path(args.out) / name
    cfg = _cfg(args, extra)

    def run() -> None:
        mome.train(args.cohort, out, cfg, experts=Path(args.out) / "experts" if experts else None)
        mome.evaluate(
            out / "model", args.cohort, out / "eval", seed=args.seed, cache_dir=args.cache, device="cpu"
        )

    _timed(out, run)


def _mome_samples(args: argparse.Namespace, cfg: mome.MoMEConfig) -> int:
    """Training patches MoME sees in stage 1 (shared warm start and all experts) + stage 2, so the pooled U-Net
    gets as many."""
    train = mome._split_cases(args.cohort, cfg, mome._spec(cfg), ("train",))["train"]
    d = cfg.data
    per_expert = [sum(m in c["images"] for c in train) for m in cfg.model.modalities]
    stage1 = d.shared_samples_per_epoch + sum(d.expert_samples_per_epoch or d.samples_per_epoch or n for n in per_expert if n)
    stage2 = d.samples_per_epoch or sum(per_expert)
    return cfg.pretrain.epochs * stage1 + cfg.train.epochs * stage2


def _missing_modalities(args: argparse.Namespace, name: str, every_subset: bool = False) -> None:
    """MoME+ (dense or sparse) Dice with all modalities vs some removed, for the test cases with ≥ 2, at the
    model's stored threshold: one seeded random non-empty proper subset removed per case
    (``missing_modalities.*``), or every non-empty proper subset kept in turn (``missing_all_subsets.*``;
    the drop is then averaged per case first, so a 4-modality case counts as much as a 2-modality one)."""
    out = Path(args.out) / name
    model, meta = load_model(out / "model")
    extra = meta["extra"]
    cfg = _cfg(args)
    cases = mome._split_cases(args.cohort, cfg, PreprocSpec.from_dict(meta["preprocessing"]), ("test",))[
        "test"
    ]
    rng = np.random.default_rng(args.seed)
    multi = [c for c in cases if len(c["images"]) >= 2]
    dropped, owner = [], []
    for i, c in enumerate(multi):
        mods = list(c["images"])
        if every_subset:
            kept_sets = [k for r in range(1, len(mods)) for k in itertools.combinations(mods, r)]
        else:
            gone = set(rng.choice(mods, int(rng.integers(1, len(mods))), replace=False).tolist())
            kept_sets = [tuple(m for m in mods if m not in gone)]
        for kept in kept_sets:
            dropped.append({**c, "images": {m: c["images"][m] for m in kept}})
            owner.append(i)
    kw = {
        "multimodal": True,
        "device": "cpu",
        "threshold": extra.get("threshold", 0.5),
        "precision": extra.get("precision", "fp32"),
    }
    full = mome.evaluate_cases(model, multi, extra["modalities"], extra["patch_size"], **kw)
    part = mome.evaluate_cases(model, dropped, extra["modalities"], extra["patch_size"], **kw)
    frame = pd.DataFrame(
        {
            "subject": full["subject"].to_numpy()[owner],
            "lesion_type": full["lesion_type"].to_numpy()[owner],
            "present": full["modality"].to_numpy()[owner],
            "kept": part["modality"].to_numpy(),
            "n_kept": [len(d["images"]) for d in dropped],
            "dice_all": full["dice"].to_numpy()[owner],
            "dice_missing": part["dice"].to_numpy(),
        }
    )
    stem = "missing_all_subsets" if every_subset else "missing_modalities"
    frame.to_csv(out / f"{stem}.csv", index=False)
    per_case = frame.groupby("subject")[["dice_all", "dice_missing"]].mean()
    res: dict[str, Any] = {
        "n_cases": len(per_case),
        "n_subsets": len(frame),
        "dice_all": float(per_case["dice_all"].mean()),
        "dice_missing": float(per_case["dice_missing"].mean()),
        "drop": float((per_case["dice_all"] - per_case["dice_missing"]).mean()),
    }
    if every_subset:
        by_type = frame.groupby("lesion_type")
        res["drop_by_lesion_type"] = (by_type["dice_all"].mean() - by_type["dice_missing"].mean()).round(4).to_dict()
        by_n = frame.groupby("n_kept")
        res["drop_by_n_kept"] = {
            int(k): round(float(v), 4) for k, v in (by_n["dice_all"].mean() - by_n["dice_missing"].mean()).items()
        }
    atomic_write_json(out / f"{stem}.json", res)


def _summary(args: argparse.Namespace) -> None:
    root = Path(args.out)
    res: dict[str, Any] = {"seed": args.seed, "preset": args.preset, "overrides": args.overrides}
    per_mod = {}
    for name in ("mome", "mome_raw", "unet", "mome_plus", "sparse_plus"):
        f = root / name / "eval" / "metrics.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        t = (
            json.loads((root / name / "time.json").read_text())
            if (root / name / "time.json").is_file()
            else {}
        )
        res[name] = {
            "mean": m["mean"],
            "n_predictions": m["n_predictions"],
            "wall_s": t.get("wall_s"),
            "cpu_s": t.get("cpu_s"),
            "by_lesion_type": {k: v["dice"] for k, v in m.get("by_lesion_type", {}).items()},
        }
        if not name.endswith("_plus"):
            per_mod[name] = {k: v["dice"] for k, v in m["by_modality"].items()}
        if "expert_dice" in m:
            res[name]["expert_dice"] = m["expert_dice"]
    for name in ("mome_plus", "sparse_plus"):
        if (root / name / "missing_modalities.json").is_file():
            res[f"{name}_missing"] = json.loads((root / name / "missing_modalities.json").read_text())
    res["per_modality_dice"] = per_mod
    atomic_write_json(root / "summary.json", res)
    lines = [
        "| variant | mean Dice | HD95 (mm) | lesion F1 | abs vol diff (mL) | predictions | wall (s) | CPU (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("mome", "mome_raw", "unet", "mome_plus", "sparse_plus"):
        if name in res:
            r = res[name]["mean"]
            lines.append(
                f"| {name} | {r['dice']:.3f} | {r['hd95']:.1f} | {r['lesion_f1']:.3f} | "
                f"{r['abs_volume_diff_ml']:.2f} | {res[name]['n_predictions']} | "
                f"{res[name]['wall_s'] or float('nan'):.0f} | {res[name]['cpu_s'] or float('nan'):.0f} |"
            )
    if per_mod:
        mods = sorted({m for v in per_mod.values() for m in v})
        lines += ["", "| modality | " + " | ".join(per_mod) + " |", "|---|" + "---|" * len(per_mod)]
        lines += [
            f"| {m} | " + " | ".join(f"{per_mod[v].get(m, float('nan')):.3f}" for v in per_mod) + " |"
            for m in mods
        ]
    if "mome" in res and "expert_dice" in res["mome"]:
        ed = res["mome"]["expert_dice"]
        experts = list(ed)
        images = list(next(iter(ed.values())))
        lines += ["", "| image \\ expert | " + " | ".join(experts) + " |", "|---|" + "---|" * len(experts)]
        lines += [
            f"| {i} | " + " | ".join(f"{ed[e].get(i, float('nan')):.3f}" for e in experts) + " |"
            for i in images
        ]
    print("\n".join(lines))
    print(json.dumps({k: res[k] for k in res if k.endswith("_missing")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", required=True, help="synthetic cohort folder (neuromoe synth)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="runs/mome/cache")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--steps", nargs="+", default=["experts", "mome", "unet", "mome_raw", "mome_plus", "summary"]
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    for step in args.steps:
        print(f"== {step}", flush=True)
        if step == "experts":
            _timed(
                Path(args.out) / "experts",
                lambda: mome.pretrain(args.cohort, Path(args.out) / "experts", _cfg(args)),
            )
        elif step == "mome":
            _train_eval(args, "mome", [], experts=True)
        elif step == "mome_raw":
            _train_eval(args, "mome_raw", ["model.gate_norm=raw"], experts=True)
        elif step == "unet":
            c = _cfg(args)
            epochs = c.pretrain.epochs + c.train.epochs
            _train_eval(
                args,
                "unet",
                [
                    "model.kind=unet",
                    f"train.epochs={epochs}",
                    f"data.samples_per_epoch={-(-_mome_samples(args, c) // epochs)}",
                ],
                experts=False,
            )
        elif step == "mome_plus":
            _train_eval(args, "mome_plus", ["model.multimodal=true"], experts=True)
            _missing_modalities(args, "mome_plus")
        elif step == "sparse_plus":
            _train_eval(args, "sparse_plus", ["model.multimodal=true", "model.top_k=2"], experts=True)
            _missing_modalities(args, "sparse_plus")
        elif step in ("missing", "missing_all"):  # missing-modality checks of the trained MoME+ variants
            for name in ("mome_plus", "sparse_plus"):
                if (Path(args.out) / name / "model").is_dir():
                    _missing_modalities(args, name, every_subset=step == "missing_all")
        elif step == "summary":
            _summary(args)
        else:
            raise SystemExit(f"unknown step {step}")


if __name__ == "__main__":
    main()
