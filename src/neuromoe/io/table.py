"""Subject tables from a manifest (CSV/TSV) or a BIDS folder, and their validation."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuromoe.errors import InputError

ROLES = ("t1", "t1c", "t2", "flair", "dwi", "bold", "mask", "timeseries")
_ENTITY = re.compile(r"(sub|ses|task|run|ce)-([A-Za-z0-9]+)")


def bids_entities(name: str) -> dict[str, str]:
    """The sub/ses/task/run/ce entities of a BIDS file name: ``sub-01_ses-2_T1w.nii.gz`` → {sub: 01, ses: 2}."""
    return dict(_ENTITY.findall(name))


def file_stem(path: str | Path) -> str:
    """The file name without its extension, ``.nii.gz`` counted as one: ``run.v1.nii.gz`` → ``run.v1``
    (``split(".")[0]`` gave ``sub-01_off0.001.nii.gz`` and ``sub-01_off0.nii.gz`` one subject id)."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def scan_ids(table: pd.DataFrame) -> pd.DataFrame:
    """subject + whichever of session/state/run the table has: what tells one scan's row from another's (an
    evaluation table with ``sub-01`` twice, at 64 and 66 years, named neither visit)."""
    ids = pd.DataFrame({"subject": table["subject"].astype(str).to_numpy()})
    for col in ("session", "state", "run"):
        if col in table.columns:
            ids[col] = table[col].to_numpy()
    return ids


def file_ids(files: Sequence[Path]) -> pd.DataFrame:
    """Row ids of loose files, as a BIDS folder would give the same scans: ``subject`` (sub-01), ``session``
    (ses-2), ``state`` (the task) and ``run`` (bare, like the BIDS reader) from BIDS names; names that are
    not BIDS, or BIDS names that would collide, keep the file stem as the subject."""
    ids = []
    for f in files:
        ent = bids_entities(f.name)
        if "sub" not in ent:
            ids.append({"subject": file_stem(f)})
            continue
        row = {"subject": f"sub-{ent['sub']}"}
        row.update({col: pre + ent[key] for key, col, pre in (("ses", "session", "ses-"), ("task", "state", ""),
                                                               ("run", "run", "")) if key in ent})
        ids.append(row)
    if len({tuple(sorted(i.items())) for i in ids}) < len(ids):
        ids = [{"subject": file_stem(f)} for f in files]
    return pd.DataFrame(ids)


def _bids_role(name: str) -> str | None:
    stem = name.split(".")[0]
    if name.endswith(("_timeseries.npy", "_timeseries.tsv")):
        return None if "_desc-confounds" in name else "timeseries"  # fMRIPrep confounds are not ROI series
    if not name.endswith((".nii", ".nii.gz")):
        return None
    suffix = stem.rsplit("_", 1)[-1]
    if suffix == "mask" and "desc-brain" in stem:  # a skull-stripping mask is not a lesion label
        return None
    if suffix == "T1w":
        return "t1c" if "_ce-" in stem else "t1"
    return {"T2w": "t2", "FLAIR": "flair", "dwi": "dwi", "DWI": "dwi", "bold": "bold", "mask": "mask"}.get(suffix)


def _derived_masks(root: Path) -> set[Path]:
    """Lesion masks among the derivatives: ``derivatives/<pipeline>/sub-*/[ses-*/]anat/*lesion*_mask.nii.gz``
    (BIDS) and ``derivatives/sub-*/[ses-*/]*_msk.nii.gz`` (the ISLES 2022 release). Other derivatives (brain
    masks, preprocessed images) are not inputs."""
    piped = {f for f in root.glob("derivatives/*/sub-*/**/*")
             if "lesion" in f.name.lower() and _bids_role(f.name) == "mask"}
    return piped | {f for f in root.glob("derivatives/sub-*/**/*") if f.name.endswith(("_msk.nii", "_msk.nii.gz"))}


