"""Crash safety: a `medrobust run` SIGKILLed at chosen points (deterministically, through ``MEDROBUST_FAULT``) or at
random times, and resumed each time, ends with exactly the store an uninterrupted run writes."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from medrobust.cli import main
from medrobust.results.store import (
    SAMPLE_COLUMNS,
    ResultStore,
    comparable_store,
    lock_holder,
)

pytestmark = pytest.mark.slow

# FGSM at four budgets and two objectives: 8 quick cells.
TOP = 'batch_size = 1\nseed = 5\nobjective = ["older", "younger"]\n'
GRID = """
[[budgets]]
norm = "linf"
epsilon = [1e-3, 4e-3]

[[budgets]]
norm = "l2"
epsilon = [0.5, 2.0]

[[attacks]]
name = "fgsm"
"""
N_CELLS, N_SUBJECTS = 8, 3
KILLS = 4
SEED = 20261126


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_config) -> Path:
    """The folder of the whole test (a tiny run: the built-in cohort and one cnn3d trained for one epoch, made by
    the first run and shared by the later ones; 3 test subjects attacked): the cohort and the model the first
    run made, and that run's store in 'a'."""
    root = tmp_path_factory.mktemp("resume")
    result = CliRunner().invoke(main, ["run", str(tiny_config(root, "a", TOP, GRID)), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    assert f"{N_CELLS} cells run, 0 already finished, 0 failed" in result.output
    return root


def _done(out: Path) -> int:
    """Cells recorded as done in a store being written (0 while there is no store yet)."""
    if not (out / "results.sqlite").is_file():
        return 0
    with ResultStore(out, create=False) as store:
        return sum(status == "done" for status in store.statuses().values())


def _check_whole_cells(out: Path) -> None:
    """The store is sound and holds whole cells only: every done cell with all its subjects, nothing else."""
    db = sqlite3.connect(out / "results.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        per_cell = dict(db.execute("SELECT c.id, COUNT(s.subject) FROM cells c LEFT JOIN samples s "
                                   "ON s.cell_id = c.id GROUP BY c.id"))
        assert set(per_cell.values()) <= {N_SUBJECTS}
        assert db.execute("SELECT COUNT(*) FROM samples WHERE cell_id NOT IN (SELECT id FROM cells)").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM cells WHERE status != 'done'").fetchone() == (0,)
    finally:
        db.close()


# (point, its n-th time, cells done after the kill): each run starts where the previous one was killed. planned:
# before the run is recorded; attacked: after a cell's attack, before the store (cell 1 written, cell 2 lost);
# committing: inside the store's transaction (two more committed, the third rolled back); written: after a commit.
KILL_POINTS = [("planned", 1, 0), ("attacked", 2, 1), ("committing", 3, 3), ("written", 2, 5)]


def test_a_run_killed_at_chosen_points_resumes_to_the_uninterrupted_result(uninterrupted, tiny_config):
    root = uninterrupted
    config_c, out_c = tiny_config(root, "c", TOP, GRID), root / "c"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
    command = [sys.executable, "-m", "medrobust.cli", "run", str(config_c), "--quiet", "--no-report"]
    for point, count, done in KILL_POINTS:
        killed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**env, "MEDROBUST_FAULT": f"{point}:{count}"})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout + killed.stderr)
        assert _done(out_c) == done, point  # a kill loses the cell in flight, never a written one
        _check_whole_cells(out_c)
        assert lock_holder(out_c / "results.sqlite") is None  # the lock went with the process
    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{N_CELLS - 5} cells run, 5 already finished" in resumed.stdout
    cells_a, samples_a = comparable_store(root / "a")
    cells_c, samples_c = comparable_store(out_c)
    pd.testing.assert_frame_equal(cells_c, cells_a, check_exact=True)
    pd.testing.assert_frame_equal(samples_c, samples_a, check_exact=True)


def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_result(uninterrupted, tiny_config):
    # The random-time kills, kept beside the chosen points above: where they land depends on the machine's load,
    # so nothing here asks that one landed mid-grid (the chosen points see to that).
    root = uninterrupted
    config_b, out_b = tiny_config(root, "b", TOP, GRID), root / "b"
    with ResultStore(root / "a", create=False) as store:
        cell_seconds = float(store.cells()["seconds"].median())
    rng = random.Random(SEED)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
    command = [sys.executable, "-m", "medrobust.cli", "run", str(config_b), "--quiet", "--no-report"]
    history = []  # (done before, done after, exit code) per kill
    for kill in range(KILLS):
        before = _done(out_b)
        if before == N_CELLS:
            break
        # Kill after 0-2 new cells (the first time after at least one, so that a kill lands mid-grid), then a
        # random part of a cell later: while planning, while attacking, or while a cell is being written.
        wait_for = rng.randint(1 if kill == 0 else 0, 2)
        delay = rng.uniform(0.0, 1.0) * cell_seconds
        with open(root / f"b-{kill}.log", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 120
            while _done(out_b) < min(before + wait_for, N_CELLS) and process.poll() is None:
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.02)
            if _done(out_b) > before:  # it has written a cell, so it holds the store's writer lock until it ends
                holder = lock_holder(out_b / "results.sqlite")
                if process.poll() is None:
                    assert holder is not None and holder["pid"] == process.pid
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            process.wait()
        after = _done(out_b)
        assert after >= before  # a kill loses at most the cells in flight, never a written one
        _check_whole_cells(out_b)
        history.append((before, after, process.returncode))
    assert all(code == -signal.SIGKILL or after == N_CELLS for _, after, code in history), history
    # The killed runs' lock went with them: nobody is recorded as writing, and the next run takes the lock.
    assert lock_holder(out_b / "results.sqlite") is None

    result = CliRunner().invoke(main, ["status", str(out_b)])
    assert result.exit_code == 0, result.output
    assert f"{_done(out_b)} cells done, 0 failed" in result.output
    if any(code == -signal.SIGKILL for *_, code in history):
        assert "did not finish (stopped or killed)" in result.output

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _check_whole_cells(out_b)
    cells_a, samples_a = comparable_store(root / "a")
    cells_b, samples_b = comparable_store(out_b)
    assert len(cells_a) == N_CELLS and len(samples_a) == N_CELLS * N_SUBJECTS
    assert list(samples_a.columns) == ["cell_id", *SAMPLE_COLUMNS]
    # Same cells (ids, status, spec, metrics), same per-subject rows to the bit: the CPU run is deterministic.
    pd.testing.assert_frame_equal(cells_b, cells_a, check_exact=True)
    pd.testing.assert_frame_equal(samples_b, samples_a, check_exact=True)

