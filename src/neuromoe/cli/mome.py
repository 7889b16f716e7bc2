"""``neuromoe <verb> --family mome``: thin argparse wrappers over :mod:`neuromoe.pipelines.mome`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from neuromoe.models.mome import DEFAULT_MODALITIES

# verbs that train, so torchrun shares their work out over its ranks; the others run on rank 0 alone
DISTRIBUTED_VERBS = ("pretrain", "train")

VERBS = {
    "pretrain": "Stage 1: train one expert U-Net per modality, each alone on its modality's images; writes "
    "RUN/experts/<modality>.\n\nexample:\n  neuromoe pretrain --family mome --config demo "
    "--data data/synth --out runs/mome_experts",
    "train": "Stage 2: MoME (hierarchical gate, curriculum), MoME+ (--set model.multimodal=true) or sparse "
    "experts (--set model.top_k=2), optionally starting from stage-1 experts; writes RUN/model.\n\nexample:\n"
    "  neuromoe train --family mome --config demo --data data/synth --experts runs/mome_experts "
    "--out runs/mome",
    "evaluate": "Dice, HD95, lesion-wise F1 and volume difference per case × modality, tables per dataset / "
    "modality / lesion type, expert specialisation, overlays and gate maps.\n\nexample:\n"
    "  neuromoe evaluate --family mome --model runs/mome/model --data data/synth --out runs/mome_eval",
    "segment": "Segment lesions in new scans. The mask is written on the input grid (same shape and affine); "
    "a JSON sidecar gives lesion volume (mL), component count and per-expert gate share.\n\nexamples:\n"
    "  neuromoe segment --model runs/mome/model --t1 sub-01_T1w.nii.gz --flair sub-01_FLAIR.nii.gz "
    "--output sub-01_mask.nii.gz\n"
    "  neuromoe segment --model runs/mome/model --input data/new/manifests/lesion.csv --output masks/",
}


def _precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="inference precision (default: the one the model's threshold was tuned with)",
    )


def add_arguments(verb: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache",
        default=None,
        help="preprocessing cache folder (default: $NEUROMOE_CACHE or ~/.cache/neuromoe/preprocess; "
        "segment: none)",
    )
    if verb in ("pretrain", "train"):
        parser.add_argument(
            "--data", required=True, help="cohort folder, lesion manifest CSV/TSV or BIDS folder"
        )
        parser.add_argument("--out", required=True, help="run directory")
        parser.add_argument("--resume", action="store_true", help="resume from the run's last checkpoint")
    if verb == "train":
        parser.add_argument(
            "--experts", default=None, help="run folder written by 'pretrain' (stage-1 experts)"
        )
    if verb == "evaluate":
        parser.add_argument("--model", required=True, help="model folder written by 'train'")
        parser.add_argument("--data", required=True, help="labelled cohort folder, manifest or BIDS folder")
        parser.add_argument("--out", required=True, help="output folder (metrics.json, per_case.csv, report)")
        parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                            help="which rows to score (default test); 'all' scores every row of an external "
                                 "cohort (scans the model was fitted on are refused)")
        parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation")
        _precision_argument(parser)
    if verb == "segment":
        parser.add_argument("--model", required=True, help="model folder written by 'train'")
        g = parser.add_argument_group("one case (any non-empty subset of the model's modalities)")
        for m in DEFAULT_MODALITIES:
            g.add_argument(f"--{m}", default=None, metavar="NIFTI", help=f"{m.upper()} image", action=_Once)
        parser.add_argument(
            "--input", default=None, help="batch mode: lesion manifest, cohort or BIDS folder"
        )
        parser.add_argument(
            "--output", required=True, help="mask .nii.gz (one case) or output folder (batch)"
        )
        parser.add_argument(
            "--reference", default=None, choices=DEFAULT_MODALITIES, metavar="MODALITY",
            help="the given modality whose grid the mask is written on (default: the first given of "
            f"{', '.join(DEFAULT_MODALITIES)})",
        )
        parser.add_argument("--probabilities", action="store_true", help="also write the probability map")
        parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation")
        _precision_argument(parser)


class _Once(argparse.Action):
    """An image flag given twice is an error: argparse kept the last file and dropped the first without a word."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): one image per "
                         "modality")
        setattr(namespace, self.dest, values)


def run(verb: str, args: argparse.Namespace) -> int:
    from neuromoe.config import inherited_preset
    from neuromoe.errors import InputError
    from neuromoe.pipelines import mome as pipe

    # checked for every verb: a typo in --config/--set is exit 2 even where the model's stored config runs
    preset = inherited_preset(args.config, getattr(args, "experts", None))
    cfg = pipe.load_mome_config(preset, args.overrides, seed=args.seed, device=args.device)
    if args.cache:
        cfg.cache_dir = args.cache
    if verb == "segment":
        paths = {m: getattr(args, m) for m in DEFAULT_MODALITIES if getattr(args, m)}
        if bool(paths) == bool(args.input):
            raise InputError(
                "give either image flags (--t1, --flair, ...) or --input, not both or neither",
                fix="e.g. --t1 A.nii.gz --output mask.nii.gz, or --input manifest.csv --output masks/",
            )
        sidecars, failures = pipe.segment(
            args.model,
            paths or args.input,
            args.output,
            probabilities=args.probabilities,
            tta=args.tta,
            precision=args.precision,
            device=args.device,
            cache_dir=cfg.cache_dir,
            reference=args.reference,
        )
        if paths:
            print(json.dumps({k: v for k, v in sidecars[0].items() if k != "inputs"}))
        else:
            print(
                f"segmented {len(sidecars)} cases into {args.output}; {len(failures)} failed", file=sys.stderr
            )
        return 1 if failures else 0
    if verb == "evaluate":
        out = pipe.evaluate(
            args.model,
            args.data,
            args.out,
            split=args.split,
            tta=args.tta or cfg.eval.tta,
            device=args.device,
            seed=args.seed,  # None: the split seed stored with the model
            cache_dir=cfg.cache_dir,
            n_overlays=cfg.eval.n_overlays,
            precision=args.precision,
        )
        print(out / "metrics.json")
        return 0
    if verb == "pretrain":
        print(pipe.pretrain(args.data, args.out, cfg, resume=args.resume) / "experts")
        return 0
    print(pipe.train(args.data, args.out, cfg, experts=args.experts, resume=args.resume) / "model")
    return 0