def _load_bids(root: Path) -> pd.DataFrame:
    rows: dict[tuple[str, str, str, str], dict[str, str]] = {}
    masks = _derived_masks(root)
    for f in [*sorted(root.glob("sub-*/**/*")), *sorted(masks)]:
        role = "mask" if f in masks else _bids_role(f.name)
        if role is None or (f not in masks and f.parent.name not in ("anat", "func", "dwi")):
            continue
        ent = bids_entities(f.name)
        folder_ses = [part[4:] for part in f.relative_to(root).parts[:-1] if part.startswith("ses-")]
        if "ses" not in ent and folder_ses:  # a session folder names the session a file name left out
            ent["ses"] = folder_ses[-1]
        key = (f"sub-{ent.get('sub', '')}", f"ses-{ent['ses']}" if "ses" in ent else "", ent.get("task", ""),
               ent.get("run", ""))
        row = rows.setdefault(key, {})
        if role in row:  # e.g. two acq-/rec- variants or a .nii beside a .nii.gz: which one is meant is unknowable
            raise InputError(f"two {role} images for {'_'.join(f'{e}-{ent[e]}' for e in ('sub', 'ses', 'task', 'run') if e in ent)}: {Path(row[role]).name} and "
                             f"{f.name}", path=root,
                             fix="keep one per subject/session/task/run, or list the scans to use in a manifest CSV")
        row[role] = os.path.abspath(f)  # not resolve(): a DataLad/git-annex link names its annex object
    if not rows:
        raise InputError("no BIDS images found (sub-*/[ses-*/]anat|func)", path=root,
                         fix="point --data at a BIDS root or a manifest CSV")
    _merge_runless(rows, root)
    _drop_unpaired_masks(rows, root)
    df = pd.DataFrame([{"subject": s, "session": ses, "state": task, "run": run, **r}
                       for (s, ses, task, run), r in rows.items()])
    for col in ("session", "state", "run"):
        if not df[col].astype(bool).any():
            df = df.drop(columns=col)
    part = root / "participants.tsv"
    if part.exists():
        labels = read_delimited(part, "\t", "participants.tsv")
        if "participant_id" in labels.columns and "subject" in labels.columns:  # which one names the subject?
            raise InputError("participants.tsv has both participant_id and subject columns", path=part,
                             fix="rename the subject column (participant_id names the subject in BIDS)")
        if "session" in labels.columns:
            raise InputError("participants.tsv has a 'session' column", path=part,
                             fix="per-session values belong in sub-<label>/sub-<label>_sessions.tsv")
        labels = labels.rename(columns={"participant_id": "subject"})
        if "subject" not in labels.columns:
            raise InputError("participants.tsv has no participant_id column", path=part,
                             fix="a tab-separated file whose first column is participant_id (BIDS)")
        labels["subject"] = _entity_ids(labels["subject"], "sub-")  # "01" for sub-01 would match no image
        if labels["subject"].duplicated().any():
            dup = labels["subject"][labels["subject"].duplicated()].iloc[0]
            raise InputError(f"participants.tsv lists {dup} twice", path=part, fix="keep one row per participant")
        if len(labels) and not df["subject"].isin(labels["subject"]).any():  # every label would be lost silently
            print(f"neuromoe: warning: {part} names none of the image subjects (it has "
                  f"{', '.join(labels['subject'].head(3))}; the images {', '.join(df['subject'].head(3))}): no "
                  "labels are read; write participant_id as the folder names (sub-<label>)", file=sys.stderr)
        df = df.merge(labels, on="subject", how="left")
    merged = False
    if "session" in df.columns:
        df, merged = _merge_sessions(df, root)
    df.attrs["labels_missing"] = not part.exists() and not merged
    return df


def _drop_unpaired_masks(rows: dict[tuple[str, str, str, str], dict[str, str]], root: Path) -> None:
    """A lesion mask whose sub/ses/run entities name no image (``sub-01_desc-lesion_mask`` for images of
    ``ses-2``) made a row without images, which every command then left out without a word."""
    lone = [key for key, row in rows.items() if set(row) == {"mask"}]
    if not lone:
        return
    print(f"neuromoe: warning: {len(lone)} lesion mask(s) under {root} match no image by their sub/ses/run "
          f"entities (e.g. {os.path.relpath(rows[lone[0]]['mask'], root)}) and are not used; name each mask "
          "with its image's entities", file=sys.stderr)
    for key in lone:
        del rows[key]


