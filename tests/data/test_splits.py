"""Subject-level splits: seeded, disjoint, saved and never silently redrawn."""

from __future__ import annotations

import json

import pytest

from medrobust.data.splits import load_or_create_splits, make_splits
from medrobust.errors import MedrobustError

SUBJECTS = [f"sub-{i:03d}" for i in range(50)]


def test_splits_are_deterministic_disjoint_sorted_and_cover_everyone():
    splits = make_splits(SUBJECTS, seed=3)
    assert splits == make_splits(list(reversed(SUBJECTS)), seed=3)  # independent of input order
    assert [len(splits[name]) for name in ("train", "val", "test")] == [35, 5, 10]
    members = [s for name in ("train", "val", "test") for s in splits[name]]
    assert sorted(members) == SUBJECTS and len(set(members)) == len(members)
    assert all(splits[name] == sorted(splits[name]) for name in splits)
    assert make_splits(SUBJECTS, seed=4)["test"] != splits["test"]


@pytest.mark.parametrize("n", [3, 4, 5, 7, 11])
def test_every_split_is_non_empty_from_three_subjects(n):
    splits = make_splits(SUBJECTS[:n], seed=0)
    assert all(len(splits[name]) >= 1 for name in ("train", "val", "test"))
    assert sum(len(v) for v in splits.values()) == n


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1), ("a", 0, 1)])
def test_bad_fractions_are_rejected(fractions):
    with pytest.raises(MedrobustError, match="fractions"):
        make_splits(SUBJECTS, seed=0, fractions=fractions)


def test_duplicate_subject_ids_are_rejected():
    with pytest.raises(MedrobustError, match="once"):
        make_splits(["sub-1", "sub-1", "sub-2"], seed=0)


def test_saved_splits_are_reused_across_runs(tmp_path):
    first = load_or_create_splits(tmp_path, SUBJECTS, seed=7)
    path = tmp_path / "splits-seed7.json"
    saved = json.loads(path.read_text())
    assert saved["fractions"] == [0.7, 0.1, 0.2] and saved["splits"] == first
    # Tamper with the file: a rerun must reuse the saved assignment, not redraw it.
    saved["splits"]["train"], saved["splits"]["test"] = saved["splits"]["test"], saved["splits"]["train"]
    path.write_text(json.dumps(saved))
    again = load_or_create_splits(tmp_path, list(reversed(SUBJECTS)), seed=7)
    assert again["train"] == first["test"] and again["test"] == first["train"]
    assert not list(tmp_path.glob("*.tmp"))


def test_changed_subject_set_is_an_error_not_a_resplit(tmp_path):
    load_or_create_splits(tmp_path, SUBJECTS, seed=1)
    with pytest.raises(MedrobustError, match=r"splits-seed1\.json.*delete"):
        load_or_create_splits(tmp_path, SUBJECTS + ["sub-new"], seed=1)
    with pytest.raises(MedrobustError, match="removed"):
        load_or_create_splits(tmp_path, SUBJECTS[1:], seed=1)
    with pytest.raises(MedrobustError, match="fractions"):
        load_or_create_splits(tmp_path, SUBJECTS, seed=1, fractions=(0.6, 0.2, 0.2))


def test_unreadable_splits_file_asks_to_delete_it(tmp_path):
    (tmp_path / "splits-seed0.json").write_text("{not json")
    with pytest.raises(MedrobustError, match="delete"):
        load_or_create_splits(tmp_path, SUBJECTS, seed=0)
