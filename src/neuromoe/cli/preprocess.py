"""``neuromoe preprocess``: preprocess a cohort into a cache (parallel, shardable, resumable)."""

from __future__ import annotations

import argparse
import json

from neuromoe.errors import ConfigError


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Preprocess every subject of a manifest or BIDS folder (RAS+, spacing, foreground crop, "
                          "normalisation, pad/crop) into a cache; a second run recomputes nothing.")
    parser.epilog = "example:\n  neuromoe preprocess --data data/synth/manifests/structural.csv --out cache --workers 2"
    parser.add_argument("--data", required=True, help="manifest CSV/TSV or BIDS folder")
    parser.add_argument("--out", required=True, help="cache directory")
    parser.add_argument("--spacing", type=float, default=2.0, help="isotropic target spacing in mm")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64],
                      help="target shape (a crop/pad centred on the foreground)")
    size.add_argument("--full-fov", action="store_true",
                      help="keep the whole field of view, as MoME evaluate (and its demo preset) read a case")
    parser.add_argument("--norm", choices=("zscore", "rank", "percentile", "none"), default="zscore")
    parser.add_argument("--register", action="store_true", help="affine registration to MNI152")
    parser.add_argument("--no-antialias", action="store_true",
                        help="resample finer scans without first blurring them to the target resolution")
    parser.add_argument("--interpolation", choices=("cubic", "linear"), default="cubic",
                        help="images onto the target grid: cubic B-spline, or linear, which blurs by where the "
                             "grids fall (preprocessing.interpolation)")
    parser.add_argument("--head-mask", action="store_true",
                        help="take the head (largest connected region above 10%% of the peak) as foreground instead "
                             "of every voxel above the dust, a noise floor included (preprocessing.head_mask)")
    parser.add_argument("--bias-correct", action="store_true",
                        help="N4 bias-field correction of every image within its head (SimpleITK; "
                             "preprocessing.bias_correct)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shard", default="0/1", help="i/n: process only shard i of n")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} is not i/n", fix="e.g. --shard 0/4") from None
    return i, n


def _run(args: argparse.Namespace) -> int:
    from neuromoe.data.preprocess import PreprocSpec, preprocess_cohort
    from neuromoe.io.table import load_table

    shard = _shard(args.shard)
    spec = PreprocSpec(spacing=(args.spacing,) * 3, shape=None if args.full_fov else tuple(args.shape), norm=args.norm,
                       register=args.register, antialias=not args.no_antialias, head_mask=args.head_mask,
                       bias_correct=args.bias_correct, interpolation=args.interpolation)
    table = load_table(args.data)
    summary = preprocess_cohort(table, spec, args.out, workers=args.workers, shard=shard,
                                progress=not args.no_progress)
    print(json.dumps(summary))
    return 0 if not summary["failed"] else 1
