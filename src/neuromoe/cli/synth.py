"""``neuromoe synth``: write a synthetic ground-truth cohort (structural, lesion, fMRI)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Generate a synthetic cohort on the MNI152 template with known ages, diagnoses, "
                          "lesion masks and fMRI connectivity effects (layout: docs/design.md).")
    parser.epilog = "example:\n  neuromoe synth --out data/synth --n-subjects 150 --n-lesion 60 --n-fmri 240 --seed 0"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", required=True, help="output cohort folder")
    parser.add_argument("--n-subjects", type=int, default=150, help="structural T1 subjects (default 150)")
    parser.add_argument("--n-lesion", type=int, default=60, help="lesion cases (default 60)")
    parser.add_argument("--n-fmri", type=int, default=240, help="fMRI subjects, half pretrain (default 240)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=3.0, help="voxel size in mm (6 gives ~32^3 test volumes)")
    parser.add_argument("--modalities", default="t1,t1c,t2,flair,dwi", help="comma list of lesion modalities")
    parser.add_argument("--kinds", default="structural,lesion,fmri", help="comma list of what to generate")
    parser.add_argument("--n-rois", type=int, default=264, help="fMRI ROIs (Power-264 subsampled if fewer)")
    parser.add_argument("--bold", action="store_true", help="also write 4D BOLD NIfTI per fMRI scan")
    parser.add_argument("--quicklook", action="store_true", help="write OUT/quicklook.png")
    parser.add_argument("--pose-deg", type=float, default=0.0,
                        help="sd (degrees) of each head's rotation about each axis, cut at 2.5 sd; 0 = the template's "
                             "pose (default), 5 = heads tilted as in a scanner")
    parser.add_argument("--shift-mm", type=float, default=0.0,
                        help="sd (mm) of each head's shift along each axis, cut at 2.5 sd (default 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing subjects in parallel (the cohort is identical for any number)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromoe.data.synth import quicklook, synth_cohort

    paths = synth_cohort(args.out, n_structural=args.n_subjects, n_lesion=args.n_lesion, n_fmri=args.n_fmri,
                         seed=args.seed, spacing=args.spacing, modalities=tuple(args.modalities.split(",")),
                         kinds=tuple(args.kinds.split(",")), n_rois=args.n_rois, bold=args.bold,
                         workers=args.workers, pose_deg=args.pose_deg, shift_mm=args.shift_mm)
    if args.quicklook:
        paths["quicklook"] = str(quicklook(args.out, Path(args.out) / "quicklook.png"))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0