def _merge_sessions(df: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, bool]:
    """Per-session values from ``sub-<label>/sub-<label>_sessions.tsv`` (BIDS): a longitudinal subject's age at
    each visit (ADNI, OASIS) replaces the one participants.tsv gives for the whole subject. Returns the table
    and whether a sessions file gave labels (more than ``acq_time``). An image session the file has no row for keeps the subject's
    values, and is said: with ``ses-1`` written for the folder ``ses-01`` every visit got the baseline age."""
    tables, unlisted = [], []
    for sub in df["subject"].unique():
        path = root / sub / f"{sub}_sessions.tsv"
        if not path.is_file():
            continue
        t = read_delimited(path, "\t", path.name)
        if "session_id" not in t.columns:
            raise InputError(f"{path.name} has no session_id column", path=path,
                             fix="a tab-separated file whose first column is session_id (BIDS)")
        ids = _entity_ids(t["session_id"], "ses-")
        if ids.duplicated().any():
            raise InputError(f"{path.name} lists {ids[ids.duplicated()].iloc[0]} twice", path=path,
                             fix="keep one row per session")
        have = set(df.loc[df["subject"] == sub, "session"].astype(str)) - {""}
        unlisted += [(path, sorted(have - set(ids)), sorted(set(ids) - have))] if have - set(ids) else []
        tables.append(t.drop(columns="session_id").assign(subject=sub, session=ids))
    if unlisted:
        path, missing, other = unlisted[0]
        print(f"neuromoe: warning: {len(unlisted)} sessions.tsv file(s) have no row for some image sessions, "
              f"which keep participants.tsv's values (e.g. {path} lists {', '.join(other) or 'none of them'}, "
              f"not {', '.join(missing)}); write session_id as the folder names (ses-<label>)", file=sys.stderr)
    if not tables:
        return df, False
    per = pd.concat(tables, ignore_index=True).replace({t: "" for t in MISSING_TOKENS})
    labelled = bool(set(per.columns) - {"subject", "session", "acq_time"})  # acq_time alone is no label
    out = df.merge(per, on=["subject", "session"], how="left", suffixes=("", "__session"))
    for col in [c for c in per.columns if c not in ("subject", "session")]:
        if f"{col}__session" in out.columns:  # a session's own value wins where it has one
            given = out[f"{col}__session"].fillna("").astype(str) != ""
            out.loc[given, col] = out.loc[given, f"{col}__session"]
            out = out.drop(columns=f"{col}__session")
    return out, labelled


def _merge_runless(rows: dict[tuple[str, str, str, str], dict[str, str]], root: Path) -> None:
    """Anatomical images of one session where some carry a ``run-`` entity and others none (``run-1_T1w`` beside
    ``FLAIR`` and a derivative lesion mask) belong together when the session has a single run; with several
    runs which one the run-less images go with is unknowable. (fMRI rows keep their runs apart.)"""
    runs: dict[tuple[str, str], list[str]] = {}
    for sub, ses, task, run in rows:
        if not task:
            runs.setdefault((sub, ses), []).append(run)
    for (sub, ses), found in runs.items():
        named = sorted(r for r in found if r)
        if "" not in found or not named:
            continue
        where = f"{sub}{'_' + ses if ses else ''}"
        if len(named) > 1:
            raise InputError(f"{where} has images of run-{', run-'.join(named)} and images without a run entity",
                             path=root, fix="name the run of every image of that session, or list the scans "
                                            "to use in a manifest CSV")
        loose, target = rows.pop((sub, ses, "", "")), rows[(sub, ses, "", named[0])]
        for role, path in loose.items():
            if role in target:
                raise InputError(f"two {role} images for {where}: {Path(target[role]).name} and {Path(path).name}",
                                 path=root, fix="keep one per subject/session/run, or list the scans to use in "
                                                "a manifest CSV")
            target[role] = path


