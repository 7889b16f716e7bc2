"""``neuromoe`` entry point.

Two kinds of commands share one language:

* plain commands (``info``, ``synth``, ``preprocess``, ``report``, ``demo``): a module in
  ``neuromoe.cli`` with ``register(subparsers)`` that sets ``func`` on its parser;
* family verbs (``pretrain``, ``train``, ``evaluate``, ``predict``, ``segment``, ``embed``): the same verb
  for every model family, selected with ``--family``. Each family module (``neuromoe.cli.<family>``)
  owns its flags through ``add_arguments(verb, parser)`` and runs through ``run(verb, args)``, so
  families never collide on option names. Parsing is two-stage: the verb and family are read first,
  then the family's parser for that verb parses the full command line.

Modules are imported lazily so ``neuromoe --help`` stays fast. Any :class:`NeuroMoEError` becomes one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from neuromoe import __version__
from neuromoe.errors import NeuroMoEError

PLAIN_COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("neuromoe.cli.info", "inspect NIfTI files: orientation, spacing, shape, range, sanity verdict"),
    "synth": ("neuromoe.cli.synth", "generate a synthetic ground-truth cohort on real MNI152 anatomy"),
    "preprocess": ("neuromoe.cli.preprocess", "preprocess a cohort (cached, parallel, shardable)"),
    "report": ("neuromoe.cli.report", "turn one or more run directories into one HTML report"),
    "demo": ("neuromoe.cli.demo", "end-to-end demo of all three families on a synthetic cohort"),
}

FAMILIES: dict[str, str] = {
    "denseformer": "neuromoe.cli.denseformer",
    "mome": "neuromoe.cli.mome",
    "brainmoe": "neuromoe.cli.brainmoe",
}

FAMILY_VERBS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    # verb: (help, families that support it, implied family)
    "pretrain": ("self-supervised / per-expert pretraining", ("denseformer", "mome", "brainmoe"), None),
    "train": ("supervised training / fine-tuning", ("denseformer", "mome", "brainmoe"), None),
    "evaluate": ("evaluate a model on a labelled cohort", ("denseformer", "mome", "brainmoe"), None),
    "predict": ("predict labels for new scans", ("denseformer", "brainmoe"), None),
    "segment": ("segment lesions in new scans", ("mome",), "mome"),
    "embed": ("export joint embeddings", ("brainmoe",), "brainmoe"),
}
VERB_ALIASES = {"finetune": "train", "train-experts": "pretrain"}

EPILOG = """examples:
  neuromoe synth --out data/synth --n-subjects 40 --seed 0
  neuromoe info data/synth/sub-0001/anat/sub-0001_T1w.nii.gz
  neuromoe pretrain --family denseformer --data data/synth/manifests/structural.csv --out runs/mae
  neuromoe train --family mome --config demo --data data/synth/manifests/lesion.csv --out runs/mome
  neuromoe train --family denseformer --help      (family-specific options)
