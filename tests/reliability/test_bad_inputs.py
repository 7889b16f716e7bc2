"""Every corpus kind through every data-taking command (issue 7, item 1).

Default run: every kind through ``info`` plus a fixed subset of kinds (one per failure family and
the awkward-but-valid ones; valid runs of training commands only in the slow target) through every
other command, in-process, and two real subprocesses.
``-m slow``: the full matrix in-process, a subprocess sample per command, and (with
``NEUROMOE_RELIABILITY_TABLE=docs/reliability.md``) the generated outcome table.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from reliability_harness import COMMANDS, Outcome, expected, run_case, run_inprocess, write_table

FAST_KINDS = (
    "truncated_gz",
    "gigantic_header",
    "nan_voxels",
    "nonascii_spaces_valid",
    "modalities_on_different_grids",
    "manifest_duplicated_subjects",
    "manifest_points_to_missing_file",
    "bids_without_participants_tsv",
    "manifest_nonascii_spaces_valid",
    "empty_folder",
    "timeseries_nan",
    "fmri_manifest_duplicated_scans",
    "fmri_manifest_points_to_missing_file",
)
CMD = {c.name: c for c in COMMANDS}


def _check(outcome: Outcome) -> None:
    assert outcome.passed, f"{outcome.command} × {outcome.kind}: " + "; ".join(outcome.problems)


def test_corpus_covers_the_issue(corpus: dict) -> None:
    bad = [c for c in corpus.values() if c.bad]
    assert len(bad) >= 40 and len(corpus) - len(bad) >= 6
    assert len({c.kind for c in corpus.values()}) == len(corpus)


def test_info_every_kind(corpus: dict, env) -> None:
    for case in corpus.values():
        _check(run_case(CMD["info"], case, env))


# need a trained tiny MoME (minutes on a loaded 2-core machine): slow matrix only
SLOW_ONLY = ("mome evaluate", "mome segment")


@pytest.mark.parametrize(
    "command", [c.name for c in COMMANDS if c.name != "info" and c.name not in SLOW_ONLY]
)
def test_fast_subset(command: str, corpus: dict, env) -> None:
    cmd = CMD[command]
    if not cmd.available():
        pytest.skip(f"{command} has not landed")
    for kind in FAST_KINDS:
        if cmd.trains and expected(cmd, corpus[kind]) == "ok":
            continue  # a full (tiny) training per valid kind is left to the slow matrix
        _check(run_case(cmd, corpus[kind], env))


@pytest.mark.parametrize("kind", ["gigantic_header", "nifti2_valid"])
def test_real_process_exit_code_and_stderr(kind: str, corpus: dict, env) -> None:
    """The console entry point, not just main(): real exit code, one line, no traceback or warnings."""
    _check(run_case(CMD["info"], corpus[kind], env, subprocess_=True))


@pytest.mark.slow
def test_full_matrix(corpus: dict, env) -> None:
    # NEUROMOE_RELIABILITY_SLOW_ONLY_KINDS=a,b limits the MoME evaluate/segment columns to those kinds (a
    # time-limited run on a loaded machine); the other cells then read "not run", never a result.
    limit = os.environ.get("NEUROMOE_RELIABILITY_SLOW_ONLY_KINDS")
    keep = set(limit.split(",")) if limit else None
    outcomes = [
        Outcome(cmd.name, case.kind, "not run", "not run")
        if keep is not None and cmd.name in SLOW_ONLY and case.kind not in keep
        else run_case(cmd, case, env)
        for cmd in COMMANDS
        for case in corpus.values()
    ]
    target = os.environ.get("NEUROMOE_RELIABILITY_TABLE")
    if target:
        write_table(Path(target), outcomes, corpus)
    failed = [o for o in outcomes if not o.passed]
    assert not failed, "\n".join(f"{o.command} × {o.kind}: {'; '.join(o.problems)}" for o in failed)
    assert sum(o.expected not in ("n/a", "missing") for o in outcomes) >= 200


@pytest.mark.slow
@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_subprocess_sample(command: str, corpus: dict, env) -> None:
    """One refusal and one batch/valid run per command as a real process."""
    cmd = CMD[command]
    if not cmd.available():
        pytest.skip(f"{command} has not landed")
    kinds = ["truncated_gz", "manifest_duplicated_subjects" if command != "info" else "nifti2_valid"]
    for kind in kinds:
        _check(run_case(cmd, corpus[kind], env, subprocess_=True))


def test_fmri_kinds_refused_by_the_brainmoe_loaders(corpus: dict) -> None:
    """Every fMRI kind at library level in the default run (the commands take them in the slow matrix)."""
    from neuromoe.data.fmri import extract_timeseries, load_timeseries
    from neuromoe.errors import InputError

    for case in corpus.values():
        if case.role not in ("timeseries", "bold"):
            continue
        load = load_timeseries if case.role == "timeseries" else extract_timeseries
        with pytest.raises(InputError) as err:
            load(case.path)
        assert case.culprit.name in str(err.value) and "fix:" in str(err.value) and "\n" not in str(err.value)


def test_predict_single_bad_file(corpus: dict, env) -> None:
    """One scan given directly (not a manifest): its own one-line error, exit 2, nothing written."""
    case = corpus["nan_voxels"]
    out = env.root / "single-predict"
    rc, _, err = run_inprocess(CMD["denseformer predict"].argv(case.path, env, out))
    assert rc == 2 and err.count("\n") == 1 and case.culprit.name in err and "fix:" in err
    assert not out.exists()
