"""Train/val/test splits: one rule for the synthetic generator and for every family's tables without a
``split`` column, so a cohort split by the pipelines has the val and test cases the generator would give it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from neuromoe.errors import InputError

__all__ = ["assign_splits", "stratified_split"]


def stratified_split(strata: list[str], seed: int, fractions=(0.7, 0.15, 0.15)) -> list[str]:
    """Deterministic train/val/test per stratum so every label is present in every split when possible.

    Strata under 3 subjects stay in train; a stratum of 3 or more gives at least one subject to val and to
    test (``round(0.15 · 3)`` is 0, which kept a 3-subject diagnosis class out of both). If that leaves val
    or test empty (a small cohort of many small strata), it gets ``max(1, round(fraction * n))`` subjects
    from the strata with the most train rows left, so every cohort of 3 or more has all three splits (big
    cohorts are unchanged).
    """
    rng = np.random.default_rng([seed, 99])
    out = [""] * len(strata)
    order: dict[str, list[int]] = {}
    for s in sorted(set(strata)):
        idx = [i for i, v in enumerate(strata) if v == s]
        rng.shuffle(idx)
        order[s] = idx
        n = len(idx)
        n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
        n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
        for j, i in enumerate(idx):
            out[i] = "val" if j < n_val else "test" if j < n_val + n_test else "train"
    if len(strata) >= 3:
        for name, frac in (("val", fractions[1]), ("test", fractions[2])):
            if name in out:
                continue
            for _ in range(max(1, round(frac * len(strata)))):
                left = {s: [i for i in idx if out[i] == "train"] for s, idx in order.items()}
                s = max(sorted(left), key=lambda k: len(left[k]))  # ties: the first stratum by name
                if sum(map(len, left.values())) <= 1:
                    break  # keep at least one training subject
                out[left[s][-1]] = name
    return out


def assign_splits(table: pd.DataFrame, seed: int = 0, stratify: Sequence[str] = ("cohort",)) -> pd.Series:
    """The table's ``split`` column when present, else :func:`stratified_split` over its subjects.

    Subjects, not rows, are split: the sessions of a longitudinal subject (ADNI, PPMI) all land in one split,
    else a model would be tested on a subject it was trained on. Until 2026-12-06 this drew
    ``round(0.15 · n)`` per stratum, so a cohort of small strata (12 lesion cases over 5 types) had no
    validation or test case at all."""
    subjects = table["subject"].astype(str).to_numpy() if "subject" in table.columns else np.arange(len(table))
    if "split" in table.columns and table["split"].notna().any():
        bad = sorted(set(table["split"].dropna()) - {"train", "val", "test"})
        if bad:
            raise InputError(f"split column has values {bad}", fix="use train, val or test")
        if table["split"].isna().any():  # never silently replace the user's test set by a random split
            raise InputError(f"split column is blank for {int(table['split'].isna().sum())} subjects",
                             fix="fill in train, val or test for every row, or drop the column")
        per_subject = pd.Series(table["split"].to_numpy()).groupby(subjects).nunique()
        if (per_subject > 1).any():
            raise InputError(f"subject {per_subject.index[per_subject > 1][0]} has sessions in more than one split",
                             fix="give every session of a subject the same split")
        return table["split"].astype(str)
    _, first, unit = np.unique(subjects, return_index=True, return_inverse=True)  # a subject's first row
    lead = np.zeros(len(table), dtype=bool)
    lead[first] = True
    heads = table[lead]
    keys = [c for c in stratify if c in table.columns]
    strata = ["|".join(map(str, r)) for r in heads[keys].itertuples(index=False)] if keys else ["all"] * len(heads)
    split_of_head = np.asarray(stratified_split(strata, seed), dtype=object)
    # heads are in row order, np.unique's subjects in sorted order: map each row's subject to its head's split
    head_pos = np.empty(len(first), dtype=int)
    head_pos[np.argsort(first)] = np.arange(len(first))
    return pd.Series(split_of_head[head_pos[unit]], index=table.index, name="split")