"""


INFERENCE_VERBS = ("predict", "segment", "embed")


def add_common_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """Options every family verb understands. Inference verbs replay the preprocessing and architecture stored
    with the model; they still check --config/--set (a typo is exit 2, never silently accepted)."""
    g = parser.add_argument_group("common options")
    note = " (checked; the model's stored config is what runs)" if verb in INFERENCE_VERBS else ""
    g.add_argument("--config", "-c", default=None, help=f"preset name (tiny, demo, paper) or a YAML file{note}")
    g.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set train.lr=1e-3 (repeatable){note}",
    )
    g.add_argument("--seed", type=int, default=None, help="random seed (overrides the config)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuromoe",
        description="NeuroMoE: Mixture-of-Experts foundation models for brain MRI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"neuromoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in PLAIN_COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    for name, (help_, fams, _) in FAMILY_VERBS.items():
        sub.add_parser(name, help=f"{help_} [--family {'|'.join(fams)}]", add_help=False)
    return parser


def _family_of(argv: list[str], verb: str) -> str | None:
    implied = FAMILY_VERBS[verb][2]
    for i, tok in enumerate(argv):
        if tok == "--family" and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith("--family="):
            return tok.split("=", 1)[1]
    return implied


def _run_family_verb(verb: str, argv: list[str]) -> int:
    help_, fams, implied = FAMILY_VERBS[verb]
    family = _family_of(argv, verb)
    if family is None or family not in fams:
        parser = argparse.ArgumentParser(
            prog=f"neuromoe {verb}",
            description=f"{help_}. Choose a family: {', '.join(fams)}; "
            f"'neuromoe {verb} --family NAME --help' lists its options.",
        )
        parser.add_argument("--family", required=True, choices=fams)
        if family is None and not any(a in ("-h", "--help") for a in argv):
            parser.error(f"--family is required (one of: {', '.join(fams)})")
        parser.parse_args(argv)  # prints help or the choices error and exits
        return 2
    module = importlib.import_module(FAMILIES[family])
    parser = argparse.ArgumentParser(
        prog=f"neuromoe {verb} --family {family}",
        description=module.VERBS[verb],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--family", default=implied or family, choices=fams, help="model family")
    add_common_arguments(parser, verb)
    module.add_arguments(verb, parser)
    args = parser.parse_args(argv)
    from neuromoe.engine.utils import resolve_device

    resolve_device(getattr(args, "device", "auto"))  # --device cuda without a GPU: refused before any output
    if getattr(args, "out", None):  # the run / evaluation folder of pretrain, train and evaluate
        from neuromoe.io.atomic import check_out_folder

        check_out_folder(args.out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and verb not in getattr(module, "DISTRIBUTED_VERBS", ()):
        # nothing here trains, so no process group opens: every rank would run the whole command on the same
        # GPU and write the same files. Rank 0 does it alone; the others leave at once.
        if int(os.environ.get("RANK", "0")) > 0:
            return 0
        warnings.warn(f"'neuromoe {verb} --family {family}' runs in one process: under torchrun rank 0 does it "
                      "alone and the other ranks leave at once (run it without torchrun)", stacklevel=1)
    return int(module.run(verb, args) or 0)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning reads like the toolkit's notices: one line, without the source line that raised it."""
    kind = "warning" if category is UserWarning else category.__name__
    return f"neuromoe: {kind}: {message}\n"


def _out_of_memory(exc: RuntimeError) -> bool:
    """torch's CUDA out-of-memory error, or the CPU allocator's 'can't allocate memory'."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    previous = warnings.formatwarning  # one-line warnings for the command's run only (main may be called in-process)
    warnings.formatwarning = _one_line_warning
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        warnings.formatwarning = previous


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] in VERB_ALIASES:
            argv[0] = VERB_ALIASES[argv[0]]
        if not argv or (argv[0] not in PLAIN_COMMANDS and argv[0] not in FAMILY_VERBS):
            _top_parser().parse_args(argv or ["--help"])
            return 2
        command, rest = argv[0], argv[1:]
        if command in FAMILY_VERBS:
            # under torchrun every rank runs this; only rank 0 prints results, notices and progress bars.
            # Errors still show on every rank: they are printed (and tracebacks raised) outside the redirect.
            quiet = int(os.environ.get("RANK", "0")) > 0
            with contextlib.ExitStack() as stack:
                if quiet:
                    sink = stack.enter_context(open(os.devnull, "w"))
                    stack.enter_context(contextlib.redirect_stdout(sink))
                    stack.enter_context(contextlib.redirect_stderr(sink))
                return _run_family_verb(command, rest)
        module = importlib.import_module(PLAIN_COMMANDS[command][0])
        parser = argparse.ArgumentParser(prog=f"neuromoe {command}", formatter_class=argparse.RawDescriptionHelpFormatter)
        module.register(parser)
        args = parser.parse_args(rest)
        return int(args.func(args) or 0)
    except NeuroMoEError as exc:
        print(f"neuromoe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("neuromoe: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # out of memory: one line and what to change, not a traceback
        if isinstance(exc, RuntimeError) and not _out_of_memory(exc):
            raise
        print(f"neuromoe: error: out of memory ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
              " — fix: use a smaller preset, batch size or patch size, or a machine with more memory", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, a folder where a file goes: the path and reason suffice
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"neuromoe: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
