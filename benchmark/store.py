"""The results store: one SQLite file (WAL) per run folder, written only by the runner.

Tables: ``runs`` (config and environment of each invocation), ``cells`` (one row per cell: its parameters,
status, timing and summary metrics) and ``samples`` (one row per subject of a cell). A cell and its samples are
written in one transaction, so a store never holds half a cell.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from medrobust.errors import MedrobustError

STORE_FILENAME = "results.sqlite"
SCHEMA_VERSION = 1

# Per-subject columns of the samples table, in order.
SAMPLE_COLUMNS = ("subject", "true_age", "clean_prediction", "adversarial_prediction", "deviation",
                  "linf", "l2", "linf_rel", "l2_rel")

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
    PRIMARY KEY (cell_id, subject)
);
CREATE TABLE IF NOT EXISTS reliability (
    cell_id TEXT PRIMARY KEY REFERENCES cells(id),
    reasons TEXT NOT NULL
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultStore:
    """The SQLite results store of one run folder (``<run_dir>/results.sqlite``)."""

    def __init__(self, run_dir: str | Path, create: bool = True) -> None:
        self.path = Path(run_dir) / STORE_FILENAME
        if not create and not self.path.is_file():
            raise MedrobustError(f"{run_dir} holds no results store ({STORE_FILENAME}); run `medrobust run` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as err:
            raise MedrobustError(f"{self.path} is not a readable results store ({err})") from err
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise MedrobustError(f"{self.path} has store schema {row[0]}; this medrobust reads up to {SCHEMA_VERSION}")

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def start_run(self, config: dict, environment: dict) -> str:
        """Record one invocation (its resolved config and environment); returns its id."""
        run_id = uuid.uuid4().hex[:12]
        self._db.execute("INSERT INTO runs (id, started_at, config, environment) VALUES (?, ?, ?, ?)",
                         (run_id, _now(), json.dumps(config, sort_keys=True), json.dumps(environment, sort_keys=True)))
        return run_id

    def finish_run(self, run_id: str) -> None:
        """Stamp the end time of an invocation."""
        self._db.execute("UPDATE runs SET finished_at = ? WHERE id = ?", (_now(), run_id))

    def finished_cells(self) -> set[str]:
        """Ids of the cells whose results are complete (status 'done')."""
        return {row[0] for row in self._db.execute("SELECT id FROM cells WHERE status = 'done'")}

    def write_cell(self, cell_id: str, run_id: str, spec: dict, metrics: dict, samples: Iterable[dict],
                   seconds: float, status: str = "done", error: str | None = None) -> None:
        """Write a cell and its per-subject rows in ONE transaction, replacing any earlier attempt at it."""
        rows = [tuple(sample[c] for c in SAMPLE_COLUMNS) for sample in samples]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM samples WHERE cell_id = ?", (cell_id,))
            db.execute("INSERT OR REPLACE INTO cells (id, run_id, status, spec, metrics, error, seconds, finished_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (cell_id, run_id, status, json.dumps(spec, sort_keys=True),
                        json.dumps(metrics, sort_keys=True), error, seconds, _now()))
            db.executemany(f"INSERT INTO samples (cell_id, {', '.join(SAMPLE_COLUMNS)}) "
                           f"VALUES (?, {', '.join('?' * len(SAMPLE_COLUMNS))})",
                           [(cell_id, *row) for row in rows])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def write_reliability(self, flags: dict[str, list[str]]) -> None:
        """Replace the sanity-check verdicts (reasons per possibly unreliable cell) in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM reliability")
            db.executemany("INSERT INTO reliability (cell_id, reasons) VALUES (?, ?)",
                           [(cell_id, json.dumps(reasons)) for cell_id, reasons in sorted(flags.items())])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def runs(self) -> list[dict]:
        """Every invocation, oldest first, with its config and environment parsed."""
        query = "SELECT id, started_at, finished_at, config, environment FROM runs ORDER BY started_at, rowid"
        return [{"id": i, "started_at": s, "finished_at": f, "config": json.loads(c), "environment": json.loads(e)}
                for i, s, f, c, e in self._db.execute(query)]

    def cells(self) -> pd.DataFrame:
        """One row per cell: id, run_id, status, error, seconds, finished_at, reliability (the sanity checks'
        reasons to distrust it; empty when it passed them), then every spec and metric key as a column (a nested
        value such as the attack's params stays a dict)."""
        query = ("SELECT c.id, c.run_id, c.status, c.error, c.seconds, c.finished_at, r.reasons, c.spec, c.metrics "
                 "FROM cells c LEFT JOIN reliability r ON r.cell_id = c.id ORDER BY c.rowid")
        records = []
        for cell_id, run_id, status, error, seconds, finished_at, reasons, spec, metrics in self._db.execute(query):
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
