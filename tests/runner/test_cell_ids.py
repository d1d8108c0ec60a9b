"""Cell ids survive a change of the code's shape: a store written before the package's redesign (the fixture of
tests/runner/fixtures/pre_redesign, made by its build.py) re-runs with today's code without computing a single cell."""

from __future__ import annotations

import dataclasses
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


def test_the_same_grid_computed_afresh_gives_the_stored_results(tmp_path: Path, monkeypatch) -> None:
    # The code's reshaping moved no number: every cell of the fixture, computed again by today's code into a new
    # store, matches what the code before the redesign wrote (to float rounding of another machine's kernels).
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    config = load_config("config.toml")
    with ResultStore(config.out) as store:
        before = store.samples().sort_values(["cell_id", "subject"]).reset_index(drop=True)
    fresh = dataclasses.replace(config, out=tmp_path / "fresh")
    summary = run(fresh, progress=False, echo=lambda line: None)
    assert summary.done == 104 and not summary.failed
    with ResultStore(fresh.out) as store:
        after = store.samples().sort_values(["cell_id", "subject"]).reset_index(drop=True)
    assert list(after["cell_id"]) == list(before["cell_id"]) and list(after["subject"]) == list(before["subject"])
    for column in ("clean_prediction", "adversarial_prediction", "deviation"):
        assert (after[column] - before[column]).abs().max() < 1e-3, column
    for column in ("linf", "l2", "l0"):
        assert ((after[column] - before[column]).abs() <= 1e-3 * before[column].abs() + 1e-6).all(), column


def test_force_and_only_recompute_chosen_cells_on_purpose(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from medrobust.cli import main

    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    with ResultStore("out") as store:
        before = {row["id"]: row["finished_at"] for _, row in store.cells().iterrows()}
    # cnn3d has no context features: fgsm meets it under fixed only, at 2 budgets and 2 objectives.
    result = CliRunner().invoke(main, ["run", "config.toml", "--quiet", "--no-report", "--force", "--only",
                                       "cnn3d fgsm *"])
    assert result.exit_code == 0, result.output
    assert "4 cells run, 0 already finished" in result.output
    with ResultStore("out") as store:
        after = {row["id"]: row["finished_at"] for _, row in store.cells().iterrows()}
        fgsm = set(store.cells().query("model == 'cnn3d' and attack == 'fgsm'")["id"])
    assert set(after) == set(before) and len(fgsm) == 4
    assert {i for i in after if after[i] != before[i]} == fgsm  # those four, and only they, computed again
    # --only alone runs the matching pending cells: none here; a pattern that matches nothing is one line.
    again = CliRunner().invoke(main, ["run", "config.toml", "--quiet", "--no-report", "--only", "cnn3d fgsm *"])
    assert "0 cells run, 4 already finished" in again.output
    nothing = CliRunner().invoke(main, ["run", "config.toml", "--quiet", "--no-report", "--only", "resnet *"])
    assert nothing.exit_code == 2 and "matches no cell" in nothing.stderr
