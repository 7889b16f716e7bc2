"""``neuromoe demo``: the end-to-end main job on the embedded synthetic default."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Synthesise a cohort, preprocess it, train and evaluate all three model families, and write one "
        "HTML report (about 10 minutes on 2 CPU cores)."
    )
    parser.epilog = "example:\n  neuromoe demo --out runs/demo --seed 0"
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the cohort and the models")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from neuromoe.pipelines.demo import run_demo

    report = run_demo(args.out, seed=args.seed, device=args.device)
    print(report)
    return 0
