"""Run corpus cases through every data-taking command and judge the outcome.

The matrix is a table of :class:`Command` rows: which case roles a command takes, how a case becomes
its arguments, which output paths must not appear after a refusal, and which kinds are legitimately
fine for it (e.g. ``info`` inspects 4D files; ``pretrain`` reads no labels). A command whose module
has not landed yet is listed as *missing*, never faked.

Expected outcomes:

* ``refused``: exit 2, exactly one stderr line ``neuromoe: error: …`` naming the culprit file (or the
  subject) and a fix, no traceback, no output file under the command's output folder;
* ``batch``: row-level defects in batch commands (preprocess, predict, segment): exit 1, the good rows
  done, a failures table naming the bad subject;
* ``ok``: awkward-but-valid inputs (and kinds the command does not read) succeed with their outputs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from reliability_corpus import Case, cohort_rows, fmri_rows

from neuromoe.cli.main import main

# Manifest kinds whose defect sits in one subject's row (a file or a label), not in the manifest itself.
ROW_LEVEL = {
    "modalities_on_different_grids",
    "mask_unexpected_labels",
    "manifest_points_to_missing_file",
    "manifest_folder_as_image",
    "manifest_non_numeric_age",
    "fmri_manifest_points_to_missing_file",
    "fmri_manifest_folder_as_series",
    "fmri_manifest_wrong_roi_count",
}
# Roles whose cases are one file put into a sub-bad row of the good cohort (not given as they are).
ROW_ROLES = ("image", "bold", "timeseries")
BAD_SUBJECT = "sub-bad"


@dataclass
class Env:
    """Per-session state shared by all runs: the good cohort, the preprocessing cache, tiny models."""

    root: Path
    cache: Path
    cohort: list[dict[str, object]]
    fmri: list[dict[str, object]]
    models: dict[str, Path] = field(default_factory=dict)

    def model(self, family: str) -> Path:
        """A tiny model of ``family`` trained once, through the real CLI, on the good cohort."""
        if family not in self.models:
            run = self.root / "models" / family
            if family == "brainmoe":
                argv = _brainmoe("train")(self.fmri_manifest(), self, run)
            else:
                manifest = self.root / "cohort.csv"
                pd.DataFrame(self.cohort).to_csv(manifest, index=False)
                argv = _family("train", family)(manifest, self, run)
            rc, _, err = run_inprocess(argv)
            if rc != 0:
                raise RuntimeError(f"tiny {family} training failed: {err[-500:]}")
            self.models[family] = run / "model"
        return self.models[family]

    def fmri_manifest(self) -> Path:
        path = self.root / "fmri.csv"
        if not path.exists():
            pd.DataFrame(self.fmri).to_csv(path, index=False)
        return path

    def experts(self) -> Path:
        """Tiny BrainMoE experts pretrained once, through the real CLI, on the good fMRI cohort."""
        if "brainmoe-experts" not in self.models:
            run = self.root / "models" / "brainmoe-experts"
            rc, _, err = run_inprocess(_brainmoe("pretrain")(self.fmri_manifest(), self, run, no_experts=True))
            if rc != 0:
                raise RuntimeError(f"tiny BrainMoE pretraining failed: {err[-500:]}")
            self.models["brainmoe-experts"] = run
        return self.models["brainmoe-experts"]

    @classmethod
    def create(cls, root: Path) -> Env:
        root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, root / "cache", cohort_rows(root / "cohort"), fmri_rows(root / "fmri_cohort"))

    def manifest_with(self, case: Case, out: Path, role: str = "t1", split: str = "train") -> Path:
        """The good cohort plus ``sub-bad`` (in ``split``) whose ``role`` file is the case's file.

        fMRI roles (``timeseries``/``bold``) go into the fMRI cohort as a pretraining scan (``split`` =
        ``pretrain``) or a labelled downstream scan, with the other series column cleared."""
        if role in ("timeseries", "bold"):
            base = self.fmri[0] if split == "pretrain" else self.fmri[-1]
            other = "bold" if role == "timeseries" else "timeseries"
            rows = [*self.fmri, {**base, "subject": BAD_SUBJECT, other: "", role: str(case.path)}]
        else:  # copied from a row of the same split: a test row sharing a training case's mask is refused as
            # fitted (MoME evaluate), before the defect is read
            base = next((r for r in self.cohort if r["split"] == split), self.cohort[0])
            rows = [*self.cohort, {**base, "subject": BAD_SUBJECT, "split": split, role: str(case.path)}]
        path = out.parent / f"{out.name}-input.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(path, index=False)
        return path


@dataclass(frozen=True)
class Command:
    name: str
    roles: frozenset[str]
    argv: Callable[[Path, Env, Path], list[str]]  # (data path, env, out dir) -> argv
    module: str
    batch: bool = False
    failures: Callable[[Path], Path] | None = None  # out dir -> failures table
    outputs: Callable[[Path], list[Path]] = lambda out: [out]  # what a success writes
    message_stream: str = "stderr"
    ok_kinds: dict[str, str] = field(default_factory=dict)  # kinds this command does not read → why
    image_role: str = "t1"  # the manifest column an image kind is put in
    trains: bool = False  # costly: a valid input trains, or the command needs a trained tiny model
    other_reason: dict[str, str] = field(default_factory=dict)  # refused, rightly, for another defect
    other_roles: dict[str, str] = field(default_factory=dict)  # whole roles refused for another defect

    def available(self) -> bool:
        try:
            importlib.import_module(self.module)
        except ModuleNotFoundError:
            return False
        return True


@dataclass
class Outcome:
    command: str
    kind: str
    expected: str  # refused | batch | ok | n/a | missing
    got: str
    rc: int | None = None
    message: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


_T1_ONLY = {
    "modalities_on_different_grids": "reads only the T1 (the FLAIR is not used)",
    "mask_unexpected_labels": "reads only the T1 (the mask is not used)",
}
_MASKS_NEEDED = {  # MoME training/evaluation is supervised by lesion masks; this BIDS folder has none
    "bids_without_participants_tsv": "no lesion masks in the folder",
}
_TRAIN_ROW_ONLY = {  # the corpus puts these defects in a training-split row; MoME evaluate reads the test split
    k: "defect in a training row, not read"
    for k in (
        "modalities_on_different_grids",
        "mask_unexpected_labels",
        "manifest_points_to_missing_file",
        "manifest_folder_as_image",
    )
}
_NO_LABELS = {
    "bids_without_participants_tsv": "needs no labels",
    "manifest_non_numeric_age": "reads no labels",
}


# MoME's tiny preset still trains a full epoch and validates; one step is enough to exercise the inputs.
TINY_OVERRIDES = {
    ("mome", "pretrain"): ("--set", "pretrain.max_steps=1"),
    ("mome", "train"): ("--set", "train.max_steps=1"),
}


def _family(verb: str, family: str) -> Callable[[Path, Env, Path], list[str]]:
    """argv of ``neuromoe <verb> --family <family>`` with the tiny preset, the shared cache, on CPU."""

    def argv(data: Path, env: Env, out: Path) -> list[str]:
        base = [
            verb,
            "--family",
            family,
            "--config",
            "tiny",
            "--cache",
            str(env.cache),
            "--device",
            "cpu",
            *TINY_OVERRIDES.get((family, verb), ()),
        ]
        if verb in ("pretrain", "train"):
            return [*base, "--data", str(data), "--out", str(out)]
        model = ["--model", str(env.model(family))]
        if verb == "evaluate":
            return [*base, *model, "--data", str(data), "--out", str(out)]
        if verb == "segment":
            return [*base, *model, "--input", str(data), "--output", str(out)]
        return [
            *base,
            *model,
            "--input",
            str(data),
            "--output",
            str(out / "predictions.csv"),
            "--no-progress",
        ]

    return argv


_BM_OUTPUT = {
    "pretrain": "experts.json",
    "train": "model/model.safetensors",
    "evaluate": "metrics.json",
    "predict": "predictions.csv",
    "embed": "embeddings.csv",
}
_BM_3D_VALID = {k: "a 3D image is not a 4D BOLD run" for k in (
    "nifti2_valid", "nonascii_spaces_valid", "scl_slope_nan_valid", "scl_slope_zero_valid",
    "trailing_singletons_valid",
)}
_BM_STRUCTURAL = {
    "manifest": "a structural manifest has no timeseries/bold column",
    "bids": "a structural BIDS folder has no func/ scans",
}
_DOWNSTREAM_ROW = {  # the corpus puts these defects in a labelled downstream scan; pretraining does not read it
    k: "defect in a downstream scan, not read"
    for k in ("fmri_manifest_folder_as_series", "fmri_manifest_wrong_roi_count", "fmri_manifest_non_numeric_age")
}
_BM_OK = {
    "pretrain": {**_DOWNSTREAM_ROW, "fmri_bids_without_participants_tsv": "needs no labels"},
    "train": {},
    "evaluate": {},
    "predict": {
        "fmri_manifest_non_numeric_age": "reads no labels",
        "fmri_bids_without_participants_tsv": "needs no labels",
    },
}
_BM_OK["embed"] = _BM_OK["predict"]
_BM_OTHER = {  # BIDS without participants.tsv: no phenotype labels to train or evaluate on
    v: {"fmri_bids_without_participants_tsv": "no phenotype labels"} for v in ("train", "evaluate")
}


def _brainmoe(verb: str) -> Callable[..., list[str]]:
    """argv of ``neuromoe <verb> --family brainmoe`` with the tiny preset on CPU; fMRI row kinds go into the
    fMRI cohort as a pretraining scan for ``pretrain``, else as a labelled downstream scan."""

    def argv(data: Path, env: Env, out: Path, no_experts: bool = False) -> list[str]:
        base = [verb, "--family", "brainmoe", "--config", "tiny", "--device", "cpu"]
        if verb == "pretrain":
            return [*base, "--data", str(data), "--out", str(out)]
        if verb == "train":
            return [*base, "--data", str(data), "--experts", str(env.experts()), "--out", str(out)]
        if verb == "evaluate":
            return [*base, "--experts", str(env.experts()), "--data", str(data), "--out", str(out)]
        model = str(env.model("brainmoe"))
        return [*base, "--model", model, "--input", str(data), "--output", str(out / _BM_OUTPUT[verb])]

    return argv


COMMANDS: list[Command] = [
    Command(
        "info",
        frozenset({"image", "bold", "folder"}),
        lambda data, env, out: ["info", str(data)],
        "neuromoe.cli.info",
        outputs=lambda out: [],
        message_stream="stdout",
        ok_kinds={
            "4d_as_structural": "inspects 4D files",
            "bold_too_few_volumes": "inspects 4D files",
            "bold_is_3d": "a valid 3D image",
        },
    ),
    Command(
        "preprocess",
        frozenset({"image", "manifest", "bids", "folder"}),
        lambda data, env, out: [
            "preprocess",
            "--data",
            str(data),
            "--out",
            str(out),
            "--shape",
            "32",
            "32",
            "32",
            "--no-progress",
        ],
        "neuromoe.cli.preprocess",
        batch=True,
        failures=lambda out: out / "failures.csv",
        outputs=lambda out: [out],
        ok_kinds={**_NO_LABELS},
    ),
    Command(
        "denseformer pretrain",
        frozenset({"image", "manifest", "bids", "folder"}),
        _family("pretrain", "denseformer"),
        "neuromoe.cli.denseformer",
        outputs=lambda out: [out / "model" / "model.safetensors"],
        ok_kinds={**_T1_ONLY, **_NO_LABELS},
        trains=True,
    ),
    Command(
        "denseformer train",
        frozenset({"image", "manifest", "bids", "folder"}),
        _family("train", "denseformer"),
        "neuromoe.cli.denseformer",
        outputs=lambda out: [out / "model" / "model.safetensors"],
        ok_kinds=_T1_ONLY,
        trains=True,
    ),
    Command(
        "denseformer evaluate",
        frozenset({"image", "manifest", "bids", "folder"}),
        _family("evaluate", "denseformer"),
        "neuromoe.cli.denseformer",
        outputs=lambda out: [out / "metrics.json"],
        ok_kinds=_T1_ONLY,
    ),
    Command(
        "denseformer predict",
        frozenset({"image", "manifest", "bids", "folder"}),
        _family("predict", "denseformer"),
        "neuromoe.cli.denseformer",
        batch=True,
        failures=lambda out: out / "predictions_failures.csv",
        outputs=lambda out: [out / "predictions.csv"],
        ok_kinds={**_T1_ONLY, "bids_without_participants_tsv": "needs no labels"},
    ),
    Command(
        "mome pretrain",
        frozenset({"image", "manifest", "bids", "folder"}),
        _family("pretrain", "mome"),
        "neuromoe.cli.mome",
        outputs=lambda out: [out / "experts"],
        ok_kinds={"manifest_non_numeric_age": "reads no labels"},
        other_reason=_MASKS_NEEDED,
        trains=True,
    ),
    Command(
        "mome train",
        frozenset({"image", "manifest", "bids", "folder"}),
        _family("train", "mome"),
        "neuromoe.cli.mome",
        outputs=lambda out: [out / "model" / "model.safetensors"],
        ok_kinds={"manifest_non_numeric_age": "reads no labels"},
        other_reason=_MASKS_NEEDED,
        trains=True,
    ),
    Command(
        "mome evaluate",
        frozenset({"image", "manifest", "bids", "folder"}),
        _family("evaluate", "mome"),
        "neuromoe.cli.mome",
        outputs=lambda out: [out / "metrics.json"],
        ok_kinds={"manifest_non_numeric_age": "reads no labels", **_TRAIN_ROW_ONLY},
        other_reason=_MASKS_NEEDED,
        trains=True,
    ),
    Command(
        "mome segment",
        frozenset({"image", "manifest", "bids", "folder"}),
        _family("segment", "mome"),
        "neuromoe.cli.mome",
        batch=True,
        failures=lambda out: out / "failures.csv",
        outputs=lambda out: [out / "segment.csv"],
        ok_kinds={
            "bids_without_participants_tsv": "needs no labels or masks",
            "mask_unexpected_labels": "reads no masks",
            **_NO_LABELS,
        },
        trains=True,
    ),
    *(
        Command(
            f"brainmoe {verb}",
            frozenset({"image", "bold", "timeseries", "manifest", "bids", "folder", "fmri_manifest", "fmri_bids"}),
            _brainmoe(verb),
            "neuromoe.cli.brainmoe",
            batch=verb in ("predict", "embed"),
            failures=lambda out, verb=verb: out / f"{_BM_OUTPUT[verb].split('.')[0]}_failures.csv",
            outputs=lambda out, verb=verb: [out / _BM_OUTPUT[verb]],
            image_role="bold",
            ok_kinds=_BM_OK[verb],
            other_reason={**_BM_3D_VALID, **_BM_OTHER.get(verb, {})},
            other_roles=_BM_STRUCTURAL,
            trains=verb in ("pretrain", "train", "evaluate"),
        )
        for verb in ("pretrain", "train", "evaluate", "predict", "embed")
    ),
]


def expected(cmd: Command, case: Case) -> str:
    if not cmd.available():
        return "missing"
    if case.role not in cmd.roles:
        return "n/a"
    other = case.kind in cmd.other_reason or case.role in cmd.other_roles
    if case.kind in cmd.ok_kinds or not (case.bad or other):
        return "ok"
    in_row = case.role in ROW_ROLES and cmd.name != "info"
    row_level = in_row or (case.kind in ROW_LEVEL and case.role not in cmd.other_roles)
    return "batch" if cmd.batch and row_level else "refused"


def data_for(cmd: Command, case: Case, env: Env, out: Path) -> Path:
    """What the command gets: info takes files as they are; data commands get image kinds as a
    ``sub-bad`` row of the good cohort, manifests/BIDS/folders as they are."""
    if cmd.name == "info" or case.role not in ROW_ROLES:
        return case.path
    role = "timeseries" if case.role == "timeseries" else cmd.image_role
    # evaluate commands read the test split: put the bad row there; BrainMoE pretraining reads pretrain scans
    split = "test" if cmd.name.endswith("evaluate") else "pretrain" if cmd.name == "brainmoe pretrain" else "train"
    return env.manifest_with(case, out, role, split)


def run_inprocess(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
        except BaseException as exc:
            import traceback

            traceback.print_exc(file=err)
            rc = -1 if not isinstance(exc, KeyboardInterrupt) else 130
    return rc, out.getvalue(), err.getvalue()


def run_subprocess(argv: list[str], timeout: float = 300) -> tuple[int, str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "neuromoe.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _names(culprit: Path) -> tuple[str, ...]:
    return (str(culprit), culprit.name)


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def judge(
    cmd: Command, case: Case, env: Env, out: Path, rc: int, stdout: str, stderr: str, want: str
) -> Outcome:
    res = Outcome(cmd.name, case.kind, want, "", rc)
    problems = res.problems
    if "Traceback" in stderr or "Traceback" in stdout:
        problems.append("traceback: " + stderr.strip().splitlines()[-1][:200])
    stream = stdout if cmd.message_stream == "stdout" else stderr
    lines = [ln for ln in stream.splitlines() if ln.strip()]
    if rc == 2:
        res.got = "refused"
        res.message = lines[-1] if lines else ""
        if len(lines) != 1:
            problems.append(f"{len(lines)} message lines, expected 1")
        msg = "\n".join(lines)
        if cmd.message_stream == "stderr" and not msg.startswith("neuromoe: error:"):
            problems.append("message does not start with 'neuromoe: error:'")
        other = case.kind in cmd.other_reason or case.role in cmd.other_roles
        named = (*_names(case.culprit), *(_names(case.path) if other else ()))
        if not any(n in msg for n in named) and BAD_SUBJECT not in msg:
            problems.append(f"message does not name {case.culprit.name}")
        if "fix:" not in msg:
            problems.append("message gives no fix")
        left = _files_under(out)
        if left:
            problems.append(f"refusal left files: {[str(p.relative_to(out)) for p in left[:3]]}")
    elif rc == 1 and cmd.batch:
        res.got = "batch"
        table = cmd.failures(out) if cmd.failures else None
        if table is None or not table.is_file():
            problems.append("no failures table")
        else:
            fails = pd.read_csv(table, dtype=str, keep_default_na=False)
            res.message = " | ".join(
                f"{r.get('subject', '')}: {r.get('error', '')}" for r in fails.to_dict("records")
            )
            if list(fails.get("subject", [])) != [BAD_SUBJECT]:
                problems.append(
                    f"failures table lists {list(fails.get('subject', []))}, expected [{BAD_SUBJECT}]"
                )
            elif not any(n in res.message for n in _names(case.culprit)) and case.kind not in ROW_LEVEL - {
                "manifest_points_to_missing_file",
                "manifest_folder_as_image",
            }:
                problems.append(f"failure does not name {case.culprit.name}")
        missing = [p for p in cmd.outputs(out) if not p.exists()]
        if missing:
            problems.append(f"good rows not written: {missing[0]}")
    elif rc == 0:
        res.got = "ok"
        missing = [p for p in cmd.outputs(out) if not p.exists()]
        if missing:
            problems.append(f"output missing: {missing[0]}")
    else:
        res.got = f"exit {rc}"
        res.message = (stderr.strip().splitlines() or [""])[-1][:300]
    if res.got != want:
        problems.insert(0, f"expected {want}, got {res.got}: {res.message[:300] or stderr[-300:]}")
    return res


def run_case(cmd: Command, case: Case, env: Env, *, subprocess_: bool = False) -> Outcome:
    want = expected(cmd, case)
    if want in ("n/a", "missing"):
        return Outcome(cmd.name, case.kind, want, want)
    out = env.root / "runs" / f"{cmd.name.replace(' ', '-')}--{case.kind}{'--sub' if subprocess_ else ''}"
    data = data_for(cmd, case, env, out)
    argv = cmd.argv(data, env, out)
    rc, stdout, stderr = (run_subprocess if subprocess_ else run_inprocess)(argv)
    return judge(cmd, case, env, out, rc, stdout, stderr, want)


BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"
_CELL = {
    "refused": "exit 2",
    "batch": "exit 1 + failures",
    "ok": "ok",
    "n/a": "·",
    "missing": "not landed",
    "not run": "not run",
}


def table_markdown(outcomes: list[Outcome], cases: dict[str, Case]) -> str:
    """Kinds × commands; a cell is the expected outcome when it was met, else FAIL with what happened."""
    commands = list(dict.fromkeys(o.command for o in outcomes))
    cell = {(o.kind, o.command): o for o in outcomes}
    lines = [
        "| kind | role | input | " + " | ".join(f"`{c}`" for c in commands) + " |",
        "|---|---|---|" + "---|" * len(commands),
    ]
    for kind, case in cases.items():
        row = [f"`{kind}`", case.role, "bad" if case.bad else "valid"]
        for c in commands:
            o = cell[(kind, c)]
            row.append(_CELL[o.expected] if o.passed else f"**FAIL** ({o.got})")
        lines.append("| " + " | ".join(row) + " |")
    checked = [o for o in outcomes if o.expected not in ("n/a", "missing", "not run")]
    summary = (
        f"\n{len(cases)} kinds ({sum(c.bad for c in cases.values())} bad, "
        f"{sum(not c.bad for c in cases.values())} awkward-but-valid) × {len(commands)} commands: "
        f"{len(checked)} runs checked, {sum(o.passed for o in checked)} as expected, "
        f"{sum(not o.passed for o in checked)} failed; "
        f"{sum(o.expected == 'missing' for o in outcomes) // max(len(cases), 1)} command(s) not landed; "
        f"{sum(o.expected == 'not run' for o in outcomes)} cells not run (time-limited run).\n"
    )
    return "\n".join(lines) + "\n" + summary


def write_table(path: Path, outcomes: list[Outcome], cases: dict[str, Case]) -> None:
    """Replace the generated block of ``path`` (between the markers) with the current table."""
    from neuromoe.io.atomic import atomic_write_text

    block = f"{BEGIN}\n{table_markdown(outcomes, cases)}{END}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    atomic_write_text(path, text)
