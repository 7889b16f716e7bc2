"""``neuromoe report``: merge finished run directories into one self-contained HTML page."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Collect the report section (report/section.json + PNGs) and training curves (metrics.csv) of each "
        "run directory into one HTML file with inlined figures, safe to share: no absolute paths."
    )
    parser.epilog = (
        "examples:\n"
        "  neuromoe report runs/core runs/denseformer --out report.html\n"
        "  neuromoe report runs/mome --out mome.html --title 'MoME on site B'"
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, in page order")
    parser.add_argument("--out", "-o", default="report.html", help="output HTML file (default: report.html)")
    parser.add_argument("--title", default="NeuroMoE report", help="page title")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from neuromoe.eval.report import build_report

    print(build_report(args.run_dirs, args.out, title=args.title))
    return 0
