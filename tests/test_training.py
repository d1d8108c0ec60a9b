"""Training: end to end on a tiny built-in cohort, determinism, train-only scalers, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medrobust.cli import main
from medrobust.data import load_prepared
from medrobust.data.cohort import synthesize
from medrobust.devices import resolve_device
from medrobust.errors import FieldError, MedrobustError
from medrobust.models import load_checkpoint
from medrobust.settings import CohortSpec, TrainingConfig
from medrobust.training import TrainRequest, train

# The paper's network pools five times, so 32 voxels per axis is the smallest grid it takes.
TINY = CohortSpec(n=24, seed=3, shape=(32, 32, 32), voxel_size=(6.0, 6.0, 6.0), batch_size=8)
MODELS = ["cnn3d", "hybrid", "hybrid_e2e", "features_mlp", "sfcn"]


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("cohort") / "bids", TINY, progress=False)


@pytest.fixture(scope="module")
def trained(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    request = TrainRequest(data=tiny_cohort, models=list(reversed(MODELS)), out=out,
                           config=TrainingConfig(epochs=2, batch_size=4, seed=5), device="cpu", progress=False)
    return out, train(request)


def test_end_to_end_train_checkpoint_reload_predict(tiny_cohort, trained):
    out, results = trained
    # hybrid is built from the cnn3d trained in the same call, so cnn3d goes before it whatever the order asked;
    # the others keep the order asked.
    assert [r.name for r in results] == ["sfcn", "features_mlp", "hybrid_e2e", "cnn3d", "hybrid"]
    splits = json.loads((tiny_cohort / "splits-seed0.json").read_text())
    test_ids = splits["splits"]["test"]
    data = load_prepared(tiny_cohort, progress=False)[2].subset(test_ids)
    for result in results:
        model, sidecar = load_checkpoint(result.checkpoint)
        metrics = sidecar["extra"]["test_metrics"]
        assert metrics == result.test_metrics
        assert metrics["n"] == len(test_ids) and metrics["mae"] >= 0
        assert sidecar["extra"]["dataset"]["fingerprint"]
        with open(out / f"{result.name}-seed5.test.tsv") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        assert [r["participant_id"] for r in rows] == test_ids
        # The reloaded model reproduces the predictions written at training time.
        with torch.no_grad():
            predicted = model(data.images if model.meta.uses_image else None,
                              data.features if model.meta.uses_features else None)
        written = torch.tensor([float(r["predicted_age"]) for r in rows])
        assert torch.allclose(predicted, written, atol=2e-3)
        mae = (predicted - data.ages).abs().mean()
        assert abs(float(mae) - metrics["mae"]) < 1e-3


def test_hybrid_trunk_is_the_trained_cnn3d_and_frozen(trained):
    out, _ = trained
    cnn, _ = load_checkpoint(out / "cnn3d-seed5")
    hybrid, sidecar = load_checkpoint(out / "hybrid-seed5")
    for name, tensor in cnn.conv_trunk.state_dict().items():
        assert torch.equal(tensor, hybrid.conv_trunk.state_dict()[name]), name
    assert sidecar["meta"]["kwargs"]["trunk_frozen"] is True
    # Trunk scaling was fitted on training data, not left at the identity.
    assert not torch.equal(hybrid.trunk_max, torch.ones_like(hybrid.trunk_max))


def test_scalers_come_from_the_training_split_only(tiny_cohort, trained):
    out, _ = trained
    model, _ = load_checkpoint(out / "features_mlp-seed5")
    splits = json.loads((tiny_cohort / "splits-seed0.json").read_text())
    train_ids = splits["splits"]["train"]
    ages = {}
    with open(tiny_cohort / "participants.tsv") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            ages[row["participant_id"]] = float(row["age"])
    train_ages = torch.tensor([ages[s] for s in train_ids], dtype=torch.float64)
    assert float(model.age_mean) == pytest.approx(float(train_ages.mean()), rel=1e-5)
    assert float(model.age_std) == pytest.approx(float(train_ages.std()), rel=1e-4)


def test_training_is_deterministic_under_a_seed(tiny_cohort, tmp_path):
    config = TrainingConfig(epochs=1, batch_size=4, seed=11)
    states = []
    for run in ("a", "b"):
        request = TrainRequest(data=tiny_cohort, models=["cnn3d"], out=tmp_path / run, config=config, device="cpu",
                               progress=False)
        model, _ = load_checkpoint(train(request)[0].checkpoint)
        states.append(model.state_dict())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be at least 1"), ("batch_size", 0, "batch_size must be at least 1"),
    ("lr", -1.0, "lr must be a positive"), ("lr", float("nan"), "lr must be a positive"),
    ("weight_decay", -0.1, "weight_decay must be a non-negative"), ("loss", "huber", "loss must be one of"),
    ("patience", 0, "patience must be at least 1"),
])
def test_bad_training_config_names_the_field(field, value, message):
    config = TrainingConfig(**{field: value})
    with pytest.raises(FieldError, match=message) as error:
        config.validate()
    assert error.value.field == field


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MedrobustError, match="--device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(MedrobustError, match="CUDA is not available"):
            resolve_device("cuda")


def test_hybrid_alone_needs_a_trained_cnn3d(tiny_cohort, tmp_path):
    with pytest.raises(FieldError, match="trained needs a trained cnn3d for model 'hybrid'"):
        train(TrainRequest(data=tiny_cohort, models=["hybrid"], out=tmp_path, progress=False))


def test_cli_train_reports_and_bad_input_exits_2(tiny_cohort, trained, tmp_path):
    runner = CliRunner()
    out, _ = trained
    result = runner.invoke(main, ["train", "--data", str(tiny_cohort), "--model", "hybrid", "--trunk",
                                  str(out / "cnn3d-seed5"), "--epochs", "1", "--out", str(tmp_path), "--quiet",
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "hybrid" in result.output and "test MAE" in result.output
    assert (tmp_path / "hybrid-seed0.safetensors").is_file()

    for args, expected in [
        (["--model", "resnet9000"], "--model 'resnet9000' is not a registered model"),
        (["--model", "hybrid"], "--trained needs a trained cnn3d for model 'hybrid'"),
        (["--epochs", "0"], "--epochs"),
        (["--model", "hybrid", "--trunk", str(tmp_path / "missing")], "missing"),
    ]:
        result = runner.invoke(main, ["train", "--data", str(tiny_cohort), "--out", str(tmp_path / "x"), "--quiet",
                                      *args])
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output
        assert result.output.strip().count("\n") == 0, result.output  # one line


def test_a_context_model_is_refused_where_the_data_have_no_regional_volumes(tmp_path):
    import shutil

    fixture = Path(__file__).resolve().parent / "runner" / "fixtures" / "pre_redesign" / "dataset"
    shutil.copytree(fixture, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "derivatives")  # no label maps: no regional volumes at all
    with pytest.raises(MedrobustError, match="no subject has regional volumes .* features_mlp would learn from sex"):
        train(TrainRequest(data=tmp_path / "data", models=["features_mlp"], out=tmp_path / "models",
                           config=TrainingConfig(epochs=1), progress=False))
    assert not (tmp_path / "models").exists()
