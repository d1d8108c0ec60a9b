"""Cell ids survive a change of the code's shape: a store written before the package's redesign (the fixture of
tests/runner/fixtures/pre_redesign, made by its build.py) re-runs with today's code computing only the cells of an
attack that gained an argument since (l0's ranking); the rest keep their ids and numbers."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pandas as pd
import pytest

from medrobust.errors import MedrobustError
from medrobust.results.store import ResultStore, describe_spec
from medrobust.runner import plan, run
from medrobust.runner.cells import Cell, is_set_level, sharing_groups
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
    # Since store schema 3 a cell's seed no longer derives from its model's label (a display name): each cell is
    # given the seed the fixture recorded for it, so that random starts and noise draw as they did then.
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    config = load_config("config.toml")
    before = by_setting(config.out)
    with ResultStore(config.out) as store:
        recorded = {describe_spec(row): row["cell_seed"] for row in store.cells().to_dict("records")}
    assert len(recorded) == 104
    monkeypatch.setattr(Cell, "seed", property(lambda cell: recorded[cell.describe()]))
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


def test_renaming_a_model_relabels_its_cells_without_recomputing_them(tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    config = load_config("config.toml")
    run(config, progress=False, echo=lambda line: None)  # the cells of l0, the only ones pending
    Path("renamed.toml").write_text(Path("config.toml").read_text().replace('label = "hybrid e2e"',
                                                                             'label = "e2e, renamed"'))
    renamed = load_config("renamed.toml")
    said: list[str] = []
    summary = run(renamed, progress=False, echo=said.append)
    assert (summary.cells, summary.done, summary.skipped, summary.failed) == (104, 0, 104, [])
    planned = {cell.id: cell.model for cell in plan(renamed)}
    assert sum(label == "e2e, renamed" for label in planned.values()) > 0
    assert any(line.endswith("stored cells take their model's label in renamed.toml") for line in said)
    with ResultStore(config.out) as store:
        cells = store.cells().set_index("id")
    assert {cell: cells.loc[cell, "model"] for cell in planned} == planned  # the page names it once, renamed


def test_one_model_under_two_labels_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    Path("twice.toml").write_text(Path("config.toml").read_text() + '\n[[models]]\nname = "cnn3d"\nlabel = "copy"\n'
                                  'checkpoint = "models/cnn3d"\ntrain_if_missing = false\n')
    with pytest.raises(MedrobustError, match="models 'cnn3d' and 'copy' are the same model .*keep one"):
        plan(load_config("twice.toml"))


def test_threads_set_torch_for_the_run_are_recorded_and_restored(tmp_path: Path, monkeypatch) -> None:
    import torch

    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    Path("threads.toml").write_text("threads = 1\n" + Path("config.toml").read_text())
    before = torch.get_num_threads()
    summary = run(load_config("threads.toml"), progress=False, echo=lambda line: None)
    assert summary.done > 0 and torch.get_num_threads() == before  # a notebook's setting is given back
    with ResultStore(summary.out) as store:
        assert store.runs()[-1]["environment"]["cpu_threads"] == 1


def test_cells_are_grouped_only_with_those_that_differ_in_their_budget(tmp_path: Path, monkeypatch) -> None:
    # The groups whose calls share their passes at the clean images (share_clean_passes): every cell in one group,
    # a group's cells alike but for their budget (and the seed drawn from it), a universal perturbation's alone.
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    monkeypatch.chdir(tmp_path / "fixture")
    cells = plan(load_config("config.toml"))
    groups = sharing_groups(cells)
    assert sorted(cell.id for group in groups for cell in group) == sorted(cell.id for cell in cells)
    assert 1 < len(groups) < len(cells)
    for group in groups:
        first = group[0]
        assert all((c.model, c.attack, c.objective, c.threat_model, c.extractor)
                   == (first.model, first.attack, first.objective, first.threat_model, first.extractor) for c in group)
        assert len({(c.budget.norm, c.budget.epsilon) for c in group}) == len(group)
        if is_set_level(first.attack.name):
            assert len(group) == 1
    assert max(len(group) for group in groups) > 1
    assert all(len(group) == 1 for group in sharing_groups(cells, share=False))