# How missing label values are written: BIDS uses n/a, R and pandas exports NA / NaN.
MISSING_TOKENS = ("n/a", "N/A", "NA", "NaN", "nan")


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Label columns: missing-value tokens become empty, all-numeric columns numbers."""
    for col in df.columns:
        if col in ROLES or col in ("subject", "session", "state", "run"):
            continue
        df[col] = df[col].replace(list(MISSING_TOKENS), np.nan)
        num = pd.to_numeric(df[col], errors="coerce")
        if num.notna().sum() == df[col].notna().sum():
            df[col] = num
    return df


def _entity_ids(ids: pd.Series, prefix: str) -> pd.Series:
    """BIDS ids as the folders name them: stripped, with their ``sub-`` / ``ses-`` prefix."""
    ids = ids.str.strip()
    return ids.where(ids.str.startswith(prefix), prefix + ids)


def read_delimited(path: Path, sep: str, what: str) -> pd.DataFrame:
    """A manifest or participants.tsv as strings, or one clear error. ``index_col=False``: a trailing delimiter
    on the first data row (a spreadsheet export artefact) made pandas take the first column as the index and
    shift every other column left by one (T2 paths under t1, labels lost)."""
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, index_col=False)
    except Exception as exc:
        raise InputError(f"cannot parse {what} ({type(exc).__name__})", path=path,
                         fix=f"save it as plain UTF-8 {'TSV' if sep == chr(9) else 'CSV'} with a header row") from None
    df.columns = [str(c).strip() for c in df.columns]  # "subject, t1" names a t1 column
    return df


def load_table(source: str | Path, *, roles: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per subject(+session/state): role columns hold absolute paths, empty cell = missing."""
    source = Path(source)
    if source.is_dir():
        df = _load_bids(source)
    elif source.suffix.lower() in (".csv", ".tsv") and source.exists():
        sep = "\t" if source.suffix.lower() == ".tsv" else ","
        df = read_delimited(source, sep, "manifest")
        if "subject" not in df.columns:
            other = next((d for d in (";", "\t", ",") if d != sep and d in str(df.columns[0])), None)
            if other is not None:  # a spreadsheet's ';' export, or a TSV saved as .csv: one column of everything
                name = {";": "';'", "\t": "tabs", ",": "commas"}[other]
                raise InputError(f"manifest is separated by {name}, not {'tabs' if sep == chr(9) else 'commas'}",
                                 path=source, fix="save it comma-separated as .csv, or tab-separated as .tsv")
            raise InputError("manifest has no 'subject' column", path=source, fix="add a subject column")
        df["subject"] = df["subject"].str.strip()  # "sub-01 " and "sub-01" are one subject
        for col in (c for c in df.columns if c in ROLES):
            bad = [p for p in df[col] if "\x00" in p]
            if bad:
                raise InputError(f"column '{col}' holds a path with a NUL byte ({bad[0]!r})", path=source,
                                 fix="re-export the manifest as plain text")
            # BIDS writes a missing value as n/a (pandas NaN): in an image column it is no image, not a file
            # named "a"; a space after a path (a spreadsheet cell) is not part of the file name
            df[col] = [os.path.abspath(source.parent / p.strip()) if p.strip() not in ("", *MISSING_TOKENS)
                       else "" for p in df[col]]
    else:
        raise InputError("not a manifest (.csv/.tsv) or a BIDS folder", path=source,
                         fix="give a manifest CSV/TSV or a BIDS root folder")
    df = _coerce(df.replace("", np.nan))
    df.attrs.setdefault("labels_missing", False)
    df.attrs["source"] = str(source)
    _check_rows(df, source)
    if roles is not None:
        validate_table(df, roles=roles, check_grids=False)
    return df


