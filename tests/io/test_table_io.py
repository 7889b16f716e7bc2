"""Subject tables from manifests and BIDS folders, and their validation messages."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neuromoe.errors import InputError
from neuromoe.io.table import (
    case_fingerprints,
    failures_path,
    file_ids,
    load_table,
    refuse_fitted,
    scan_fingerprints,
    validate_table,
    write_failures,
)


def _img(path, shape=(8, 8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    return path


def test_bids_roles_states_and_participants(tmp_path):
    _img(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    _img(tmp_path / "sub-01/anat/sub-01_ce-gd_T1w.nii.gz")
    _img(tmp_path / "sub-01/anat/sub-01_FLAIR.nii.gz")
    _img(tmp_path / "sub-02/anat/sub-02_T1w.nii.gz")
    df = load_table(tmp_path)
    assert set(df["subject"]) == {"sub-01", "sub-02"}
    row = df.set_index("subject").loc["sub-01"]
    assert row["t1c"].endswith("ce-gd_T1w.nii.gz") and row["flair"].endswith("FLAIR.nii.gz")
    with pytest.raises(InputError, match=r"participants\.tsv"):
        validate_table(df, roles=["t1"], labels=["age"])
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t41.5\n")
    df = load_table(tmp_path)
    validate_table(df, roles=["t1"], labels=["age"])
    assert df["age"].dtype.kind == "f"
    # BIDS writes a missing value as n/a: it is missing, not a label
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t30\tM\nsub-02\tn/a\tn/a\n")
    df = load_table(tmp_path).set_index("subject")
    assert df["age"].dtype.kind == "f" and np.isnan(df.loc["sub-02", "age"]) and pd.isna(df.loc["sub-02", "sex"])


def test_bids_two_images_of_one_role_are_refused_not_collapsed(tmp_path):
    """Two T1w variants of one session (acq-) used to keep whichever sorted last, without a word."""
    _img(tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_acq-mprage_T1w.nii.gz")
    _img(tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_acq-spgr_T1w.nii.gz")
    _img(tmp_path / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz")
    with pytest.raises(InputError, match=r"two t1 images for sub-01_ses-1: .*acq-mprage.* and .*acq-spgr"):
        load_table(tmp_path)
    (tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_acq-spgr_T1w.nii.gz").unlink()
    assert len(load_table(tmp_path)) == 2  # one T1 per session is fine


def test_bids_lesion_masks_from_derivatives_and_no_brain_masks(tmp_path):
    """docs/recipes.md promises lesion masks from derivatives/lesions/: they were never looked for, so a BIDS
    lesion dataset had no masks; skull-stripping masks (desc-brain) are not lesion labels."""
    _img(tmp_path / "sub-01/anat/sub-01_FLAIR.nii.gz")
    _img(tmp_path / "sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    _img(tmp_path / "derivatives/lesions/sub-01/anat/sub-01_desc-lesion_mask.nii.gz")
    _img(tmp_path / "derivatives/fmriprep/sub-01/anat/sub-01_desc-brain_mask.nii.gz")
    _img(tmp_path / "derivatives/fmriprep/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz")
    row = load_table(tmp_path).set_index("subject").loc["sub-01"]
    assert row["mask"].endswith("derivatives/lesions/sub-01/anat/sub-01_desc-lesion_mask.nii.gz")
    assert "t1" not in row.index or pd.isna(row["t1"])  # a derivative T1 is not a raw input


def test_bids_isles2022_layout_with_masks_beside_the_subject_folders_of_derivatives(tmp_path):
    """ISLES 2022 keeps its masks as derivatives/sub-*/ses-*/*_msk.nii.gz (no pipeline folder, no anat/)."""
    ses = tmp_path / "sub-strokecase0001/ses-0001"
    _img(ses / "anat/sub-strokecase0001_ses-0001_FLAIR.nii.gz")
    _img(ses / "dwi/sub-strokecase0001_ses-0001_dwi.nii.gz")
    _img(ses / "dwi/sub-strokecase0001_ses-0001_adc.nii.gz")  # not a role
    _img(tmp_path / "derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz")
    df = load_table(tmp_path)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["session"] == "ses-0001" and row["dwi"].endswith("_dwi.nii.gz") and row["flair"].endswith("FLAIR.nii.gz")
    assert row["mask"].endswith("derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz")


def test_manifest_relative_paths_duplicates_and_grids(tmp_path):
    _img(tmp_path / "a.nii.gz")
    _img(tmp_path / "b.nii.gz", shape=(9, 8, 8))
    (tmp_path / "m.csv").write_text("subject,t1,flair,age\ns1,a.nii.gz,a.nii.gz,3\ns2,a.nii.gz,,\n")
    df = load_table(tmp_path / "m.csv")
    assert df.loc[0, "t1"] == str((tmp_path / "a.nii.gz").resolve()) and df["flair"].isna()[1]
    validate_table(df, roles=["t1"])
    (tmp_path / "d.csv").write_text("subject,t1\ns1,a.nii.gz\ns1,a.nii.gz\n")
    with pytest.raises(InputError, match="duplicated subject s1"):
        validate_table(load_table(tmp_path / "d.csv"))
    (tmp_path / "g.csv").write_text("subject,t1,flair\ns1,a.nii.gz,b.nii.gz\n")
    with pytest.raises(InputError, match="different grids"):
        validate_table(load_table(tmp_path / "g.csv"), roles=["t1", "flair"])
    (tmp_path / "x.csv").write_text("subject,t1\ns1,nope.nii.gz\n")
    with pytest.raises(InputError, match="s1: t1 file missing"):
        validate_table(load_table(tmp_path / "x.csv"))
    with pytest.raises(InputError, match="required column 'dwi'"):
        validate_table(df, roles=["dwi"])


def test_failures_table_next_to_the_output_and_only_when_something_failed(tmp_path: Path) -> None:
    assert failures_path(tmp_path / "preds.csv") == tmp_path / "preds_failures.csv"
    assert failures_path(tmp_path / "emb.npy") == tmp_path / "emb_failures.csv"
    assert failures_path(tmp_path / "run.v1.npy") == tmp_path / "run.v1_failures.csv"  # was run_failures.csv
    assert failures_path(tmp_path / "mask.nii.gz") == tmp_path / "mask_failures.csv"
    write_failures(tmp_path / "none.csv", [])
    assert not (tmp_path / "none.csv").exists()
    # a clean rerun removes the failures table an earlier run left (it survived, listing fixed files)
    write_failures(tmp_path / "again.csv", [{"subject": "sub-2", "error": "x"}])
    write_failures(tmp_path / "again.csv", [])
    assert not (tmp_path / "again.csv").exists()
    write_failures(tmp_path / "f.csv", [{"subject": "sub-2", "file": "b.nii.gz", "error": "NaN voxels"}])
    assert pd.read_csv(tmp_path / "f.csv").to_dict("records") == [
        {"subject": "sub-2", "file": "b.nii.gz", "error": "NaN voxels"}
    ]


def test_bids_run_entity_on_some_images_of_a_session(tmp_path):
    """A run-1 T1w beside a run-less FLAIR and lesion mask made two rows, and lesion commands (rows with a
    mask) silently lost the T1; with one run they are one row, with several the question is asked."""
    _img(tmp_path / "sub-01/anat/sub-01_run-1_T1w.nii.gz")
    _img(tmp_path / "sub-01/anat/sub-01_FLAIR.nii.gz")
    _img(tmp_path / "derivatives/lesions/sub-01/anat/sub-01_desc-lesion_mask.nii.gz")
    _img(tmp_path / "sub-02/anat/sub-02_run-1_T1w.nii.gz")
    _img(tmp_path / "sub-02/anat/sub-02_run-2_T1w.nii.gz")
    df = load_table(tmp_path)
    row = df[df["subject"] == "sub-01"]
    assert len(row) == 1 and row[["t1", "flair", "mask"]].notna().all(axis=None)
    assert (df["subject"] == "sub-02").sum() == 2  # two runs of one role stay two rows
    _img(tmp_path / "sub-02/anat/sub-02_FLAIR.nii.gz")
    with pytest.raises(InputError, match=r"sub-02 has images of run-1, run-2 and images without a run"):
        load_table(tmp_path)


def test_participants_ids_without_the_sub_prefix_still_label_their_subjects(tmp_path):
    """participant_id "01" for sub-01 matched no image: every label silently became missing."""
    _img(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    _img(tmp_path / "sub-02/anat/sub-02_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\n01\t30\nsub-02\t41\n")
    assert load_table(tmp_path).set_index("subject")["age"].to_dict() == {"sub-01": 30, "sub-02": 41}


def test_loose_files_get_the_row_ids_a_bids_folder_gives_them(tmp_path):
    """The same scan given alone or in a flat folder had run 'run-1' (DenseFormer) or its whole file stem as
    the subject (BrainMoE) where the BIDS folder gives sub-01 / ses-1 / 1."""
    t1 = _img(tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz")
    bold = _img(tmp_path / "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold.nii.gz", (4, 4, 4, 3))
    bids = load_table(tmp_path).set_index("subject")
    loose = file_ids([t1, bold])
    assert loose.iloc[0][["subject", "session", "run"]].tolist() == ["sub-01", "ses-1", "1"]
    assert pd.isna(loose.iloc[0]["state"])
    assert loose.iloc[1][["subject", "session", "state", "run"]].tolist() == ["sub-01", "ses-1", "rest", "2"]
    assert sorted(bids["run"].astype(str)) == ["1", "2"] and set(bids["session"]) == {"ses-1"}
    assert file_ids([Path("scan7.nii.gz")]).to_dict("records") == [{"subject": "scan7"}]


def test_a_trailing_delimiter_does_not_shift_the_columns(tmp_path):
    """A spreadsheet export with one trailing comma on the first data row: pandas took the first column as the
    index, so the T2 paths landed under t1 and every label was lost."""
    t1, t2 = _img(tmp_path / "a_T1w.nii.gz"), _img(tmp_path / "a_T2w.nii.gz")
    man = tmp_path / "m.csv"
    man.write_text(f"subject, t1,t2,age\nsub-01,{t1.name},{t2.name},70,\n")
    row = load_table(man).iloc[0]
    assert row["subject"] == "sub-01" and row["t1"].endswith("a_T1w.nii.gz") and row["age"] == 70
    _img(tmp_path / "bids/sub-01/anat/sub-01_T1w.nii.gz")
    (tmp_path / "bids/participants.tsv").write_text("participant_id\tage\nsub-01\t30\t\n")
    assert load_table(tmp_path / "bids").iloc[0]["age"] == 30


@pytest.mark.parametrize("text", ["participant_id,age\nsub-01,30\n", "", "id\tage\nsub-01\t30\n",
                                  "participant_id\tage\nsub-01\t30\n01\t31\n"])
def test_a_malformed_participants_tsv_is_one_clear_error(tmp_path, text):
    _img(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text(text)
    with pytest.raises(InputError, match=r"participants\.tsv"):
        load_table(tmp_path)


def test_symlinked_scans_keep_their_own_names(tmp_path):
    """DataLad / git-annex: images are links to annex objects without a NIfTI name; resolving them made every
    such scan 'not a NIfTI file name' and named sidecars after the object."""
    obj = _img(tmp_path / "annex" / "SHA256E-s99--abc.nii.gz")
    link = tmp_path / "bids/sub-01/anat/sub-01_T1w.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(obj)
    assert load_table(tmp_path / "bids").iloc[0]["t1"] == str(link)
    (tmp_path / "m.csv").write_text("subject,t1\nsub-01,bids/sub-01/anat/sub-01_T1w.nii.gz\n")
    assert load_table(tmp_path / "m.csv").iloc[0]["t1"] == str(link)


def test_participants_naming_no_image_subject_is_reported(tmp_path, capsys):
    _img(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-1\t30\n")
    load_table(tmp_path)
    assert "names none of the image subjects" in capsys.readouterr().err


def test_sessions_tsv_gives_each_visit_its_own_age(tmp_path):
    """A longitudinal subject: participants.tsv has one age, sub-01_sessions.tsv the age at each visit (it was
    ignored: both sessions got the baseline age and the same brain-age gap)."""
    for ses in ("ses-01", "ses-02"):
        _img(tmp_path / f"sub-01/{ses}/anat/sub-01_{ses}_T1w.nii.gz")
    _img(tmp_path / "sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t76.1\tF\nsub-02\t60\tM\n")
    (tmp_path / "sub-01/sub-01_sessions.tsv").write_text("session_id\tage\nses-01\t76.1\n02\t80.5\n")
    df = load_table(tmp_path).set_index(["subject", "session"])
    assert df.loc[("sub-01", "ses-02"), "age"] == 80.5 and df.loc[("sub-01", "ses-01"), "age"] == 76.1
    assert df.loc[("sub-02", "ses-01"), "age"] == 60 and df.loc[("sub-01", "ses-02"), "sex"] == "F"


def test_n_a_in_an_image_column_is_no_image(tmp_path):
    t1 = _img(tmp_path / "a_T1w.nii.gz")
    (tmp_path / "m.csv").write_text(f"subject,t1,flair\nsub-01,{t1.name},n/a\n")
    row = load_table(tmp_path / "m.csv").iloc[0]
    assert row["t1"].endswith("a_T1w.nii.gz") and pd.isna(row["flair"])


def test_fingerprints_see_through_symlinks_and_copies_but_not_shared_empty_masks(tmp_path: Path) -> None:
    """The fitted-scan guard hashed absolute paths: the cohort reached through a symlinked folder, or copied,
    passed for new scans. Content counts now; a mask is compared by path only (lesion-free cases may share
    one byte for byte)."""
    import shutil

    rng = np.random.default_rng(0)
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(rng.normal(size=(6, 6, 6)).astype(np.float32), np.eye(4)), cohort / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.uint8), np.eye(4)), cohort / f"{name}_mask.nii")
    (tmp_path / "link").symlink_to(cohort, target_is_directory=True)
    shutil.copytree(cohort, tmp_path / "copy")
    fitted = scan_fingerprints([cohort / "a.nii.gz"])
    for other in (tmp_path / "link" / "a.nii.gz", tmp_path / "copy" / "a.nii.gz", str(cohort / "." / "a.nii.gz")):
        assert fitted & scan_fingerprints([other]), other
    assert not fitted & scan_fingerprints([cohort / "b.nii.gz"])
    assert not scan_fingerprints([cohort / "a_mask.nii"], content=False) & scan_fingerprints(
        [cohort / "b_mask.nii"], content=False
    )
    rows = pd.DataFrame({"t1": [str(tmp_path / "copy" / "a.nii.gz"), str(cohort / "b.nii.gz")],
                         "mask": [str(cohort / "a_mask.nii"), str(tmp_path / "copy" / "a_mask.nii")]})
    cases = case_fingerprints(rows, ["t1", "mask", "flair"], path_only=["mask"])
    # the first case matches twice (its T1's content, its mask's path) and counts once
    with pytest.raises(InputError, match="1 of the 2 'test' scans were used to train"):
        refuse_fitted(sorted(fitted | scan_fingerprints([cohort / "a_mask.nii"], content=False)), cases, "m.csv",
                      "scans", "train")
    refuse_fitted(sorted(scan_fingerprints([tmp_path / "copy" / "b_mask.nii"], content=False)), cases, "m.csv",
                  "scans", "train")  # another empty mask, by path: not the same case


def test_file_ids_keep_dots_inside_the_name() -> None:
    """``split('.')[0]`` made ``scan_off0.001.nii.gz`` and ``scan_off0.nii.gz`` one subject."""
    ids = file_ids([Path("scan_off0.001.nii.gz"), Path("scan_off0.nii.gz"), Path("x.v2.nii")])
    assert ids["subject"].tolist() == ["scan_off0.001", "scan_off0", "x.v2"]
    assert failures_path("out/run.v1.nii.gz").name == "run.v1_failures.csv"


def test_sessions_tsv_ids_that_match_no_image_session_are_said(tmp_path, capsys):
    """``ses-1`` written for the folder ``ses-01``: every visit silently got participants.tsv's baseline age;
    ``NA`` and ``n/a`` in a sessions.tsv mean the same (one kept the baseline value, the other none)."""
    for ses in ("ses-01", "ses-02"):
        _img(tmp_path / f"sub-01/{ses}/anat/sub-01_{ses}_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t60\n")
    (tmp_path / "sub-01/sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t60\nses-2\t62\n")
    load_table(tmp_path)
    err = capsys.readouterr().err
    assert "lists ses-1, ses-2, not ses-01, ses-02" in err and "sub-01_sessions.tsv" in err
    ages = []
    for token in ("n/a", "NA"):
        (tmp_path / "sub-01/sub-01_sessions.tsv").write_text(f"session_id\tage\nses-01\t60\nses-02\t{token}\n")
        ages.append(load_table(tmp_path).set_index("session").loc["ses-02", "age"])
    assert ages == [60, 60]
    assert "no row" not in capsys.readouterr().err
    (tmp_path / "sub-01/sub-01_sessions.tsv").write_text("session_id\tage\nses-01\t60\nses-01\t61\n")
    with pytest.raises(InputError, match=r"sub-01_sessions\.tsv lists ses-01 twice"):
        load_table(tmp_path)


def test_per_session_labels_alone_are_labels(tmp_path):
    _img(tmp_path / "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz")
    (tmp_path / "sub-01/sub-01_sessions.tsv").write_text("session_id\tage\nses-01\t70\n")
    df = load_table(tmp_path)
    assert df.loc[0, "age"] == 70 and not df.attrs["labels_missing"]
    (tmp_path / "sub-01/sub-01_sessions.tsv").write_text("session_id\tacq_time\nses-01\t2020-01-01T10:00\n")
    assert load_table(tmp_path).attrs["labels_missing"]  # an acquisition time is no label


def test_a_lesion_mask_in_a_session_folder_pairs_with_that_sessions_images(tmp_path, capsys, monkeypatch):
    """A mask named without ``ses-`` in ``ses-2/anat``: its row held no image and every command dropped the case
    silently (half a longitudinal lesion cohort); one that matches no image at all is said."""
    for ses in ("ses-1", "ses-2"):
        _img(tmp_path / f"sub-01/{ses}/anat/sub-01_{ses}_FLAIR.nii.gz")
        _img(tmp_path / f"derivatives/manual/sub-01/{ses}/anat/sub-01_desc-lesion_mask.nii.gz")
    df = load_table(tmp_path)
    assert len(df) == 2 and df["mask"].notna().all() and capsys.readouterr().err == ""
    _img(tmp_path / "derivatives/manual/sub-02/anat/sub-02_desc-lesion_mask.nii.gz")
    assert len(load_table(tmp_path)) == 2
    assert "1 lesion mask(s)" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path.parent)  # a relative root (--data bids/) crashed the warning with a raw ValueError
    assert len(load_table(Path(tmp_path.name))) == 2
    assert "derivatives/manual/sub-02/anat/sub-02_desc-lesion_mask.nii.gz" in capsys.readouterr().err


@pytest.mark.parametrize("column, message", [("subject", "both participant_id and subject"),
                                             ("session", "has a 'session' column")])
def test_participants_tsv_with_its_own_subject_or_session_column_is_one_clear_error(tmp_path, column, message):
    """Beside participant_id, a 'subject' column crashed with a traceback; a 'session' column was merged into
    session_x / session_y and reported as a duplicated subject."""
    _img(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text(f"participant_id\tage\t{column}\nsub-01\t30\tX\n")
    with pytest.raises(InputError, match=message):
        load_table(tmp_path)
    (tmp_path / "participants.tsv").write_text("subject\tage\nsub-01\t30\n")  # the id column alone: read
    assert load_table(tmp_path).loc[0, "age"] == 30


def test_manifest_cells_and_file_kinds_as_spreadsheets_write_them(tmp_path):
    """NaN / N/A image cells are no image, a space after a path is not part of it, ``.CSV`` is a manifest, and a
    ';'-separated or tab-separated file saved as .csv says so (not "no 'subject' column")."""
    t1 = _img(tmp_path / "a_T1w.nii.gz")
    (tmp_path / "m.CSV").write_text(f"subject,t1,flair\nsub-01,{t1.name} ,NaN\nsub-02,{t1.name},N/A\n")
    df = load_table(tmp_path / "m.CSV")
    assert df["t1"].str.endswith("a_T1w.nii.gz").all() and df["flair"].isna().all()
    for name, text, what in (("s.csv", "subject;t1\nsub-01;x\n", "';'"), ("t.csv", "subject\tt1\nsub-01\tx\n", "tabs")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=f"separated by {what}"):
            load_table(tmp_path / name)
