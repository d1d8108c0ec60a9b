"""The results store: schema and its migration, one transaction per cell, cell statuses, the writer's lock, bad
files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from medrobust.errors import MedrobustError
from medrobust.results.metrics import cell_metrics
from medrobust.results.store import (
    SAMPLE_COLUMNS,
    SCHEMA_VERSION,
    ResultStore,
    StoreBusyError,
    cell_id,
    lock_holder,
    lock_path,
)


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
        del bad[2]["l2"]  # the third row lacks a required value: the whole cell must roll back
        with pytest.raises(sqlite3.IntegrityError, match="samples.l2"):
            store.write_cell("c1", run_id, {}, {}, bad, 1.0)
        misspelt = _samples(3)
        misspelt[1]["psnr_db"] = 30.0
        with pytest.raises(MedrobustError, match=r"c1: per-subject values \['psnr_db'\] have no column"):
            store.write_cell("c1", run_id, {}, {}, misspelt, 1.0)
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


@pytest.mark.parametrize("writer", [True, False])
def test_another_programs_sqlite_file_is_refused_untouched(tmp_path, writer):
    path = tmp_path / "results.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO patients VALUES (1, 'someone')")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(MedrobustError, match=r"SQLite file of another program \(tables patients\).*left untouched"):
        ResultStore(tmp_path, create=False, writer=writer)
    assert path.read_bytes() == before  # no table of ours added, no journal mode changed
    assert not (tmp_path / "results.sqlite-wal").exists()


# A reader in another process, as another user where this one is root (root writes into any folder), once its
# modules are imported: it opens the store of a read-only folder and prints what it reads.
_READER = """
import json, os, sys
from medrobust.results.store import ResultStore
if os.getuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
with ResultStore(sys.argv[1], create=False) as store:
    print(json.dumps({"statuses": store.statuses(), "samples": len(store.samples())}))
"""


def test_an_archived_store_in_a_read_only_folder_is_readable(tmp_path):
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="medrobust-archive-"))  # outside pytest's private (0700) tmp folder
    try:
        with ResultStore(folder) as store:
            store.write_cell("c1", store.start_run({}, {}), {"model": "cnn3d"}, {"n": 2}, _samples(2), 1.0)
        for name in os.listdir(folder):
            os.chmod(folder / name, 0o444)
        os.chmod(folder, 0o555)
        read = subprocess.run([sys.executable, "-c", _READER, str(folder)], capture_output=True, text=True)
        assert read.returncode == 0, read.stderr
        assert json.loads(read.stdout) == {"statuses": {"c1": "done"}, "samples": 2}
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)


def test_nullable_sample_columns_store_null_when_missing(tmp_path):
    with ResultStore(tmp_path) as store:
        run_id = store.start_run({}, {})
        rows = _samples(2)
        rows[0].update(l0=412, psnr=38.5, ssim=0.991)  # the second subject has none of them
        store.write_cell("c1", run_id, {}, {}, rows, 1.0)
        stored = store.samples("c1")
    assert list(stored.columns) == ["cell_id", *SAMPLE_COLUMNS]
    assert stored.loc[0, "l0"] == 412 and stored.loc[0, "psnr"] == 38.5 and stored.loc[0, "ssim"] == 0.991
    assert stored.loc[1, ["l0", "psnr", "ssim"]].isna().all()


def test_statuses_and_failures(tmp_path):
    with ResultStore(tmp_path) as store:
        assert store.statuses() == {} and store.failures() == []
        run_id = store.start_run({}, {})
        spec = {"model": "hybrid", "attack": "pgd", "norm": "linf", "epsilon": 0.002, "threat_model": "perturbed"}
        store.write_cell("a", run_id, {"model": "cnn3d"}, {}, _samples(2), 1.0)
        store.write_cell("b", run_id, spec, {}, [], 0.5, status="failed", error="RuntimeError: out of memory")
        store.write_cell("c", run_id, {}, {}, [], 0.5, status="failed", error="ValueError: x")
        store.write_cell("c", run_id, {}, {}, _samples(2), 1.0)  # retried, now done
        assert store.statuses() == {"a": "done", "b": "failed", "c": "done"}
        assert store.finished_cells() == {"a", "c"}
        (failure,) = store.failures()
        assert failure["id"] == "b" and failure["run_id"] == run_id and failure["spec"] == spec
        assert failure["error"] == "RuntimeError: out of memory" and failure["finished_at"]


# The schema as version 1 of medrobust wrote it (before l0, psnr and ssim): stores of that version are migrated.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    config TEXT NOT NULL,
    environment TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    spec TEXT NOT NULL,
    metrics TEXT NOT NULL,
    error TEXT,
    seconds REAL,
    finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    cell_id TEXT NOT NULL REFERENCES cells(id),
    subject TEXT NOT NULL,
    true_age REAL NOT NULL,
    clean_prediction REAL NOT NULL,
    adversarial_prediction REAL NOT NULL,
    deviation REAL NOT NULL,
    linf REAL NOT NULL,
    l2 REAL NOT NULL,
    linf_rel REAL NOT NULL,
    l2_rel REAL NOT NULL,
    PRIMARY KEY (cell_id, subject)
);
CREATE TABLE IF NOT EXISTS reliability (
    cell_id TEXT PRIMARY KEY REFERENCES cells(id),
    reasons TEXT NOT NULL
);
"""
_V1_COLUMNS = SAMPLE_COLUMNS[:9]


