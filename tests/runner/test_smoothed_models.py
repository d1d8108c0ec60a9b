"""A median-smoothed model in a run: certified in its l2 cells under ``fixed``, the certificate never beaten by the
attack on a trained model, its cells apart from the base model's, and its settings checked in the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from medrobust.errors import MedrobustError
from medrobust.reports.leaderboard import write_report
from medrobust.results.store import ResultStore
from medrobust.runner import run
from medrobust.runner.config import load_config

SMOOTHED_RUN = '''out = "{root}/run"
models_dir = "{root}/models"
{tables}
[[models]]
name = "cnn3d"
[[models]]
name = "cnn3d"
label = "cnn3d smoothed"
smoothing = {{ sigma = 0.25, n = 8, certify_n = 100, alpha = 0.01 }}
[[budgets]]
norm = "l2"
epsilon = [0.02, 0.05, 2.0]
[[budgets]]
norm = "linf"
epsilon = [0.001]
[[attacks]]
name = "pgd"
steps = 5
[[attacks]]
name = "fgsm"
'''


def test_a_smoothed_model_is_certified_in_its_l2_cells_and_the_attack_never_beats_the_certificate(
        tmp_path: Path, tiny_run_tables) -> None:
    config_path = tmp_path / "smoothed.toml"
    config_path.write_text(SMOOTHED_RUN.format(root=tmp_path, tables=tiny_run_tables(tmp_path / "cohort", 4)))
    summary = run(load_config(config_path), progress=False, echo=lambda line: None)
    assert summary.done == 16 and not summary.failed
    with ResultStore(tmp_path / "run") as store:
        cells, samples = store.cells().set_index("id"), store.samples()
    smoothed = cells[cells["model"] == "cnn3d smoothed"]
    base = cells[cells["model"] == "cnn3d"]
    assert base["checkpoint_sha256"].nunique() == 1
    assert set(base["checkpoint_sha256"]) == set(smoothed["checkpoint_sha256"])  # the same weights, other cells
    assert not set(base.index) & set(smoothed.index)
    certified = smoothed[smoothed["norm"] == "l2"]
    assert len(certified) == 6 and (certified["certificate_beaten"] == 0).all()
    for attack in ("pgd", "fgsm"):
        mine = certified[certified["attack"] == attack]
        small, large = (mine[mine["epsilon"] == eps].iloc[0] for eps in (0.05, 2.0))
        assert small["certified_n"] == 4 and small["abstained"] == 0 and small["certified_max_deviation"] > 0
        assert large["abstained"] == 4  # two ranges of l2 radius are far beyond what sigma 0.25 certifies
    # A certificate belongs to the model, the subject and the radius: the same under either attack, and at a
    # larger radius (from the same draws) it contains the smaller one's.
    bounds = samples.merge(certified[["attack", "epsilon"]], left_on="cell_id", right_index=True)
    bounds = bounds.set_index(["attack", "epsilon", "subject"])[["certified_lower", "certified_upper"]]
    assert bounds.loc["pgd"].equals(bounds.loc["fgsm"])
    small, wider = bounds.loc["pgd"].loc[0.02], bounds.loc["pgd"].loc[0.05]
    assert wider.notna().all().all()
    assert (wider["certified_lower"] <= small["certified_lower"]).all()
    assert (wider["certified_upper"] >= small["certified_upper"]).all()
    assert (wider["certified_upper"] - wider["certified_lower"] > small["certified_upper"]
            - small["certified_lower"]).any()
    for cell_id in certified.index:
        rows = samples[samples["cell_id"] == cell_id]
        inside = rows["certified_lower"].isna() | (
            (rows["certified_lower"] <= rows["smoothed_adversarial"])
            & (rows["smoothed_adversarial"] <= rows["certified_upper"]))
        assert inside.all()
    # no certificate for an l-inf cell, nor for the unsmoothed model
    others = samples[~samples["cell_id"].isin(certified.index)]
    assert others[["certified_lower", "certified_upper", "smoothed_adversarial"]].isna().all().all()
    assert base["certified_n"].isna().all()
    # the page's certified table: the smoothed model's six l2 cells, nothing beaten
    page = write_report(tmp_path / "run").read_text()
    section = page[page.index("<h2>Certified: median smoothing</h2>"):page.index("<h2>Deviation by true age</h2>")]
    assert section.count("cnn3d smoothed") == 6 and ">cnn3d<" not in section


def test_bad_smoothing_in_a_config_is_one_line_naming_the_model(tmp_path: Path, tiny_run_tables) -> None:
    config_path = tmp_path / "bad.toml"
    text = SMOOTHED_RUN.format(root=tmp_path, tables=tiny_run_tables(tmp_path / "cohort", 4))
    for smoothing, message in (("sigma = -1.0", r"models\[1\]\.smoothing: smoothing sigma must be a finite number > 0"),
                               ("sigmas = 1.0", r"models\[1\]\.smoothing takes sigma, n, certify_n, alpha, seed")):
        config_path.write_text(text.replace("sigma = 0.25, n = 8, certify_n = 100, alpha = 0.01", smoothing))
        with pytest.raises(MedrobustError, match=message):
            load_config(config_path)
