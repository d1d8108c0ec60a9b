"""The results store: schema, one transaction per cell, finished-cell bookkeeping, bad files."""

from __future__ import annotations

import sqlite3

import pytest

from medrobust.errors import MedrobustError
from medrobust.metrics import cell_metrics
from medrobust.store import SAMPLE_COLUMNS, ResultStore


def _samples(n: int, shift: float = 1.0) -> list[dict]:
    return [{"subject": f"sub-{i:02d}", "true_age": 20.0 + i, "clean_prediction": 21.0 + i,
             "adversarial_prediction": 21.0 + i + shift, "deviation": shift, "linf": 0.01, "l2": 0.5,
             "linf_rel": 0.001, "l2_rel": 0.05} for i in range(n)]


def test_write_and_read_back_a_cell(tmp_path):
    with ResultStore(tmp_path) as store:
        run_id = store.start_run({"seed": 0}, {"torch": "2.13.0"})
        samples = _samples(3)
        metrics = cell_metrics(*[[s[k] for s in samples] for k in ("true_age", "clean_prediction",
                                                                   "adversarial_prediction", "linf", "l2",
                                                                   "linf_rel", "l2_rel")])
        store.write_cell("c1", run_id, {"model": "cnn3d", "attack": "pgd", "params": {"steps": 4}}, metrics,
                         samples, 2.5)
        store.finish_run(run_id)
        assert store.finished_cells() == {"c1"}
        cells = store.cells()
        assert list(cells["id"]) == ["c1"] and cells.loc[0, "status"] == "done"
        assert cells.loc[0, "params"] == {"steps": 4} and cells.loc[0, "adversarial_mae"] == pytest.approx(2.0)
        rows = store.samples("c1")
        assert list(rows.columns) == ["cell_id", *SAMPLE_COLUMNS] and len(rows) == 3
        assert list(rows["subject"]) == ["sub-00", "sub-01", "sub-02"]
        runs = store.runs()
        assert runs[0]["config"] == {"seed": 0} and runs[0]["finished_at"] is not None
    # WAL journaling, as the file itself says.
    assert sqlite3.connect(tmp_path / "results.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failing_cell_write_leaves_nothing_behind(tmp_path):
    with ResultStore(tmp_path) as store:
        run_id = store.start_run({}, {})
        bad = _samples(3)
        del bad[2]["l2"]  # the third row cannot be written: the whole cell must roll back
        with pytest.raises(KeyError):
            store.write_cell("c1", run_id, {}, {}, bad, 1.0)
        bad_value = _samples(3)
        bad_value[2]["true_age"] = None  # violates NOT NULL inside the transaction, after two rows went in
        with pytest.raises(sqlite3.IntegrityError):
            store.write_cell("c1", run_id, {}, {}, bad_value, 1.0)
        assert store.finished_cells() == set()
        assert len(store.samples()) == 0 and len(store.cells()) == 0


def test_rewriting_a_cell_replaces_its_rows(tmp_path):
    with ResultStore(tmp_path) as store:
        run_id = store.start_run({}, {})
        store.write_cell("c1", run_id, {}, {}, [], 1.0, status="failed", error="boom")
        assert store.finished_cells() == set()
        assert store.cells().loc[0, "error"] == "boom"
        store.write_cell("c1", run_id, {}, {}, _samples(2), 1.0)
        store.write_cell("c1", run_id, {}, {}, _samples(2, shift=3.0), 1.0)
        assert store.finished_cells() == {"c1"}
        assert len(store.cells()) == 1 and list(store.samples()["deviation"]) == [3.0, 3.0]


def test_missing_or_foreign_store_is_a_clear_error(tmp_path):
    with pytest.raises(MedrobustError, match="no results store"):
        ResultStore(tmp_path / "nothing", create=False)
    (tmp_path / "results.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(MedrobustError, match="not a readable results store"):
        ResultStore(tmp_path)