def _version_1_store(run_dir: Path) -> None:
    db = sqlite3.connect(run_dir / "results.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA_V1)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO runs VALUES ('r1', '2026-11-01T00:00:00+00:00', NULL, '{}', '{}')")
    db.execute("INSERT INTO cells VALUES ('c1', 'r1', 'done', '{\"model\": \"cnn3d\"}', '{\"n\": 2}', NULL, 1.0, "
               "'2026-11-01T00:01:00+00:00')")
    db.executemany(f"INSERT INTO samples VALUES ('c1', {', '.join('?' * len(_V1_COLUMNS))})",
                   [tuple(row[c] for c in _V1_COLUMNS) for row in _samples(2)])
    db.close()


@pytest.mark.parametrize("writer", [True, False])
def test_a_version_1_store_is_migrated_in_place(tmp_path, writer):
    _version_1_store(tmp_path)
    with ResultStore(tmp_path, create=False, writer=writer) as store:
        assert store.statuses() == {"c1": "done"}
        old = store.samples("c1")
        assert list(old.columns) == ["cell_id", *SAMPLE_COLUMNS]
        assert list(old["deviation"]) == [1.0, 1.0] and old[["l0", "psnr", "ssim"]].isna().all().all()
        # The migrated store takes the new columns, and keeps its version-1 rows.
        rows = _samples(1)
        rows[0].update(l0=7, psnr=40.0, ssim=0.95)
        store.write_cell("c2", "r1", {}, {}, rows, 1.0)
        assert store.samples("c2").loc[0, "l0"] == 7
    db = sqlite3.connect(tmp_path / "results.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    types = {name: kind for _, name, kind, *_ in db.execute("PRAGMA table_info(samples)")}
    assert (types["l0"], types["psnr"], types["ssim"]) == ("INTEGER", "REAL", "REAL")
    assert db.execute("SELECT COUNT(*) FROM samples").fetchone() == (3,)
    db.close()
    with ResultStore(tmp_path, create=False) as store:  # opening it again changes nothing
        assert len(store.samples()) == 3


_V2_NOT_IDENTITY = ("checkpoint", "dataset", "device", "cell_seed")  # schema 2's ids covered the label


def _version_2_store(run_dir: Path, cells: dict[str, dict]) -> None:
    """A store of schema 2, whose cell ids covered the model's label, holding ``cells`` (label -> spec)."""
    with ResultStore(run_dir) as store:
        run_id = store.start_run({}, {})
        for spec in cells.values():
            old_id = cell_id(spec, _V2_NOT_IDENTITY)
            store.write_cell(old_id, run_id, spec, {"n": 2}, _samples(2), 1.0)
            (run_dir / "examples").mkdir(exist_ok=True)
            (run_dir / "examples" / f"{old_id}.npz").write_bytes(old_id.encode())
        store.write_reliability({cell_id(cells["a"], _V2_NOT_IDENTITY): ["why"]})
    db = sqlite3.connect(run_dir / "results.sqlite", isolation_level=None)
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()


def test_a_version_2_store_is_rekeyed_without_the_label(tmp_path):
    spec = {"model_name": "cnn3d", "checkpoint_sha256": "ab", "attack": "pgd", "epsilon": 0.001, "cell_seed": 7}
    cells = {"a": {**spec, "model": "a"}, "b": {**spec, "model": "b"},  # one model under two labels
             "c": {**spec, "model": "c", "epsilon": 0.002}}
    _version_2_store(tmp_path, cells)
    with ResultStore(tmp_path) as store:
        stored = store.cells()
        reliability = dict(zip(stored["id"], stored["reliability"], strict=True))
        samples = store.samples()
    new_a, new_c = cell_id(cells["a"]), cell_id(cells["c"])
    assert cell_id(cells["b"]) == new_a  # the label is no part of the id any more
    assert list(stored["id"]) == [new_a, new_c] and list(stored["model"]) == ["a", "c"]  # b collapsed onto a
    assert reliability == {new_a: ["why"], new_c: []}
    assert sorted(samples["cell_id"].unique()) == sorted([new_a, new_c]) and len(samples) == 4
    kept = [f"{new_a}.npz", f"{new_c}.npz", f"{cell_id(cells['b'], _V2_NOT_IDENTITY)}.npz"]  # b's file stays
    assert sorted(p.name for p in (tmp_path / "examples").iterdir()) == sorted(kept)
    with ResultStore(tmp_path) as store:  # relabelling a cell changes its spec's label only
        assert store.relabel({new_a: "renamed", new_c: "c"}) == 1
        assert list(store.cells()["model"]) == ["renamed", "c"] and len(store.samples()) == 4


def test_a_store_of_a_newer_schema_is_refused(tmp_path):
    ResultStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "results.sqlite", isolation_level=None)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(MedrobustError, match=f"schema {SCHEMA_VERSION + 1}.*upgrade medrobust"):
        ResultStore(tmp_path, create=False)


