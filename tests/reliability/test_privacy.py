"""Privacy (issue 7, item 6): outputs never carry identifying NIfTI header fields of the inputs, and
reports/logs name subjects, not absolute input paths (the preprocessing cache is an internal index that
keys entries by input path, and prediction tables keep the input file column so results can be joined
back; neither is a report).

Every cohort image carries planted marker strings in ``descrip``, ``aux_file``, ``db_name`` and
``intent_name`` (:data:`reliability_corpus.PRIVATE`); every byte of every output (gzip members
decompressed) is searched for them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest
from reliability_corpus import PRIVATE
from reliability_harness import Env, _brainmoe, _family, run_inprocess

REPORT_SUFFIXES = (".json", ".yaml", ".html")


def _bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def _leaks(root: Path) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = _bytes(path)
        found += [f"{path.relative_to(root)}: {key}" for key, marker in PRIVATE.items() if marker in data]
    return found


def _run(env: Env, argv: list[str]) -> str:
    rc, out, err = run_inprocess(argv)
    assert rc == 0, err[-500:]
    return out + err


def _manifest(env: Env) -> Path:
    path = env.root / "privacy.csv"
    pd.DataFrame(env.cohort).to_csv(path, index=False)
    return path


def _check(env: Env, outputs: list[Path], logs: str, cohort_dir: str | None = None) -> None:
    leaks = [leak for out in outputs for leak in _leaks(out)]
    assert not leaks, leaks
    cohort_dir = cohort_dir or str(Path(str(env.cohort[0]["t1"])).parent.parent)
    for out in outputs:
        reports = (p for p in out.rglob("*") if p.suffix in REPORT_SUFFIXES or p.name == "metrics.csv")
        for path in (p for p in reports if "cache" not in p.relative_to(out).parts):  # cache: internal index
            assert cohort_dir not in path.read_text(errors="replace"), f"{path} shows an absolute input path"
    assert cohort_dir not in logs, "logs show absolute input paths"


def test_denseformer_outputs_are_clean(env: Env) -> None:
    data = _manifest(env)
    out = env.root / "privacy"
    logs = _run(
        env,
        [
            "preprocess",
            "--data",
            str(data),
            "--out",
            str(out / "cache"),
            "--no-progress",
            "--shape",
            "32",
            "32",
            "32",
        ],
    )
    logs += _run(env, _family("evaluate", "denseformer")(data, env, out / "evaluate"))
    logs += _run(env, _family("predict", "denseformer")(data, env, out / "predict"))
    _check(env, [out, env.model("denseformer").parent], logs)


@pytest.mark.slow
def test_mome_outputs_are_clean(env: Env) -> None:
    data = _manifest(env)
    out = env.root / "privacy_mome"
    logs = _run(env, _family("segment", "mome")(data, env, out / "segment"))
    logs += _run(env, _family("evaluate", "mome")(data, env, out / "evaluate"))
    assert list((out / "segment").glob("*_mask.nii.gz"))
    _check(env, [out, env.model("mome").parent], logs)


def test_brainmoe_outputs_are_clean(env: Env) -> None:
    """fMRI series carry no header; what is checked is that reports, tables and logs show no input paths."""
    data = env.fmri_manifest()
    out = env.root / "privacy_brainmoe"
    logs = _run(env, _brainmoe("evaluate")(data, env, out / "evaluate"))
    logs += _run(env, _brainmoe("predict")(data, env, out / "predict"))
    logs += _run(env, _brainmoe("embed")(data, env, out / "embed"))
    cohort_dir = str(Path(str(env.fmri[0]["timeseries"])).parent.parent)
    for table in (out / "predict" / "predictions.csv", out / "embed" / "embeddings.csv"):
        assert cohort_dir not in table.read_text(), f"{table} shows an absolute input path"
    _check(env, [out, env.experts(), env.model("brainmoe").parent], logs, cohort_dir)
