"""Cell ids survive a change of the code's shape: a store written before the package's redesign (the fixture of
tests/runner/fixtures/pre_redesign, made by its build.py) re-runs with today's code computing only the cells of an
attack that gained an argument since (l0's ranking); the rest keep their ids and numbers."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pandas as pd

from medrobust.results.store import ResultStore
from medrobust.runner import plan, run
from medrobust.runner.config import load_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_redesign"


def test_a_store_written_before_the_redesign_reruns_only_the_attacks_that_changed(tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    config = load_config("config.toml")
    with ResultStore(config.out) as store:
        stored = set(store.statuses())
    assert len(stored) == 104
    # An attack that gained an argument since is another attack's identity: l0's `ranking` (set here to the walk
    # the fixture recorded) re-runs its cells, and only those.
    planned = plan(config)
    gained = {cell.id for cell in planned if cell.attack.name == "l0"}
    assert {cell.id for cell in planned} - gained == stored - stored_ids_of(config.out, "l0")
    assert not gained & stored and len(gained) == len(stored_ids_of(config.out, "l0")) > 0
    summary = run(config, progress=False, echo=lambda line: None)
    assert (summary.cells, summary.done, summary.skipped, summary.failed) == (
        104, len(gained), 104 - len(gained), [])


def stored_ids_of(out: Path, attack: str) -> set[str]:
    with ResultStore(out) as store:
        cells = store.cells()
    return set(cells[cells["attack"] == attack]["id"])


def by_setting(out: Path) -> pd.DataFrame:
    """A store's per-subject rows keyed by their cell's setting (model, attack, budget, objective, threat model)
    instead of its id, sorted."""
    with ResultStore(out) as store:
        cells, samples = store.cells(), store.samples()
    key = cells.set_index("id")[["model", "attack", "norm", "epsilon", "objective", "threat_model"]].astype(str)
    samples["setting"] = samples["cell_id"].map(lambda cell_id: " ".join(key.loc[cell_id]))
    return samples.sort_values(["setting", "subject"]).reset_index(drop=True)


def test_the_same_grid_computed_afresh_gives_the_stored_results(tmp_path: Path, monkeypatch) -> None:
    # The code's reshaping moved no number: every cell of the fixture, computed again by today's code into a new
    # store, matches what the code before the redesign wrote (to float rounding of another machine's kernels), but
    # one fix: under `recomputed` the fixture's missing field strength (NaN) made the extractor's gradient NaN
    # for every voxel, which weakened every attack there; with the NaN kept out, each of them is stronger.
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    config = load_config("config.toml")
    before = by_setting(config.out)
    fresh = dataclasses.replace(config, out=tmp_path / "fresh")
    summary = run(fresh, progress=False, echo=lambda line: None)
    assert summary.done == 104 and not summary.failed
    after = by_setting(fresh.out)
    assert list(after["setting"]) == list(before["setting"]) and list(after["subject"]) == list(before["subject"])
    fixed = ~after["setting"].str.endswith(" recomputed")
    assert (after["clean_prediction"] - before["clean_prediction"]).abs().max() < 1e-3
    for column in ("adversarial_prediction", "deviation"):
        assert (after[column] - before[column])[fixed].abs().max() < 1e-3, column
    for column in ("linf", "l2", "l0"):
        close = (after[column] - before[column]).abs() <= 1e-3 * before[column].abs() + 1e-6
        assert close[fixed].all(), column
    recomputed = ~fixed & after["setting"].str.startswith("hybrid e2e")
    assert recomputed.sum() == (~fixed).sum() > 0  # cnn3d takes no features: no recomputed cells
    gain = after["deviation"].abs() - before["deviation"].abs()
    noise = after["setting"].str.contains(" noise ")  # no gradient: the same draws, the same numbers
    assert gain[recomputed & ~noise].min() > 1.0 and gain[recomputed & noise].abs().max() < 1e-3


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