# A writer in another process: it opens the store as the runner does, says so, and waits to be stopped.
_HOLDER = """
import sys, time
from medrobust.results.store import ResultStore
store = ResultStore(sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


def _start_writer(run_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    return process


def test_a_second_writer_is_refused_until_the_first_is_killed(tmp_path):
    holder = _start_writer(tmp_path)
    try:
        recorded = lock_holder(tmp_path / "results.sqlite")
        assert recorded["pid"] == holder.pid and recorded["started_at"]
        with pytest.raises(StoreBusyError) as refused:
            ResultStore(tmp_path)
        message = str(refused.value)
        assert str(tmp_path / "results.sqlite") in message and f"pid {holder.pid}" in message
        assert recorded["started_at"] in message and "another `out` folder" in message
        # Readers take no lock: the report and the status read while a run writes.
        with ResultStore(tmp_path, create=False) as reader:
            assert reader.statuses() == {}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The lock died with its holder; its record stays in the file but names a process that has ended.
    assert json.loads(lock_path(tmp_path / "results.sqlite").read_text())["pid"] == holder.pid
    assert lock_holder(tmp_path / "results.sqlite") is None
    with ResultStore(tmp_path) as store:
        assert lock_holder(store.path)["pid"] == os.getpid()
        store.start_run({}, {})
    # A closed writer leaves no holder behind, and the next one gets the lock.
    assert lock_holder(tmp_path / "results.sqlite") is None
    ResultStore(tmp_path, writer=True).close()


def test_two_writers_in_one_process_also_exclude_each_other(tmp_path):
    with ResultStore(tmp_path):
        with pytest.raises(StoreBusyError, match=f"pid {os.getpid()}"):  # refused at once: the lock is LOCK_NB
            ResultStore(tmp_path)


def test_a_lock_file_that_cannot_be_opened_is_a_clear_error(tmp_path):
    lock_path(tmp_path / "results.sqlite").mkdir()  # in the lock file's place, something that is no file
    with pytest.raises(MedrobustError, match="cannot open the store's lock file .*results.sqlite.lock"):
        ResultStore(tmp_path)
    with ResultStore(tmp_path, writer=False) as reader:  # readers need no lock file
        assert reader.statuses() == {}


def test_a_damaged_cell_record_is_a_failed_cell_with_its_reason_not_an_unreadable_store(tmp_path) -> None:
    import sqlite3

    with ResultStore(tmp_path) as store:
        run_id = store.start_run({}, {})
        store.write_cell("good", run_id, {"model": "m"}, {"n": 3}, [], 1.0)
        store.write_cell("bad", run_id, {"model": "m"}, {"n": 3}, [], 1.0)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        db.execute("UPDATE cells SET metrics = ? WHERE id = 'bad'", ('{"n": 3,',))  # cut off mid-record
    with ResultStore(tmp_path, create=False) as store:
        cells = store.cells().set_index("id")
        statuses = store.statuses()
    assert statuses == {"good": "done", "bad": "failed"}  # so --retry-failed computes it again
    assert cells.loc["bad", "status"] == "failed" and "unreadable" in cells.loc["bad", "error"]
    assert cells.loc["bad", "model"] == "m" and cells.loc["good", "n"] == 3
    with ResultStore(tmp_path, create=False) as store:
        (failure,) = store.failures()
    assert failure["id"] == "bad" and "unreadable" in failure["error"] and failure["spec"] == {"model": "m"}


def test_a_store_whose_creation_was_cut_short_opens_as_a_new_one(tmp_path):
    # A run killed between creating the tables and stamping their version (an older medrobust did these in two
    # steps; they are one transaction now) left our tables, empty and unstamped: ours, not another program's.
    ResultStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "results.sqlite", isolation_level=None)
    db.execute("DELETE FROM meta")
    db.close()
    with ResultStore(tmp_path) as store:
        store.write_cell("c1", store.start_run({}, {}), {"model": "cnn3d"}, {"n": 2}, _samples(2), 1.0)
    db = sqlite3.connect(tmp_path / "results.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.close()
