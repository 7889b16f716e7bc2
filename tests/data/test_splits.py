"""One split rule for the generator and the pipelines (``neuromoe.data.splits``)."""

from __future__ import annotations

import pandas as pd

from neuromoe.data.splits import assign_splits


def test_a_small_cohort_without_a_split_column_gets_val_and_test() -> None:
    """12 lesion cases over 5 types (3/3/2/2/2) were all 'train' (round(0.15 · 3) = 0): no threshold tuning,
    no test set. A stratum of 3 now gives one subject to each split, as the generator does."""
    types = ["stroke"] * 3 + ["tumour"] * 3 + ["ms"] * 2 + ["wmh"] * 2 + ["ich"] * 2
    table = pd.DataFrame({"subject": [f"s{i}" for i in range(12)], "lesion_type": types})
    for seed in range(5):
        split = assign_splits(table, seed=seed, stratify=("lesion_type",))
        assert sorted(split[:3]) == sorted(split[3:6]) == ["test", "train", "val"]
        assert split.tolist() == assign_splits(table, seed=seed, stratify=("lesion_type",)).tolist()
    # strata all under 3: the cohort still gets a val and a test subject
    pairs = pd.DataFrame({"subject": [f"s{i}" for i in range(8)], "cohort": [f"c{i // 2}" for i in range(8)]})
    assert set(assign_splits(pairs, seed=0)) == {"train", "val", "test"}


def test_strata_of_several_columns_and_missing_values() -> None:
    table = pd.DataFrame({"subject": [f"s{i}" for i in range(40)], "cohort": ["a", "b"] * 20,
                          "site": [None, "x", "y", "x"] * 10})
    split = assign_splits(table, seed=0, stratify=("cohort", "site"))
    strata = table["cohort"] + "|" + table["site"].map(str)
    for _, s in split.groupby(strata):  # every stratum (the missing site one too) is split on its own
        assert set(s) == {"train", "val", "test"}
