"""Cell ids survive a change of the code's shape: a store written before the package's redesign (the fixture of
tests/fixtures/pre_redesign, made by its build.py) re-runs with today's code without computing a single cell."""

from __future__ import annotations

import shutil
from pathlib import Path

from medrobust.results.store import ResultStore
from medrobust.runner import plan, run
from medrobust.runner.config import load_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_redesign"


def test_a_store_written_before_the_redesign_reruns_with_no_cell_computed(tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    config = load_config("config.toml")
    with ResultStore(config.out) as store:
        stored = set(store.statuses())
    assert len(stored) == 104
    assert {cell.id for cell in plan(config)} == stored
    summary = run(config, progress=False, echo=lambda line: None)
    assert (summary.cells, summary.done, summary.skipped, summary.failed) == (104, 0, 104, [])
