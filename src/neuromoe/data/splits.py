"""Train/val/test splits: one rule for the synthetic generator and for every family's tables without a
``split`` column, so a cohort split by the pipelines has the val and test cases the generator would give it.

The rule, per stratum of ``n`` subjects: ``round(fraction · n)`` to val and to test, at least one of each
when ``n ≥ 3`` (``round(0.15 · 3)`` is 0, which kept a 3-subject class out of both); a cohort of 3 or more
whose strata are all smaller still gets a val and a test subject (:func:`_top_up`). The generator and the
pipelines shuffle with their own seeded streams, as before the rule was shared, so a split drawn before
2026-12-06 is drawn again identically unless a stratum had exactly 3 subjects or a split came out empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from neuromoe.errors import InputError

__all__ = ["assign_splits", "stratified_split"]


def _counts(n: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    """Subjects of a stratum of ``n`` that go to val and to test."""
    n_val, n_test = round(val_frac * n), round(test_frac * n)
    return (max(1, n_val), max(1, n_test)) if n >= 3 else (n_val, n_test)


def _top_up(out: list[str], order: dict[str, list[int]], fractions: tuple[float, float]) -> None:
    """Give an empty val / test split ``max(1, round(fraction · n))`` subjects, taken from the strata with the
    most training subjects left (ties: the first stratum by name), keeping at least one training subject."""
    if len(out) < 3:
        return
    for name, frac in zip(("val", "test"), fractions, strict=True):
        if name in out:
            continue
        left = {s: [i for i in idx if out[i] == "train"] for s, idx in sorted(order.items())}
        for _ in range(max(1, round(frac * len(out)))):
            if sum(map(len, left.values())) <= 1:
                break
            s = max(left, key=lambda k: len(left[k]))
            out[left[s].pop()] = name


def stratified_split(strata: list[str], seed: int, fractions=(0.7, 0.15, 0.15)) -> list[str]:
    """The generator's split of subjects with these strata (its own seeded stream; val drawn first)."""
    rng = np.random.default_rng([seed, 99])
    out = [""] * len(strata)
    order: dict[str, list[int]] = {}
    for s in sorted(set(strata)):
        idx = [i for i, v in enumerate(strata) if v == s]
        rng.shuffle(idx)
        order[s] = idx
        n_val, n_test = _counts(len(idx), fractions[1], fractions[2])
        for j, i in enumerate(idx):
            out[i] = "val" if j < n_val else "test" if j < n_val + n_test else "train"
    _top_up(out, order, (fractions[1], fractions[2]))
    return out


def assign_splits(table: pd.DataFrame, seed: int = 0, val_frac: float = 0.15, test_frac: float = 0.15,
                  stratify: Sequence[str] = ("cohort",)) -> pd.Series:
    """The table's ``split`` column when present, else a deterministic stratified train/val/test split.

    Subjects, not rows, are split: the sessions of a longitudinal subject (ADNI, PPMI) all land in one split,
    else a model would be tested on a subject it was trained on. Until 2026-12-06 a stratum of 3 gave nothing
    to val or test, so 12 lesion cases over 5 types had no validation or test case at all."""
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
    rng = np.random.default_rng(seed)
    keys = [c for c in stratify if c in table.columns]
    groups = heads.groupby(keys, dropna=False).indices if keys else {"all": np.arange(len(heads))}
    out = ["train"] * len(heads)
    order: dict[str, list[int]] = {}
    for key, idx in groups.items():
        idx = rng.permutation(idx)
        order[str(key)] = list(idx)
        n_val, n_test = _counts(len(idx), val_frac, test_frac)
        for j, i in enumerate(idx):
            out[i] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    _top_up(out, order, (val_frac, test_frac))
    split_of_head = np.asarray(out, dtype=object)
    # heads are in row order, np.unique's subjects in sorted order: map each row's subject to its head's split
    head_pos = np.empty(len(first), dtype=int)
    head_pos[np.argsort(first)] = np.arange(len(first))
    return pd.Series(split_of_head[head_pos[unit]], index=table.index, name="split")
