"""End to end with a segmenter in the loop: `medrobust train --model seg_unet` on a tiny built-in cohort, then a run
whose `recomputed` cells measure the volumes with it beside the label-map soft volumes, and `medrobust segment`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from medrobust.cli import main
from medrobust.data import FeatureSource, load_prepared
from medrobust.data.cohort import synthesize
from medrobust.models import load_checkpoint
from medrobust.models.segmenter import create_segmenter
from medrobust.results.store import ResultStore
from medrobust.runner.config import builtin_cohort, load_config
from medrobust.segmentation import evaluate_segmenter, labelled_regions

# A hybrid beside the tiny run's cnn3d (which has no features: fixed only), under `recomputed` with each extractor.
TOP = """batch_size = 2
threat_model = ["fixed", "recomputed"]
extractor = ["soft", "segmenter"]
segmenter = "{segmenter}"
"""
GRID = """
[[models]]
name = "hybrid_e2e"

[[budgets]]
norm = "linf"
epsilon = [2e-3]

[[attacks]]
name = "fgsm"

[[attacks]]
name = "bim"
steps = 2
"""
# cnn3d: two attacks under fixed; hybrid_e2e: two under fixed and two per extractor under recomputed
N_CELLS = 2 + 2 + 2 * 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config):
    """A tiny cohort (the tiny run's) and two seg_unet trained on it (seed 0 for an epoch, seed 1 for eight), the
    CLI output of the second, and a factory of run configs with a given segmenter."""
    root = tmp_path_factory.mktemp("segmenter")

    def config(name: str, segmenter: object, top: str = TOP) -> Path:
        return tiny_config(root, name, top.replace("{segmenter}", str(segmenter)), GRID)

    synthesize(root / "cohort", builtin_cohort(load_config(config("probe", "")).dataset), progress=False)
    for seed, epochs in ((0, 1), (1, 8)):  # seed 1 learns (the first test); seed 0 is another segmenter
        result = CliRunner().invoke(main, ["train", "--data", str(root / "cohort"), "--model", "seg_unet", "--epochs",
                                           str(epochs), "--batch-size", "2", "--lr", "0.003", "--seed", str(seed),
                                           "--out", str(root / "seg"), "--quiet"])
        assert result.exit_code == 0, result.output
    return root, result.output, config


def test_a_tiny_segmenter_learns_the_label_maps(trained):
    root, output, _ = trained
    assert "seg_unet       test Dice" in output
    segmenter, sidecar = load_checkpoint(root / "seg" / "seg_unet-seed1", kind="segmenter")
    assert (root / "seg" / "seg_unet-seed1.regions.tsv").is_file()
    data = load_prepared(root / "cohort", progress=False)[2]
    assert segmenter.region_names == labelled_regions(data) and len(segmenter.class_names) == 21
    torch.manual_seed(1)
    untrained = create_segmenter("seg_unet", **segmenter.meta.kwargs)
    learned = evaluate_segmenter(segmenter, data, torch.device("cpu"))
    before = evaluate_segmenter(untrained, data, torch.device("cpu"))
    # the white matter, the largest class and bright on T1, is learned in eight epochs of the training split
    white, white_before = learned["regions"]["White_Matter"], before["regions"]["White_Matter"]
    assert white["dice"] > 0.4 and white["dice"] > white_before["dice"] + 0.2, (white, white_before)
    assert learned["dice_mean"] > before["dice_mean"]
    history = sidecar["extra"]["training"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert sidecar["extra"]["training"]["best_val_dice"] == max(
        epoch["val_dice"] for epoch in sidecar["extra"]["training"]["history"])


def test_recomputed_cells_run_with_each_extractor_and_follow_the_segmenter(trained):
    root, _, config = trained
    segmenter = root / "seg" / "seg_unet-seed0.safetensors"
    result = CliRunner().invoke(main, ["run", str(config("run", segmenter)), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{N_CELLS} cells run, 0 already finished, 0 failed" in result.output
    with ResultStore(root / "run", create=False) as store:
        cells = store.cells()
    assert set(cells["status"]) == {"done"} and cells["id"].is_unique
    recomputed = cells[cells["threat_model"] == "recomputed"]
    assert sorted(recomputed["extractor"]) == ["segmenter", "segmenter", "soft", "soft"]
    weights = load_checkpoint(segmenter, kind="segmenter")[1]["weights_sha256"]
    by_segmenter = recomputed[recomputed["extractor"] == "segmenter"]
    assert set(by_segmenter["segmenter_sha256"]) == {weights}
    assert cells[cells["extractor"] != "segmenter"]["segmenter_sha256"].isna().all()
    assert (by_segmenter["mean_feature_change_rel"] > 0).all()  # the attacked image's segmentation moved
    assert "recomputed (segmenter)" in (root / "run" / "leaderboard.html").read_text()
    again = CliRunner().invoke(main, ["run", str(config("run", segmenter)), "--quiet", "--no-report"])
    assert f"0 cells run, {N_CELLS} already finished" in again.output, again.output
    # another segmenter measures other volumes: its cells are new, the others are not (the run folder is shared)
    other = config("run", root / "seg" / "seg_unet-seed1.safetensors")
    moved = CliRunner().invoke(main, ["run", str(other), "--quiet", "--no-report"])
    assert f"2 cells run, {N_CELLS - 2} already finished, 0 failed" in moved.output, moved.output


def test_a_run_refuses_a_segmenter_extractor_without_a_segmenter_or_with_a_model_in_its_place(trained):
    root, _, config = trained
    result = CliRunner().invoke(main, ["run", str(config("none", "", TOP.replace('segmenter = "{segmenter}"\n', ""))),
                                       "--quiet"])
    assert result.exit_code == 2 and "name its checkpoint with segmenter = " in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    model = root / "models" / "hybrid_e2e-seed0.safetensors"  # trained by the run above
    result = CliRunner().invoke(main, ["run", str(config("model", model)), "--quiet"])
    assert result.exit_code == 2 and "holds a brain-age model, not a segmenter" in result.output, result.output


def test_segment_writes_a_features_table_that_training_reads(trained):
    root, _, _ = trained
    table = root / "volumes.csv"
    result = CliRunner().invoke(main, ["segment", "--segmenter", str(root / "seg" / "seg_unet-seed0.safetensors"),
                                       "--data", str(root / "cohort"), "--out", str(table), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "24 subjects' volumes in" in result.output and "mean Dice" in result.output
    volumes = pd.read_csv(table)
    assert len(volumes) == 24 and volumes.columns[0] == "participant_id"
    data = load_prepared(root / "cohort", progress=False)[2]
    read = load_prepared(root / "cohort", progress=False, features=FeatureSource("table", table))[2]
    assert read.feature_names == ["sex", "field_strength", *volumes.columns[1:]]
    assert torch.equal(read.features[:, :2], data.features[:, :2])  # sex and field strength from participants.tsv
    assert torch.allclose(read.features[:, 2:], torch.tensor(volumes.iloc[:, 1:].to_numpy(), dtype=torch.float32))
