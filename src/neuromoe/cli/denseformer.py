"""``neuromoe <verb> --family denseformer``: thin argparse wrappers over :mod:`neuromoe.pipelines.denseformer`."""

from __future__ import annotations

import argparse
import sys

# verbs that train, so torchrun shares their work out over its ranks; the others run on rank 0 alone
DISTRIBUTED_VERBS = ("pretrain", "train")

VERBS = {
    "pretrain": "MAE pretraining of the DenseNet+ViT backbone on (unlabelled) T1 scans; writes RUN/model and "
                "RUN/reconstruction.png.\n\nexample:\n  neuromoe pretrain --family denseformer --config demo "
                "--data data/synth --out runs/df_mae",
    "train": "Multi-task fine-tuning (brain age, sex, AD, PD) with the task-routed MoE head.\n\nexample:\n"
             "  neuromoe train --family denseformer --config demo --data data/synth "
             "--pretrained runs/df_mae/model --out runs/df_ft",
    "evaluate": "Per-task metrics with bootstrap CIs, brain-age gap, conformal coverage, TBV baseline and "
                "report figures.\n\nexample:\n  neuromoe evaluate --family denseformer --model runs/df_ft/model "
                "--data data/synth --out runs/df_eval",
    "predict": "Predict new T1 scans (file, folder or manifest) with the stored preprocessing.\n\nexample:\n"
               "  neuromoe predict --family denseformer --model runs/df_ft/model --input scans/ "
               "--output preds.csv",
}


def add_arguments(verb: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=None, help="preprocessing cache folder "
                        "(default: $NEUROMOE_CACHE or ~/.cache/neuromoe/preprocess)")
    if verb in ("pretrain", "train"):
        parser.add_argument("--data", required=True, help="cohort folder, manifest CSV/TSV or BIDS folder")
        parser.add_argument("--out", required=True, help="run directory")
        parser.add_argument("--resume", action="store_true", help="resume from RUN/checkpoints/last.safetensors")
    if verb == "train":
        parser.add_argument("--pretrained", default=None, help="MAE model folder from 'pretrain' (default: scratch)")
        parser.add_argument("--head", choices=["moe", "shared", "separate"], default=None,
                            help="multi-task head (default from config: moe)")
        parser.add_argument("--freeze", action="store_true", help="freeze the backbone (linear probe)")
        parser.add_argument("--label-fraction", type=float, default=None,
                            help="use this fraction of the labelled training subjects (e.g. 0.1)")
    if verb == "evaluate":
        parser.add_argument("--model", required=True, help="model folder written by 'train'")
        parser.add_argument("--data", required=True, help="labelled cohort folder, manifest or BIDS folder")
        parser.add_argument("--out", required=True, help="output folder (metrics.json, predictions.csv, report)")
        parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                            help="which rows to score (default test); 'all' scores every row of an external "
                                 "cohort (scans the model was fitted on are refused)")
    if verb == "predict":
        parser.add_argument("--model", required=True, help="model folder written by 'train'")
        parser.add_argument("--input", required=True, help="NIfTI file, folder of NIfTI files, manifest or BIDS")
        parser.add_argument("--output", required=True, help="CSV file to write (atomically)")
        parser.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
        parser.add_argument("--batch-size", type=int, default=4)
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(verb: str, args: argparse.Namespace) -> int:
    from neuromoe.config import inherited_preset
    from neuromoe.pipelines import denseformer as pipe

    # checked for every verb: a typo in --config/--set is exit 2 even where the model's stored config runs
    preset = inherited_preset(args.config, getattr(args, "pretrained", None))
    cfg = pipe.load_denseformer_config(preset, args.overrides, seed=args.seed, device=args.device)
    if verb == "predict":
        frame, failures = pipe.predict(args.model, args.input, args.output, device=args.device,
                                       strict=args.strict, progress=not args.no_progress,
                                       cache_dir=args.cache or cfg.cache_dir, batch_size=args.batch_size)
        print(f"wrote {len(frame)} predictions to {args.output}; {len(failures)} failed", file=sys.stderr)
        return 1 if failures else 0
    if args.cache:
        cfg.cache_dir = args.cache
    if verb == "evaluate":
        out = pipe.evaluate(args.model, args.data, args.out, split=args.split, device=args.device,
                            n_bootstrap=cfg.eval.n_bootstrap, seed=cfg.seed, cache_dir=cfg.cache_dir)
        print(out / "metrics.json")
        return 0
    if verb == "pretrain":
        print(pipe.pretrain(args.data, args.out, cfg, resume=args.resume) / "model")
        return 0
    ft = cfg.finetune
    if args.pretrained:
        ft.pretrained = args.pretrained
    if args.head:
        cfg.model.head = args.head
    ft.freeze = ft.freeze or args.freeze
    if args.label_fraction is not None:
        ft.label_fraction = args.label_fraction
    print(pipe.train(args.data, args.out, cfg, resume=args.resume) / "model")
    return 0