def _check_rows(df: pd.DataFrame, source: Path) -> None:
    """Problems no command can work around: no rows, no image column, duplicated subjects, bad splits."""
    if df.empty:
        raise InputError("manifest has no subject rows", path=source, fix="add one row per subject")
    if not any(c in df.columns for c in ROLES):
        raise InputError(f"no image column (one of {', '.join(ROLES)})", path=source,
                         fix="add a column per image role holding file paths, e.g. t1")
    keys = [c for c in ("subject", "session", "state", "run") if c in df.columns]
    dup = df.duplicated(subset=keys, keep=False)
    if dup.any():
        raise InputError(f"duplicated subject {df.loc[dup, 'subject'].iloc[0]}", path=source,
                         fix="keep one row per subject (and session)")
    if "split" in df.columns:
        bad = sorted(set(df["split"].dropna().astype(str)) - {"train", "val", "test"})
        if bad:
            raise InputError(f"split column has values {bad}", path=source,
                             fix="use train, val or test (or leave the cell empty)")


def validate_table(df: pd.DataFrame, *, roles: Sequence[str] = ("t1",), labels: Sequence[str] = (),
                   check_grids: bool = True) -> None:
    """Raise one clear :class:`InputError` for the first problem: columns, duplicates, files, grids."""
    from neuromoe.io.nifti import inspect_nifti

    src = df.attrs.get("source")
    for col in (*roles, *labels):
        if col not in df.columns:
            missing_lab = col in labels and df.attrs.get("labels_missing")
            raise InputError(f"required column '{col}' is missing" + (" (no participants.tsv)" if missing_lab else ""),
                             path=src, fix=f"add a '{col}' column" + (" to participants.tsv" if missing_lab else ""))
    keys = [c for c in ("subject", "session", "state", "run") if c in df.columns]
    dup = df.duplicated(subset=keys, keep=False)
    if dup.any():
        raise InputError(f"duplicated subject {df.loc[dup, 'subject'].iloc[0]}", path=src,
                         fix="keep one row per subject (and session)")
    for _, row in df.iterrows():
        grids = {}
        for role in roles:
            p = row[role]
            if not isinstance(p, str) or not Path(p).exists():
                raise InputError(f"subject {row['subject']}: {role} file missing ({p})", path=src,
                                 fix="fix the path or remove the subject")
            if p.endswith((".nii", ".nii.gz")):
                info = inspect_nifti(p)
                grids[role] = (tuple(info["shape"][:3]), np.round(info["spacing"], 4).tolist())
        if check_grids and len({str(g) for g in grids.values()}) > 1:
            raise InputError(f"subject {row['subject']}: modalities on different grids {grids}", path=src,
                             fix="co-register/resample all modalities of a subject onto one grid")


def cohort_source(data: str | Path, kind: str) -> Path:
    """``data`` as given, or the ``manifests/<kind>.csv`` of a cohort folder made by ``neuromoe synth``."""
    data = Path(data)
    if data.is_dir() and (data / "manifests" / f"{kind}.csv").is_file():
        data = data / "manifests" / f"{kind}.csv"
    if not data.exists():
        raise InputError("data not found", path=data, fix="pass a cohort folder, a manifest CSV/TSV or a BIDS folder")
    return data


def load_role_table(data: str | Path, kind: str, role: str, what: str) -> tuple[pd.DataFrame, str]:
    """The subjects of a cohort/manifest/BIDS source that have a ``role`` file (e.g. T1 images, lesion masks)."""
    source = cohort_source(data, kind)
    table = load_table(source)
    if role not in table.columns or table[role].isna().all():
        raise InputError(f"no {what} (no '{role}' column)", path=source, fix=f"point --data at a {kind} manifest")
    table = table[table[role].notna() & (table[role].astype(str).str.len() > 0)].reset_index(drop=True)
    if table.empty:
        raise InputError(f"no subjects with {what}", path=source)
    return table, str(source)


def failures_path(output: str | Path) -> Path:
    """Where a batch command writing ``output`` lists its failed subjects: ``<output stem>_failures.csv``
    (only the extension is dropped: ``run.v1.npy`` → ``run.v1_failures.csv``)."""
    out = Path(output)
    return out.with_name(f"{file_stem(out)}_failures.csv")


def write_failures(path: str | Path, rows: Sequence[dict[str, str]]) -> None:
    """The failures table of a batch command (one row per skipped subject, e.g. subject, file, error),
    written atomically; when no subject failed there is none, not even an earlier run's."""
    from neuromoe.io.atomic import atomic_path

    if not rows:
        Path(path).unlink(missing_ok=True)
        return
    with atomic_path(path) as tmp:
        pd.DataFrame(list(rows)).to_csv(tmp, index=False)


