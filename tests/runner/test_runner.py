"""End to end: `medrobust run` on a tiny built-in cohort (train if missing, attack, store), then `report`."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from medrobust.cli import main
from medrobust.data import load_prepared
from medrobust.devices import resolve_device
from medrobust.models import load_checkpoint
from medrobust.results.store import ResultStore, comparable_store
from medrobust.runner.cells import expand_cells
from medrobust.runner.config import load_config

CONFIG = """
out = "{out}"
batch_size = 2
seed = 3
threat_model = ["fixed", "perturbed", "recomputed"]

{tables}
[[models]]
name = "cnn3d"

[[models]]
name = "hybrid"

[[models]]
name = "hybrid_e2e"
label = "<script>alert(1)</script>"

[[budgets]]
norm = "linf"
epsilon = [1e-3, 2e-3]

[[budgets]]
norm = "l2"
epsilon = [0.5]

[[attacks]]
name = "fgsm"

[[attacks]]
name = "pgd"
steps = 2
random_start = false
"""
# models x attacks x budgets under "fixed", and the two hybrids again under "perturbed" and "recomputed" (cnn3d
# has no features)
N_CELLS = 3 * 2 * 3 + 2 * 2 * 3 * 2


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_run_tables):
    """A finished run folder and the CLI output of the run."""
    root = tmp_path_factory.mktemp("run")
    config = root / "tiny.toml"
    tables = tiny_run_tables(root / "cohort", 3)
    config.write_text(CONFIG.replace("{out}", str(root / "out")).replace("{tables}", tables))
    result = CliRunner().invoke(main, ["run", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    return root, config, result.output


def test_run_trains_missing_models_and_fills_the_store(demo_run):
    root, _, output = demo_run
    out = root / "out"
    for name in ("cnn3d", "hybrid", "hybrid_e2e"):
        assert (out / "models" / f"{name}-seed0.safetensors").is_file()
    assert f"{N_CELLS} cells run, 0 already finished, 0 failed" in output
    with ResultStore(out, create=False) as store:
        cells = store.cells()
        samples = store.samples()
        runs = store.runs()
    assert len(cells) == N_CELLS and set(cells["status"]) == {"done"}
    assert len(samples) == N_CELLS * 3 and cells["id"].is_unique
    assert set(cells["model"]) == {"cnn3d", "hybrid", "<script>alert(1)</script>"}
    environment = runs[0]["environment"]
    # The config says device "auto": CUDA where present (the suite also runs on GPU machines), else the CPU.
    assert environment["torch"] == torch.__version__ and environment["device"] == str(resolve_device("auto"))
    assert "medrobust" in environment["packages"]
    for _, cell in cells.iterrows():
        rows = samples[samples["cell_id"] == cell["id"]]
        assert len(rows) == 3 and cell["n"] == 3
        # The stored summary is what its rows say.
        adversarial_error = (rows["adversarial_prediction"] - rows["true_age"]).abs()
        assert cell["adversarial_mae"] == pytest.approx(adversarial_error.mean())
        assert cell["mean_abs_deviation"] == pytest.approx(rows["deviation"].abs().mean())
        assert (rows["deviation"] - (rows["adversarial_prediction"] - rows["clean_prediction"])).abs().max() < 1e-9
        # Budgets hold in the stored norms (unit "range": relative to each image's range).
        norm = rows["linf_rel"] if cell["norm"] == "linf" else rows["l2_rel"]
        assert (norm <= cell["epsilon"] * (1 + 1e-5)).all()
        assert cell["forward"] > 0 and cell["backward"] > 0 and cell["attack_seconds"] > 0
        assert cell["params"]["budget"]["epsilon"] == cell["epsilon"]
        # "older": the attack never made the prediction younger.
        assert (rows["deviation"] >= -1e-4).all()
        # The context features move only under "perturbed", and then within their 5 % budget.
        if cell["model"] == "cnn3d":
            assert cell["threat_model"] == "fixed" and math.isnan(cell.get("mean_feature_change_rel", math.nan))
        elif cell["threat_model"] == "fixed":
            assert cell["mean_feature_change_rel"] == 0
        elif cell["threat_model"] == "perturbed":
            assert 0 < cell["mean_feature_change_rel"] <= 0.05 * (1 + 1e-5)
        else:  # recomputed: the volumes measured on the attacked image moved
            assert cell["mean_feature_change_rel"] > 0


def test_clean_predictions_match_the_checkpoint(demo_run):
    root, config_path, _ = demo_run
    out = root / "out"
    model, _ = load_checkpoint(out / "models" / "cnn3d-seed0")
    with ResultStore(out, create=False) as store:
        cells, samples = store.cells(), store.samples()
    data = load_prepared(root / "cohort", progress=False)[2]
    first = cells[cells["model"] == "cnn3d"].iloc[0]
    rows = samples[samples["cell_id"] == first["id"]]
    subset = data.subset(list(rows["subject"]))
    with torch.no_grad():
        predicted = model(subset.images, None)
    assert torch.allclose(predicted.double(), torch.tensor(rows["clean_prediction"].to_numpy()), atol=1e-4)
    assert list(rows["true_age"]) == pytest.approx(subset.ages.tolist())
    # Every cell of one model saw the same subjects and the same clean predictions.
    for cell_id in cells[cells["model"] == "cnn3d"]["id"]:
        other = samples[samples["cell_id"] == cell_id]
        assert list(other["subject"]) == list(rows["subject"])
        assert list(other["clean_prediction"]) == pytest.approx(list(rows["clean_prediction"]), abs=1e-5)


def test_rerun_skips_finished_cells_and_says_so(demo_run):
    root, config_path, _ = demo_run
    result = CliRunner().invoke(main, ["run", str(config_path), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    assert f"{N_CELLS} of {N_CELLS} cells already finished" in result.output
    assert f"0 cells run, {N_CELLS} already finished" in result.output
    with ResultStore(root / "out", create=False) as store:
        assert len(store.cells()) == N_CELLS and len(store.samples()) == N_CELLS * 3
        assert len(store.runs()) == 1  # an invocation that runs nothing records no run
    # The page is left as it is when nothing ran and it is newer than the store; rewritten when it is missing.
    page = root / "out" / "leaderboard.html"
    written = page.stat().st_mtime_ns
    result = CliRunner().invoke(main, ["run", str(config_path), "--quiet"])
    assert result.exit_code == 0 and f"leaderboard: {page}" in result.output
    assert page.stat().st_mtime_ns == written
    page.unlink()
    result = CliRunner().invoke(main, ["run", str(config_path), "--quiet"])
    assert result.exit_code == 0 and page.is_file()


def test_cell_ids_depend_on_what_decides_the_result(demo_run):
    _, config_path, _ = demo_run
    config = load_config(config_path)
    base = {"cnn3d": {"model": "cnn3d", "model_name": "cnn3d"}, "hybrid": {"model": "hybrid", "model_name": "hybrid"},
            "<script>alert(1)</script>": {"model": "e2e", "model_name": "hybrid_e2e"}}
    uses_features = {"cnn3d": False, "hybrid": True, "<script>alert(1)</script>": True}
    cells = expand_cells(config, base, uses_features)
    assert len(cells) == N_CELLS and len({c.id for c in cells}) == N_CELLS
    again = expand_cells(config, base, uses_features)
    assert [c.id for c in cells] == [c.id for c in again]
    # Where a result is stored or which device ran it does not change its identity; the data does.
    cell = cells[0]
    before = cell.id
    cell.spec["device"], cell.spec["checkpoint"] = "cuda:0", "/elsewhere"
    assert cell.id == before
    # The label is a display name: renaming the model keeps its cells.
    cell.spec["model"] = "renamed"
    assert cell.id == before
    cell.spec["data_fingerprint"] = "other"
    assert cell.id != before


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(demo_run, tmp_path, monkeypatch):
    root, config_path, _ = demo_run
    out = tmp_path / "out"
    shutil.copytree(root / "out" / "models", out / "models")  # no retraining
    text = config_path.read_text().replace(str(root / "out"), str(out))
    config = tmp_path / "again.toml"
    config.write_text(text)

    import medrobust.runner.execute as execute

    original = execute.run_cells

    def flaky(cells, model, *args, **kwargs):
        if cells[0].model == "hybrid" and cells[0].attack.name == "pgd":
            raise RuntimeError("simulated failure")
        return original(cells, model, *args, **kwargs)

    monkeypatch.setattr(execute, "run_cells", flaky)
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report"])
    assert result.exit_code == 1
    assert "FAILED hybrid pgd" in result.output and "simulated failure" in result.output
    with ResultStore(out, create=False) as store:
        cells = store.cells()
    failed = cells[cells["status"] == "failed"]
    assert len(failed) == 9 and set(failed["attack"]) == {"pgd"}  # 3 budgets x 3 threat models
    assert (failed["error"] == "RuntimeError: simulated failure").all()
    assert (cells["status"] == "done").sum() == N_CELLS - 9
    # A re-run skips the failed cells and says so; once the cause is gone, --retry-failed does only them.
    monkeypatch.setattr(execute, "run_cells", original)
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report"])
    assert "9 cells failed in an earlier run; skipping them" in result.output
    with ResultStore(out, create=False) as store:
        assert (store.cells()["status"] == "failed").sum() == 9
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report", "--retry-failed"])
    assert result.exit_code == 0, result.output
    assert f"9 cells run, {N_CELLS - 9} already finished, 0 failed" in result.output


def test_cells_that_differ_only_in_their_budget_share_clean_passes_and_keep_their_rows(demo_run, tmp_path):
    # The run shared its passes at the clean images between the budgets of one model, attack and threat model
    # (share_clean_passes, the default): the same grid with every cell alone stores the same cells and rows, bit
    # for bit, for every model and threat model of the grid.
    root, config_path, _ = demo_run
    out = tmp_path / "alone"
    shutil.copytree(root / "out" / "models", out / "models")  # no retraining
    config = tmp_path / "alone.toml"
    config.write_text("share_clean_passes = false\n" + config_path.read_text().replace(str(root / "out"), str(out)))
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    cells_alone, samples_alone = comparable_store(out)
    cells_shared, samples_shared = comparable_store(root / "out")
    assert len(cells_alone) == N_CELLS
    where = ["checkpoint"]  # where each run found the model: its copy
    pd.testing.assert_frame_equal(cells_shared.drop(columns=where), cells_alone.drop(columns=where), check_exact=True)
    pd.testing.assert_frame_equal(samples_shared, samples_alone, check_exact=True)
    # Each batch's clean passes served the three budgets of a group (fgsm's gradient pass, pgd's first step).
    with ResultStore(root / "out", create=False) as store:
        assert (store.cells()["shared_clean_passes"] == 3).all()
    with ResultStore(out, create=False) as store:
        assert "shared_clean_passes" not in store.cells()


def test_the_progress_bar_counts_cells_also_when_they_are_computed_together(demo_run, tmp_path):
    root, config_path, _ = demo_run
    out = tmp_path / "out"
    shutil.copytree(root / "out" / "models", out / "models")  # no retraining
    config = tmp_path / "again.toml"
    config.write_text(config_path.read_text().replace(str(root / "out"), str(out)))
    result = CliRunner().invoke(main, ["run", str(config), "--no-report", "--only", "cnn3d fgsm *"])
    assert result.exit_code == 0, result.output
    assert "3 cells run" in result.output
    assert "3/3 [" in result.stderr and "4/3" not in result.stderr  # one group of three cells


def test_report_page_and_csv(demo_run):
    root, _, output = demo_run
    out = root / "out"
    page = out / "leaderboard.html"
    assert f"leaderboard: {page}" in output and page.is_file()
    html = page.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html
    table = pd.read_csv(out / "results.csv")
    assert len(table) == N_CELLS
    assert set(table["attack"]) == {"fgsm", "pgd"} and not table["mean_abs_deviation"].map(math.isnan).any()
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0 and str(page) in result.output
    result = CliRunner().invoke(main, ["report", str(root / "nothing-here")])
    assert result.exit_code == 2 and "no results store" in result.output


def test_a_universal_perturbation_is_fitted_on_one_split_and_evaluated_on_held_out_subjects(demo_run, tmp_path):
    root, config_path, _ = demo_run
    out = tmp_path / "out"
    shutil.copytree(root / "out" / "models", out / "models")  # no retraining
    text = config_path.read_text().replace(str(root / "out"), str(out)).replace("count = 3", "count = 3\nfit_count = 4")
    text = text[:text.index("[[attacks]]")] + '[[attacks]]\nname = "universal"\nsteps = 2\n'
    config = tmp_path / "universal.toml"
    config.write_text(text.replace('threat_model = ["fixed", "perturbed", "recomputed"]', ""))
    result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    with ResultStore(out, create=False) as store:
        cells, samples = store.cells(), store.samples()
    splits = __import__("json").loads((root / "cohort" / "splits-seed0.json").read_text())["splits"]
    assert len(cells) == 3 * 3 and set(cells["attack"]) == {"universal"}
    for _, cell in cells.iterrows():
        assert cell["fit_split"] == "train" and cell["fit_count"] == 4 and cell["fit_n"] == 4
        assert cell["n"] == 3 and cell["fit_subjects_sha256"]
        assert cell["fit_mean_abs_deviation"] >= 0 and cell["backward"] > 0
        held_out = samples[samples["cell_id"] == cell["id"]]["subject"]
        assert set(held_out) <= set(splits["test"])  # the stored rows are the held-out subjects
