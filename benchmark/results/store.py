"""The results store: one SQLite file (WAL) per run folder, written only by the runner.

Tables: ``runs`` (config and environment of each invocation), ``cells`` (one row per cell: its parameters,
status, timing and summary metrics) and ``samples`` (one row per subject of a cell). A cell and its samples are
written in one transaction, so a store never holds half a cell, whenever the writing process dies.

One process writes a store at a time: a writer holds an exclusive advisory lock (``flock``) on
``results.sqlite.lock`` for as long as its store is open. The operating system drops the lock when the process
ends, however it ends, so a killed run never leaves a stale lock; a second writer is refused at once
(`StoreBusyError`). Readers (the report, ``medrobust status``) take no lock: WAL lets them read while a run writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import sys
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from medrobust.errors import MedrobustError
from medrobust.faults import fault_point
from medrobust.vocabulary import DEFAULT_EXTRACTOR

STORE_FILENAME = "results.sqlite"
LOCK_SUFFIX = ".lock"  # the writer's lock file: results.sqlite.lock
EXAMPLES_FOLDER = "examples"  # beside the store: each cell's example slices, <cell id>.npz (results/examples.py)
# 2: samples gained l0, psnr and ssim; 3: a cell's id no longer covers the model's label (older stores are migrated
# in place on opening: columns added, cells re-keyed); 4: samples gained the certificate of a median-smoothed
# model (certified_lower, certified_upper, smoothed_adversarial).
SCHEMA_VERSION = 4

# Spec keys that locate, describe or name a cell without changing its result: left out of its id. The label
# (``model``) is a display name: a model renamed in its config keeps its cells, which are relabelled (`relabel`).
NOT_IDENTITY = ("model", "checkpoint", "dataset", "device", "cell_seed")
_NOT_IDENTITY_V2 = ("checkpoint", "dataset", "device", "cell_seed")  # what schema 2's ids left out
_OUR_TABLES = {"meta", "runs", "cells", "samples", "reliability"}

# Per-subject columns of the samples table, in order: the one list the writer and the reader use. A sample
# without one of the nullable columns (l0, psnr, ssim) stores NULL there.
SAMPLE_COLUMNS = ("subject", "true_age", "clean_prediction", "adversarial_prediction", "deviation",
                  "linf", "l2", "linf_rel", "l2_rel", "l0", "psnr", "ssim",
                  "certified_lower", "certified_upper", "smoothed_adversarial")
# Columns added to samples after version 1, with their SQL types: what the migration adds.
_ADDED_SAMPLE_COLUMNS = {"l0": "INTEGER", "psnr": "REAL", "ssim": "REAL", "certified_lower": "REAL",
                         "certified_upper": "REAL", "smoothed_adversarial": "REAL"}

# Cell-level values that differ between two runs of the same cell (where and when it ran, how long it took): left
# out when two stores are compared. Metrics are free-form JSON; a metric that measures the run rather than the
# model under attack (time, memory, the batch size a device could hold) belongs in RUN_DEPENDENT_METRICS.
RUN_DEPENDENT_CELL_FIELDS = ("run_id", "seconds", "finished_at")
RUN_DEPENDENT_METRICS = ("attack_seconds", "timing", "peak_memory_bytes", "batch_size_used", "shared_clean_passes")

_SCHEMA = """
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
    l0 INTEGER,
    psnr REAL,
    ssim REAL,
    certified_lower REAL,
    certified_upper REAL,
    smoothed_adversarial REAL,
    PRIMARY KEY (cell_id, subject)
);
CREATE TABLE IF NOT EXISTS reliability (
    cell_id TEXT PRIMARY KEY REFERENCES cells(id),
    reasons TEXT NOT NULL
);
"""


def cell_id(spec: dict, leave_out: tuple[str, ...] = NOT_IDENTITY) -> str:
    """A cell's id: a short hash of everything in its spec that decides its result (key order aside)."""
    content = {k: v for k, v in spec.items() if k not in leave_out}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _unreadable(*texts: str | None) -> str | None:
    """Why a cell's stored JSON cannot be read (damaged by hand or by another program), or None."""
    for text in texts:
        if text is None:
            continue
        try:
            json.loads(text)
        except (TypeError, ValueError) as err:
            return (f"the store's record of this cell is unreadable ({type(err).__name__}: {err}); "
                    f"`medrobust run --retry-failed` computes it again")
    return None