def content_sample(path: Path, size: int, block: int = 4096, n_mid: int = 8, *, sampled: bool = False) -> bytes:
    """Digest that changes with the voxels even when size and mtime do not (``cp -p``/``rsync -a`` of another
    version, coarse-mtime filesystems). A .gz: header, 8 evenly spaced blocks and the tail, which is the gzip
    trailer (CRC-32 of the whole content). Anything else (.nii) has no such checksum: the whole file is
    hashed (tens of ms for a 1 mm T1, far less than preprocessing it), unless ``sampled`` (telling scans
    apart, not catching an edit: the same blocks as a .gz)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if not sampled and not path.name.endswith(".gz"):
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            return h.digest()
        for offset in (0, *(size * k // (n_mid + 1) for k in range(1, n_mid + 1)), max(0, size - block)):
            fh.seek(offset)
            h.update(fh.read(block))
    return h.digest()


def _fingerprints(path: Any, content: bool) -> set[str]:
    """One scan's fingerprints: its real path (symlinks resolved) and, with ``content``, its size and content
    sample, so neither a symlinked folder nor a copy of the cohort passes for new scans."""
    import hashlib

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return set()
    real = os.path.realpath(str(path))
    # the absolute path too: models saved before 2026-12-06 stored only its hash, which must still match
    prints = {hashlib.sha1(p.encode()).hexdigest()[:16] for p in (real, os.path.abspath(str(path)))}
    if content:
        try:
            size = os.stat(real).st_size
            sample = content_sample(Path(real), size, sampled=True)
            digest = hashlib.sha1(f"{size}|".encode() + sample).hexdigest()
        except OSError:
            return prints  # a missing file is reported by the loader
        prints.add("c" + digest[:15])
    return prints


def scan_fingerprints(paths: Sequence[Any] | pd.Series, *, content: bool = True) -> set[str]:
    """Short hashes of scans: a model stores those it was fitted on, so an evaluation of another split
    (another seed, a manifest without its split column, rows in another order, the cohort copied or reached
    through a symlink) can refuse to score them as held-out, without the model carrying the cohort's file
    names. ``content=False`` for files that distinct cases may share byte for byte (empty lesion masks)."""
    return {f for p in paths for f in _fingerprints(p, content)}


def case_fingerprints(rows: pd.DataFrame, columns: Sequence[str], *, path_only: Sequence[str] = ()) -> list[set[str]]:
    """Per row, the :func:`scan_fingerprints` of its files in ``columns`` (those in ``path_only`` by path)."""
    cols = [c for c in columns if c in rows.columns]
    return [
        {f for c in cols for f in _fingerprints(row[c], c not in path_only)}
        for row in rows[cols].to_dict("records")
    ]


def refuse_fitted(fit_fingerprints: Sequence[str], cases: Sequence[set[str]], source: str, what: str,
                  how: str, *, split: str = "test", names: Sequence[str] = ()) -> None:
    """Refuse a 'test' (or ``split="all"``: a whole external cohort) evaluation whose cases (each given by its
    :func:`scan_fingerprints`, named by ``names``) the model was fitted on (``fit_fingerprints``, stored at
    training)."""
    fit = set(fit_fingerprints)
    hits = [i for i, prints in enumerate(cases) if fit & prints]
    if not hits:
        return
    if split == "all":
        shown = ", ".join(str(names[i]) for i in hits[:5]) + (" …" if len(hits) > 5 else "") if names else ""
        raise InputError(f"{len(hits)} of the {len(cases)} {what} of this external table were used to {how} this "
                         f"model" + (f" ({shown})" if shown else ""), path=source,
                         fix=f"remove those rows: an external evaluation must hold only {what} the model never saw")
    raise InputError(f"{len(hits)} of the {len(cases)} 'test' {what} were used to {how} this model", path=source,
                     fix="evaluate on the table the model was trained with (same 'split' column) or on new "
                     f"{what}; --split train/val scores the fitted {what} on purpose")
