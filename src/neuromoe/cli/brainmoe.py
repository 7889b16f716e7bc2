"""``neuromoe <verb> --family brainmoe``: thin argparse wrappers over :mod:`neuromoe.pipelines.brainmoe`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuromoe.errors import InputError
from neuromoe.io.table import failures_path

# verbs that train (evaluate fits the router and adapter per fold), so torchrun shares their work out over
# its ranks; the others run on rank 0 alone
DISTRIBUTED_VERBS = ("pretrain", "train", "evaluate")

VERBS = {
    "pretrain": "Pretrain one expert per cognitive state (fc_mae | jepa | state_clf, set with "
    "--expert-kind) plus the expert pretrained on all states pooled (the baselines' backbone). Writes "
    "RUN/experts/<state>/ model folders and RUN/experts.json; calling it again with another --state adds "
    "that expert.\n\nexamples:\n  neuromoe pretrain --family brainmoe --config demo --data data/synth "
    "--states all --out runs/bm_pre\n  neuromoe pretrain --family brainmoe --data data/synth --state rest "
    "--no-pooled --out runs/bm_pre",
    "train": "Fine-tune the FC router and the transformer adapter on labelled scans (phenotype, sex, age); "
    "the experts are frozen or adapted as the preset says (demo: adapted at 0.1 × lr; paper: frozen), "
    "--freeze-experts / --unfreeze-experts override it. Writes RUN/model.\n\nexample:\n"
    "  neuromoe finetune --family brainmoe --config demo --data data/synth --experts runs/bm_pre "
    "--out runs/bm_ft",
    "evaluate": "Stratified k-fold cross-validation of BrainMoE vs the pooled expert + MLP and + SVM: "
    "mean ± std macro-F1, accuracy, age MAE/MSE; router-preference and expert-correlation plots in "
    "OUT/report.\n\nexample:\n  neuromoe evaluate --family brainmoe --config demo --experts runs/bm_pre "
    "--data data/synth --folds 5 --out runs/bm_eval",
    "predict": "Per-scan phenotype probabilities, sex, age and the experts the router chose, replaying the "
    "model's FC settings.\n\nexample:\n  neuromoe predict --family brainmoe --model runs/bm_ft/model "
    "--input data/synth/manifests/fmri.csv --output preds.csv",
    "embed": "Export joint embeddings (router-weighted top-k expert embeddings; or one expert's "
    "embedding when --model is an expert folder) with subject ids, as CSV or NPY (+ _subjects.csv).\n\n"
    "example:\n  neuromoe embed --model runs/bm_ft/model --input data/synth/manifests/fmri.csv "
    "--output embeddings.csv",
}


def _expert_flags(parser: argparse.ArgumentParser) -> None:
    """Override the preset's ``model.unfreeze_experts`` either way (package default and `paper`: frozen)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--unfreeze-experts", dest="unfreeze_experts", action="store_const", const=True,
                       default=None, help="fine-tune the routed experts too (at model.expert_lr_scale × lr)")
    group.add_argument("--freeze-experts", dest="unfreeze_experts", action="store_const", const=False,
                       help="keep the experts frozen (the paper's setting; the demo preset adapts them)")


def add_arguments(verb: str, parser: argparse.ArgumentParser) -> None:
    if verb == "pretrain":
        parser.add_argument("--data", required=True, help="cohort folder, manifest CSV/TSV or BIDS folder")
        parser.add_argument("--out", required=True, help="pretraining folder (experts are added to it)")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--state", action="append", default=None, help="one cognitive state (repeatable)")
        which.add_argument("--states", default=None, help="'all' or a comma list of states")
        parser.add_argument("--expert-kind", choices=["fc_mae", "jepa", "state_clf"], default=None)
        parser.add_argument("--no-pooled", action="store_true", help="skip the all-states pooled expert")
    if verb in ("pretrain", "train"):
        parser.add_argument("--resume", action="store_true", help="resume from the run's last checkpoints")
    if verb == "train":
        parser.add_argument("--data", required=True, help="labelled cohort folder, manifest or BIDS folder")
        parser.add_argument("--experts", required=True, help="folder written by 'pretrain'")
        parser.add_argument("--out", required=True, help="run directory")
        _expert_flags(parser)
        parser.add_argument("--top-k", type=int, default=None, help="experts per scan (default from config)")
    if verb == "evaluate":
        parser.add_argument("--experts", required=True, help="folder written by 'pretrain'")
        parser.add_argument("--data", required=True, help="labelled cohort folder, manifest or BIDS folder")
        parser.add_argument(
            "--out", required=True, help="output folder (metrics.json, predictions.csv, report)"
        )
        parser.add_argument("--folds", type=int, default=None, help="cross-validation folds (5 or 10)")
        _expert_flags(parser)
    if verb == "predict":
        parser.add_argument("--model", required=True, help="model folder written by 'train'")
        parser.add_argument("--input", required=True, help="time-series file/folder, manifest or BIDS folder")
        parser.add_argument("--output", required=True, help="CSV file to write (atomically)")
    if verb == "embed":
        parser.add_argument("--model", required=True, help="model folder from 'train' or an expert folder")
        # --input/--output as for predict and segment; --data/--out still accepted
        parser.add_argument("--input", "--data", dest="input", required=True,
                            help="time-series file/folder, manifest or BIDS folder")
        parser.add_argument("--output", "--out", dest="output", required=True, help="output .csv or .npy")


def run(verb: str, args: argparse.Namespace) -> int:
    from neuromoe.config import inherited_preset
    from neuromoe.pipelines import brainmoe as pipe

    # checked for every verb: a typo in --config/--set is exit 2 even where the model's stored config runs
    preset = inherited_preset(args.config, getattr(args, "experts", None))
    cfg = pipe.load_brainmoe_config(preset, args.overrides, seed=args.seed, device=args.device)
    if verb == "predict":
        frame, failures = pipe.predict(args.model, args.input, args.output, device=args.device)
        print(f"wrote {len(frame)} predictions to {args.output}; {len(failures)} failed", file=sys.stderr)
        return 1 if failures else 0
    if verb == "embed":
        if Path(args.output).suffix.lower() not in (".csv", ".npy"):
            raise InputError(
                "output must end in .csv or .npy", path=args.output, fix="e.g. --output embeddings.csv"
            )
        out, failures = pipe.embed(args.model, args.input, args.output, device=args.device)
        print(out)
        if failures:
            print(f"{len(failures)} scan(s) failed, listed in {failures_path(out)}", file=sys.stderr)
        return 1 if failures else 0
    if getattr(args, "unfreeze_experts", None) is not None:
        cfg.model.unfreeze_experts = args.unfreeze_experts
    if verb == "pretrain":
        if args.expert_kind:
            cfg.expert.kind = args.expert_kind
        states = args.state
        if args.states and args.states != "all":
            states = [s.strip() for s in args.states.split(",") if s.strip()]
        pooled = False if args.no_pooled else (None if states is None else False)
        print(pipe.pretrain(args.data, args.out, cfg, states=states, pooled=pooled, resume=args.resume))
        return 0
    if verb == "train":
        if args.top_k is not None:
            cfg.model.top_k = args.top_k
        print(pipe.train(args.data, args.out, cfg, experts=args.experts, resume=args.resume) / "model")
        return 0
    if args.folds is not None:
        cfg.eval.folds = args.folds
    print(pipe.evaluate(args.experts, args.data, args.out, cfg) / "metrics.json")
    return 0
