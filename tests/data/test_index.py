"""Dataset indexing: BIDS folders, CSV/TSV manifests, skipped subjects and the content fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
import pytest

from medrobust.data.index import DatasetIndex, SubjectRecord, file_sha256, load_dataset_index, parse_sex
from medrobust.errors import MedrobustError


def _load_quietly(path, **kwargs) -> DatasetIndex:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_dataset_index(path, **kwargs)


def test_bids_index_reads_ages_sex_sessions_and_label_maps(bids_dataset):
    with pytest.warns(UserWarning, match="89"):
        index = load_dataset_index(bids_dataset)
    assert index.root == bids_dataset
    assert [s.subject_id for s in index.subjects] == ["sub-01", "sub-02", "sub-04", "sub-06"]
    ages = {s.subject_id: s.age for s in index.subjects}
    assert ages == {"sub-01": 34.5, "sub-02": 89.0, "sub-04": 40.0, "sub-06": 61.5}
    sexes = {s.subject_id: s.sex for s in index.subjects}
    assert sexes == {"sub-01": "F", "sub-02": "M", "sub-04": "M", "sub-06": None}
    session_subject = index.subjects[-1]
    assert session_subject.t1_path.name == "sub-06_ses-1_T1w.nii.gz"
    assert "ses-1" in session_subject.t1_path.parts
    assert all(s.dseg_path is not None and s.dseg_path.name.endswith("_dseg.nii.gz") for s in index.subjects)
    assert index.label_names == {1: "core", 2: "shell"}


def test_bids_skips_are_recorded_with_reasons(bids_dataset):
    index = _load_quietly(bids_dataset)
    reasons = {s.subject_id: s.reason for s in index.skipped}
    assert set(reasons) == {"sub-03", "sub-05"}
    assert "n/a" in reasons["sub-03"]
    assert "no T1w image" in reasons["sub-05"]


def test_bids_strict_raises_on_first_bad_subject(bids_dataset):
    with pytest.raises(MedrobustError, match="sub-03.*n/a"):
        _load_quietly(bids_dataset, strict=True)


def test_bids_unlisted_subject_is_skipped_and_sidecar_gives_field_strength(bids_dataset, write_nifti):
    image = np.ones((4, 4, 4), dtype=np.float32)
    write_nifti(bids_dataset / "sub-99" / "anat" / "sub-99_T1w.nii.gz", image)
    sidecar = bids_dataset / "sub-01" / "anat" / "sub-01_T1w.json"
    sidecar.write_text(json.dumps({"MagneticFieldStrength": 3}))
    index = _load_quietly(bids_dataset)
    assert "sub-99" in {s.subject_id for s in index.skipped}
    assert {s.subject_id: s.field_strength for s in index.subjects}["sub-01"] == 3.0


def test_bad_age_text_is_skipped(tmp_path, write_nifti):
    root = tmp_path / "ds"
    write_nifti(root / "sub-a" / "anat" / "sub-a_T1w.nii", np.ones((4, 4, 4), dtype=np.float32))
    write_nifti(root / "sub-b" / "anat" / "sub-b_T1w.nii", np.ones((4, 4, 4), dtype=np.float32))
    (root / "participants.tsv").write_text("participant_id\tage\na\tforty\nb\t-3\n")
    with pytest.raises(MedrobustError, match="no usable subject") as error:
        load_dataset_index(root)
    assert str(root) in str(error.value)
    assert "forty" in str(error.value)


def test_empty_bids_folder_is_one_clear_error(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(MedrobustError, match="participants.tsv") as error:
        load_dataset_index(root)
    assert str(root) in str(error.value)
    (root / "participants.tsv").write_text("participant_id\tage\n")
    with pytest.raises(MedrobustError, match="no usable subject") as error:
        load_dataset_index(root)
    assert str(root) in str(error.value)


def test_missing_path_and_wrong_file_type_raise(tmp_path):
    with pytest.raises(MedrobustError, match="not found"):
        load_dataset_index(tmp_path / "nowhere")
    other = tmp_path / "data.json"
    other.write_text("{}")
    with pytest.raises(MedrobustError, match="data.json"):
        load_dataset_index(other)


def _manifest_folder(tmp_path, write_nifti, synthetic_brain):
    folder = tmp_path / "study"
    for number in range(3):
        image, dseg = synthetic_brain(seed=number)
        write_nifti(folder / "images" / f"sub-{number:02d}_T1w.nii.gz", image)
        write_nifti(folder / "labels" / f"s{number}_dseg.nii.gz", dseg)
    return folder


def test_csv_manifest_resolves_relative_paths_and_skips_missing_files(tmp_path, write_nifti, synthetic_brain):
    folder = _manifest_folder(tmp_path, write_nifti, synthetic_brain)
    absolute = folder / "images" / "sub-02_T1w.nii.gz"
    (folder / "manifest.csv").write_text(
        "image,age,dseg,sex,field_strength\n"
        "images/sub-00_T1w.nii.gz,30,labels/s0_dseg.nii.gz,female,1.5\n"
        'images/sub-01_T1w.nii.gz,"34,5",labels/s1_dseg.nii.gz,1,3T\n'
        f"{absolute},50,,,\n"
        "images/missing_T1w.nii.gz,60,,,\n"
    )
    index = load_dataset_index(folder / "manifest.csv")
    assert index.root == folder
    assert [s.subject_id for s in index.subjects] == ["sub-00", "sub-01", "sub-02"]
    first, second, third = index.subjects
    assert first.t1_path == folder / "images" / "sub-00_T1w.nii.gz"
    assert first.dseg_path == folder / "labels" / "s0_dseg.nii.gz"
    assert (first.sex, first.field_strength) == ("F", 1.5)
    assert (second.age, second.sex, second.field_strength) == (34.5, "M", 3.0)
    assert third.t1_path == absolute and third.dseg_path is None and third.sex is None
    assert [s.subject_id for s in index.skipped] == ["missing"]
    assert "not found" in index.skipped[0].reason
    with pytest.raises(MedrobustError, match="missing_T1w"):
        load_dataset_index(folder / "manifest.csv", strict=True)


def test_tsv_manifest_with_subject_ids_and_features(tmp_path, write_nifti, synthetic_brain):
    folder = _manifest_folder(tmp_path, write_nifti, synthetic_brain)
    (folder / "f0.csv").write_text("sex,field_strength,vol_1\n0,3,1.2\n")
    (folder / "manifest.tsv").write_text(
        "subject_id\tt1_path\tage\tfeatures_path\n"
        "alpha\timages/sub-00_T1w.nii.gz\t20\tf0.csv\n"
        "beta\timages/sub-01_T1w.nii.gz\tn/a\t\n"
        "alpha\timages/sub-02_T1w.nii.gz\t21\t\n"
    )
    index = load_dataset_index(folder / "manifest.tsv")
    assert [s.subject_id for s in index.subjects] == ["alpha"]
    assert index.subjects[0].features_path == folder / "f0.csv"
    reasons = [s.reason for s in index.skipped]
    assert any("n/a" in r for r in reasons) and any("repeated" in r for r in reasons)


def test_manifest_without_age_column_names_the_file(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,years\na.nii,3\n")
    with pytest.raises(MedrobustError, match=r"m\.csv.*age"):
        load_dataset_index(manifest)


def test_sex_codes():
    assert [parse_sex(v) for v in ["F", "f", "Female", "0", "M", "male", "1", "x", "", None]] == [
        "F", "F", "F", "F", "M", "M", "M", None, None, None,
    ]


def test_file_sha256_matches_hashlib_and_follows_content(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
    path.write_bytes(b"abcd" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abcd" * 1000).hexdigest()


def test_fingerprint_is_stable_and_tracks_content_and_ages(bids_dataset, write_nifti, synthetic_brain):
    first = _load_quietly(bids_dataset).fingerprint()
    assert len(first) == 64
    assert _load_quietly(bids_dataset).fingerprint() == first

    index = _load_quietly(bids_dataset)
    changed_age = DatasetIndex(
        root=index.root,
        subjects=[SubjectRecord(**{**s.__dict__, "age": s.age + 1}) for s in index.subjects],
        skipped=[],
    )
    assert changed_age.fingerprint() != first

    image, _ = synthetic_brain(seed=42)
    t1 = bids_dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    write_nifti(t1, image)
    os.utime(t1, ns=(1, 1))  # a different mtime, so the in-process hash cache cannot serve stale bytes
    assert _load_quietly(bids_dataset).fingerprint() != first


def test_an_age_above_any_human_age_is_skipped_with_its_reason() -> None:
    from medrobust.data.index import MAX_AGE, parse_age

    assert parse_age("34,5") == 34.5 and parse_age(str(MAX_AGE)) == MAX_AGE
    with pytest.raises(Exception, match="is above 125 years"):
        parse_age("300")
    # The range is the dataset's to set: a paediatric cohort refuses adults, and the ends are included.
    assert parse_age("18", (2.0, 18.0)) == 18.0
    with pytest.raises(Exception, match="is above 18 years"):
        parse_age("19", (2.0, 18.0))
    with pytest.raises(Exception, match="is below 2 years, outside the dataset's age_range"):
        parse_age("1.5", (2.0, 18.0))