def _readable(spec: str) -> str:
    """The spec's JSON where it is readable (the cell can still be placed), else an empty one."""
    return "{}" if _unreadable(spec) else spec


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def describe_spec(spec: dict) -> str:
    """A cell in one line, from its spec: model, attack, norm, epsilon, unit, objective, threat model (with its
    extractor, as the page names it: unless the default)."""
    epsilon = spec.get("epsilon")
    extractor = spec.get("extractor")
    # a store's table gives NaN for a cell written before extractors had names
    threat_model = str(spec.get("threat_model", "?")) + (
        f" ({extractor})" if isinstance(extractor, str) and extractor != DEFAULT_EXTRACTOR else "")
    return " ".join(str(part) for part in (
        spec.get("model", "?"), spec.get("attack", "?"), spec.get("norm", "?"),
        f"eps={epsilon:g}" if isinstance(epsilon, (int, float)) else "eps=?", spec.get("unit", "?"),
        spec.get("objective", "?"), threat_model))


def comparable_store(out: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cells of the store in ``out`` without what depends on the run rather than the cell
    (``RUN_DEPENDENT_CELL_FIELDS``, ``RUN_DEPENDENT_METRICS``; nested values as JSON text) and its per-subject rows,
    both in a fixed order: two runs that computed the same cells compare equal, bit for bit."""
    with ResultStore(out, create=False) as store:
        cells, samples = store.cells(), store.samples()
    cells = cells.drop(columns=[c for c in (*RUN_DEPENDENT_CELL_FIELDS, *RUN_DEPENDENT_METRICS) if c in cells])
    cells = cells.sort_values("id").reset_index(drop=True)
    cells = cells.map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
    return cells[sorted(cells.columns)], samples.sort_values(["cell_id", "subject"]).reset_index(drop=True)


class StoreBusyError(MedrobustError):
    """Another process is writing the store (it holds the writer's lock); try again once it has finished."""


def lock_path(store_path: Path) -> Path:
    """The writer's lock file beside a store file."""
    return store_path.with_name(store_path.name + LOCK_SUFFIX)


def _recorded_holder(path: Path) -> dict | None:
    """The writer recorded in a lock file (pid, host, started_at, command), or None when none is."""
    try:
        holder = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def lock_holder(store_path: Path) -> dict | None:
    """The process writing the store as its lock file records it (pid, host, started_at, command), or None when
    no writer is recorded or the one recorded is a process of this host that has ended (a killed run's lock is
    gone with it). Reads the file only: it never takes the lock, so it never stands in a writer's way."""
    holder = _recorded_holder(lock_path(store_path))
    if holder is not None and holder.get("host") == socket.gethostname():
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
    return holder


class _WriterLock:
    """The exclusive advisory lock of a store's one writer, held from acquisition to `release` (or the end of the
    process). The lock file stays in place; its content names the holder while held and is emptied on release."""

    def __init__(self, store_path: Path) -> None:
        self.path = lock_path(store_path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise MedrobustError(f"cannot open the store's lock file {self.path} ({err.strerror}); a run needs a "
                                 f"folder it can write") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            holder = _recorded_holder(self.path)
            who = (f"pid {holder['pid']} on {holder.get('host')}, started {holder.get('started_at')}" if holder
                   else "a run that is just starting")
            raise StoreBusyError(
                f"{store_path} is being written by another medrobust run ({who}); a store has one writer at a "
                f"time: wait for that run to finish (`medrobust status {store_path.parent}` shows where it is), "
                f"stop it, or give this run another `out` folder") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(),
                  "command": " ".join(sys.argv)}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # no holder recorded once released (a killed holder's record stays: stale)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


class ResultStore:
    """The SQLite results store of one run folder (``<run_dir>/results.sqlite``).

    ``writer``: take the store's writer lock for the store's lifetime (released by `close` or the end of the
    process), raising `StoreBusyError` when another process holds it. Default: a writer when ``create`` (the
    runner's ``ResultStore(out)``), a lock-free reader otherwise (``create=False``: the report, the status).
    """

    def __init__(self, run_dir: str | Path, create: bool = True, writer: bool | None = None) -> None:
        self.path = Path(run_dir) / STORE_FILENAME
        writer = create if writer is None else writer
        if not create and not self.path.is_file():
            raise MedrobustError(f"{run_dir} holds no results store ({STORE_FILENAME}); run `medrobust run` first")
        self._db: sqlite3.Connection | None = None
        self._lock: _WriterLock | None = None
        self._read_only = False
        try:
            # A reader opens the file read-only: an archived run in a read-only folder stays readable. A store of an
            # older schema is reopened for writing, to be migrated.
            if not writer and self.path.is_file() and self._open_read_only():
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _WriterLock(self.path) if writer else None
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._refuse_foreign()  # before anything is written into the file
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # The tables and a new store's version stamp in one transaction: a process killed while creating the
            # store leaves none or all of it (an older store keeps its stamp: INSERT OR IGNORE, then migrated).
            self._db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nINSERT OR IGNORE INTO meta VALUES "
                                   f"('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;")
            self._check_schema()
        except sqlite3.DatabaseError as err:
            self.close()
            raise MedrobustError(f"{self.path} is not a readable results store ({err})") from err
        except BaseException:
            self.close()
            raise

    def _open_read_only(self) -> bool:
        """Open the store read-only (``mode=ro``; ``immutable`` where its folder cannot be written, so that SQLite
        needs no shared-memory file beside it); True when it is at the current schema and ready to read."""
        queries = ["mode=ro"] + ([] if os.access(self.path.parent, os.W_OK) else ["immutable=1"])
        for query in queries:
            try:
                self._db = sqlite3.connect(f"{self.path.absolute().as_uri()}?{query}", uri=True, timeout=30.0,
                                           isolation_level=None)
                self._refuse_foreign()
            except sqlite3.OperationalError:
                self.close()
                continue
            self._read_only = True
            if self._schema_version() == SCHEMA_VERSION:
                return True
            if os.access(self.path.parent, os.W_OK):  # an older store in a writable folder: reopened to migrate
                self.close()
                self._read_only = False
                return False
            self._check_schema()  # an older store that cannot be migrated here: one line says so
        self._read_only = False
        return False

    def _schema_version(self) -> int | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet: a store another process is creating this instant
            return None
        return int(row[0]) if row is not None else None

    def _refuse_foreign(self) -> None:
        """Refuse, untouched, an SQLite file that is not a results store (another program's database)."""
        tables = sorted(name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        if not tables:
            return  # an empty file: a new store
        if "meta" in tables and "cells" in tables:
            try:
                if self._schema_version() is not None:
                    return
                if set(tables) <= _OUR_TABLES and self._db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 0:
                    return  # our tables, empty and unstamped: a store whose creation an older medrobust did not finish
            except (sqlite3.DatabaseError, ValueError):
                pass
        shown = ", ".join(tables[:6]) + (" ..." if len(tables) > 6 else "")
        raise MedrobustError(f"{self.path} is an SQLite file of another program (tables {shown}), not a medrobust "
                             f"results store; it was left untouched: move it away or give the run another `out`")

    def _check_schema(self) -> None:
        """Stamp a new store with the current schema version; migrate an older one in place, in one transaction
        (a store already at the current version is only read)."""
        db = self._db
        query = "SELECT value FROM meta WHERE key = 'schema_version'"
        row = db.execute(query).fetchone()
        if row is not None and int(row[0]) == SCHEMA_VERSION:
            return
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise MedrobustError(f"{self.path} has store schema {row[0]}; this medrobust reads up to "
                                 f"{SCHEMA_VERSION}: upgrade medrobust to read it")
        if self._read_only:
            raise MedrobustError(f"{self.path} has store schema {row[0] if row else '?'} and its folder is read-only; "
                                 f"copy the run folder somewhere writable and open it there to upgrade it")
        renamed: dict[str, str] = {}
        with self._transaction():
            row = db.execute(query).fetchone()  # again, inside the transaction: another process may have migrated
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise MedrobustError(f"{self.path} has store schema {row[0]}; this medrobust reads up to "
                                     f"{SCHEMA_VERSION}: upgrade medrobust to read it")
            if row is not None:
                present = {column[1] for column in db.execute("PRAGMA table_info(samples)")}
                for column, kind in _ADDED_SAMPLE_COLUMNS.items():
                    if column not in present:
                        db.execute(f"ALTER TABLE samples ADD COLUMN {column} {kind}")
                if int(row[0]) < 3:
                    renamed = self._rekey_cells()
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        folder = self.path.parent / EXAMPLES_FOLDER  # the page's example slices follow their cell's id
        for old, new in renamed.items():
            if (folder / f"{old}.npz").is_file():
                os.replace(folder / f"{old}.npz", folder / f"{new}.npz")

    def _rekey_cells(self) -> dict[str, str]:
        """Schema 3: each cell's id recomputed without its label, inside the caller's transaction. A cell whose id
        its spec does not give (an id of another scheme, an unreadable record) keeps its id; when two labels of one
        model collapse onto one id, the first cell written stays and the other goes. Returns old -> new ids."""
        db = self._db
        db.execute("PRAGMA defer_foreign_keys = ON")
        taken = {known for (known,) in db.execute("SELECT id FROM cells")}
        renamed = {}
        for old, text in db.execute("SELECT id, spec FROM cells ORDER BY rowid").fetchall():
            if _unreadable(text) or cell_id(json.loads(text), _NOT_IDENTITY_V2) != old:
                continue
            new = cell_id(json.loads(text))
            if new == old:
                continue
            if new in taken:  # the same model under a second label: its cell is already there
                for table, column in (("samples", "cell_id"), ("reliability", "cell_id"), ("cells", "id")):
                    db.execute(f"DELETE FROM {table} WHERE {column} = ?", (old,))
                continue
            for table, column in (("cells", "id"), ("samples", "cell_id"), ("reliability", "cell_id")):
                db.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (new, old))
            taken.add(new)
            renamed[old] = new
        return renamed

    def relabel(self, labels: dict[str, str]) -> int:
        """Give the cells ``labels`` (cell id -> the model's label in the config now) that label on the page and in
        exports, in one transaction; returns how many changed. A renamed model is relabelled, not recomputed."""
        changed = []
        for cell_id_, text in self._db.execute("SELECT id, spec FROM cells"):
            if cell_id_ in labels and not _unreadable(text):
                spec = json.loads(text)
                if spec.get("model") != labels[cell_id_]:
                    changed.append((json.dumps({**spec, "model": labels[cell_id_]}, sort_keys=True), cell_id_))
        if changed:
            with self._transaction() as db:
                db.executemany("UPDATE cells SET spec = ? WHERE id = ?", changed)
        return len(changed)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and release the writer's lock."""
        db, self._db = getattr(self, "_db", None), None
        if db is not None:
            db.close()
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def start_run(self, config: dict, environment: dict) -> str:
        """Record one invocation (its resolved config and environment); returns its id."""
        run_id = uuid.uuid4().hex[:12]
        self._db.execute("INSERT INTO runs (id, started_at, config, environment) VALUES (?, ?, ?, ?)",
                         (run_id, _now(), json.dumps(config, sort_keys=True), json.dumps(environment, sort_keys=True)))
        return run_id

    def finish_run(self, run_id: str) -> None:
        """Stamp the end time of an invocation."""
        self._db.execute("UPDATE runs SET finished_at = ? WHERE id = ?", (_now(), run_id))

    @contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE ... COMMIT, rolled back whatever interrupts it (an error, KeyboardInterrupt)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def statuses(self) -> dict[str, str]:
        """The status of every recorded cell: cell id -> 'done' or 'failed' (a cell not recorded is pending). A
        cell whose record cannot be read (its spec or metrics JSON damaged) counts as failed, so that
        ``--retry-failed`` computes it again."""
        return {cell_id: "failed" if _unreadable(spec, metrics) else status for cell_id, status, spec, metrics
                in self._db.execute("SELECT id, status, spec, metrics FROM cells ORDER BY rowid")}

    def finished_cells(self) -> set[str]:
        """Ids of the cells whose results are complete (status 'done')."""
        return {cell_id for cell_id, status in self.statuses().items() if status == "done"}

    def failures(self) -> list[dict]:
        """The cells recorded as failed, in the order they were written: id, run_id, error, seconds, finished_at
        and the parsed spec (model, attack, budget, threat model...)."""
        query = "SELECT id, run_id, status, error, seconds, finished_at, spec, metrics FROM cells ORDER BY rowid"
        failed = []
        for i, r, status, e, t, f, spec, metrics in self._db.execute(query):
            damage = _unreadable(spec, metrics)  # a damaged record counts as failed, with that reason
            if status == "failed" or damage:
                failed.append({"id": i, "run_id": r, "error": damage or e, "seconds": t, "finished_at": f,
                               "spec": json.loads(_readable(spec))})
        return failed

    def write_cell(self, cell_id: str, run_id: str, spec: dict, metrics: dict, samples: Iterable[dict],
                   seconds: float, status: str = "done", error: str | None = None) -> None:
        """Write a cell and its per-subject rows in ONE transaction, replacing any earlier attempt at it. A sample
        lacking a nullable column (l0, psnr, ssim, the certificate's) stores NULL there; one lacking a required
        column fails the whole write (NOT NULL), as does a key that is no column of the store."""
        rows = []
        for sample in samples:
            unknown = set(sample) - set(SAMPLE_COLUMNS)
            if unknown:
                raise MedrobustError(f"cell {cell_id}: per-subject values {sorted(unknown)} have no column in the "
                                     f"store (columns: {', '.join(SAMPLE_COLUMNS)})")
            rows.append((cell_id, *(sample.get(column) for column in SAMPLE_COLUMNS)))
        with self._transaction() as db:
            db.execute("DELETE FROM samples WHERE cell_id = ?", (cell_id,))
            db.execute("INSERT OR REPLACE INTO cells (id, run_id, status, spec, metrics, error, seconds, finished_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (cell_id, run_id, status, json.dumps(spec, sort_keys=True),
                        json.dumps(metrics, sort_keys=True), error, seconds, _now()))
            db.executemany(f"INSERT INTO samples (cell_id, {', '.join(SAMPLE_COLUMNS)}) "
                           f"VALUES (?, {', '.join('?' * len(SAMPLE_COLUMNS))})", rows)
            fault_point("committing")

    def write_reliability(self, flags: dict[str, list[str]]) -> None:
        """Replace the reliability checks' verdicts (reasons per possibly unreliable cell) in one transaction."""
        with self._transaction() as db:
            db.execute("DELETE FROM reliability")
            db.executemany("INSERT INTO reliability (cell_id, reasons) VALUES (?, ?)",
                           [(cell_id, json.dumps(reasons)) for cell_id, reasons in sorted(flags.items())])

    def runs(self) -> list[dict]:
        """Every invocation, oldest first, with its config and environment parsed."""
        query = "SELECT id, started_at, finished_at, config, environment FROM runs ORDER BY started_at, rowid"
        return [{"id": i, "started_at": s, "finished_at": f, "config": json.loads(c), "environment": json.loads(e)}
                for i, s, f, c, e in self._db.execute(query)]

    def cells(self) -> pd.DataFrame:
        """One row per cell: id, run_id, status, error, seconds, finished_at, reliability (the reliability checks'
        reasons to distrust it; empty when it passed them), then every spec and metric key as a column (a nested
        value such as the attack's params stays a dict)."""
        query = ("SELECT c.id, c.run_id, c.status, c.error, c.seconds, c.finished_at, r.reasons, c.spec, c.metrics "
                 "FROM cells c LEFT JOIN reliability r ON r.cell_id = c.id ORDER BY c.rowid")
        records = []
        for cell_id, run_id, status, error, seconds, finished_at, reasons, spec, metrics in self._db.execute(query):
            damage = _unreadable(spec, metrics, reasons)
            if damage:  # one damaged record is a failed cell with its reason, not a store nobody can read
                status, error, spec, metrics, reasons = "failed", damage, _readable(spec), "{}", None
            records.append({"id": cell_id, "run_id": run_id, "status": status, "error": error, "seconds": seconds,
                            "finished_at": finished_at, "reliability": json.loads(reasons) if reasons else [],
                            **json.loads(spec), **json.loads(metrics)})
        return pd.DataFrame.from_records(records)

    def samples(self, cell_id: str | None = None) -> pd.DataFrame:
        """Per-subject rows, of one cell or of all."""
        columns = ", ".join(("cell_id",) + SAMPLE_COLUMNS)
        if cell_id is None:
            return pd.read_sql_query(f"SELECT {columns} FROM samples ORDER BY rowid", self._db)
        return pd.read_sql_query(f"SELECT {columns} FROM samples WHERE cell_id = ? ORDER BY rowid", self._db,
                                 params=(cell_id,))
