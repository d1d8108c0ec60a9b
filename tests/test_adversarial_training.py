"""Adversarial training for brain-age regression: a real gain in robustness on a tiny cohort, the defence recorded
with the checkpoint, defended models beside their undefended twins in one run, and bad settings refused in one
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medrobust.attacks import create_attack
from medrobust.cli import main
from medrobust.data import load_prepared
from medrobust.data.cohort import synthesize
from medrobust.errors import FieldError, MedrobustError
from medrobust.models import load_checkpoint
from medrobust.reports.leaderboard import model_cards
from medrobust.results.store import ResultStore
from medrobust.runner import run
from medrobust.runner.config import load_config
from medrobust.settings import CohortSpec, TrainingConfig
from medrobust.training import TrainRequest, train

TINY = CohortSpec(n=40, seed=3, shape=(32, 32, 32), voxel_size=(6.0, 6.0, 6.0), batch_size=8)
EPSILON = 0.01  # of each image's range: large enough that the undefended cnn3d moves by tens of years


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("cohort") / "bids", TINY, progress=False)


@pytest.fixture(scope="module")
def twins(cohort, tmp_path_factory) -> dict:
    """cnn3d trained with the same seed and settings, once as usual and once adversarially (PGD, 2 steps)."""
    out = tmp_path_factory.mktemp("models")
    trained = {}
    for adversarial in (None, "pgd"):
        config = TrainingConfig(epochs=8, batch_size=4, seed=5, adversarial=adversarial,
                                adversarial_epsilon=EPSILON, adversarial_steps=2)
        (result,) = train(TrainRequest(data=cohort, models=["cnn3d"], out=out, config=config, device="cpu",
                                       progress=False))
        trained[adversarial or "standard"] = result
    return trained


def robust_errors(checkpoint: Path, cohort: Path) -> tuple[float, float, float]:
    """(clean MAE, robust MAE, mean |deviation|) of a checkpoint on every subject of the cohort under PGD-10 of
    the regression error at EPSILON."""
    model, _ = load_checkpoint(checkpoint)
    _, _, data = load_prepared(cohort, model.meta.input_shape, model.meta.voxel_size, progress=False)
    attack = create_attack("pgd", model, budget={"norm": "linf", "epsilon": EPSILON}, objective="error", steps=10)
    result = attack(data.images, None, data.ages)
    return (float((result.clean_prediction - data.ages).abs().mean()),
            float((result.adversarial_prediction - data.ages).abs().mean()),
            float((result.adversarial_prediction - result.clean_prediction).abs().mean()))


def test_adversarial_training_makes_the_model_more_robust_than_its_undefended_twin(twins, cohort) -> None:
    # Measured when written: robust MAE 65.9 y undefended against 25.9 y defended, mean |deviation| 53.9 against
    # 5.2 y (the defended model's clean MAE is the price: 20.7 against 12.0 y on 40 subjects and 8 epochs).
    _, standard_robust, standard_shift = robust_errors(twins["standard"].checkpoint, cohort)
    _, defended_robust, defended_shift = robust_errors(twins["pgd"].checkpoint, cohort)
    assert defended_robust < 0.5 * standard_robust, (defended_robust, standard_robust)
    assert defended_shift < 0.25 * standard_shift, (defended_shift, standard_shift)


def test_the_defence_is_in_the_checkpoint_name_and_sidecar(twins) -> None:
    standard, defended = twins["standard"].checkpoint, twins["pgd"].checkpoint
    assert standard.name == "cnn3d-seed5.safetensors"
    assert defended.name == f"cnn3d-at-pgd-linf{EPSILON:g}-2steps-seed5.safetensors"
    assert defended.parent == standard.parent
    # its test predictions beside it under the whole stem, whose dots stay (not "cnn3d-at-pgd-linf0.test.tsv")
    assert sorted(path.name for path in defended.parent.glob("*.test.tsv")) == [
        f"cnn3d-at-pgd-linf{EPSILON:g}-2steps-seed5.test.tsv", "cnn3d-seed5.test.tsv"]
    recorded = json.loads(defended.with_suffix(".json").read_text())["extra"]["training"]
    assert (recorded["adversarial"], recorded["adversarial_epsilon"], recorded["adversarial_steps"]) == (
        "pgd", EPSILON, 2)
    # PGD with 2 steps: its passes per attacked batch, counted over every batch of every epoch
    assert recorded["attack_passes"]["backward"] >= 2 * 8 * 7 and recorded["attack_passes"]["forward"] > 0
    assert json.loads(standard.with_suffix(".json").read_text())["extra"]["training"]["adversarial"] is None


@pytest.mark.parametrize("settings, field", [
    ({"adversarial": "no_such_attack"}, "adversarial"),
    ({"adversarial": "universal"}, "adversarial"),
    ({"adversarial": "pgd", "adversarial_norm": "l0"}, "adversarial_norm"),
    ({"adversarial": "pgd", "adversarial_ratio": 0.0}, "adversarial_ratio"),
    ({"adversarial": "pgd", "adversarial_threat_model": "recomputed"}, "adversarial_threat_model"),
    ({"adversarial": "square", "adversarial_threat_model": "perturbed"}, "adversarial_threat_model"),
    ({"adversarial": "bim", "adversarial_norm": "l2"}, "adversarial_norm"),
    ({"adversarial": "pgd", "adversarial_warmup": 1}, "adversarial_warmup"),  # as many as the one epoch
])
def test_a_defence_the_attack_cannot_train_is_refused_naming_the_field(cohort, tmp_path, settings, field) -> None:
    with pytest.raises(FieldError) as caught:
        train(TrainRequest(data=cohort, models=["cnn3d"], out=tmp_path, config=TrainingConfig(epochs=1, **settings),
                           device="cpu", progress=False))
    assert caught.value.field == field
    assert not list(tmp_path.iterdir())


def test_a_segmenter_is_not_trained_adversarially(cohort, tmp_path) -> None:
    with pytest.raises(MedrobustError, match="trains brain-age models"):
        train(TrainRequest(data=cohort, models=["seg_unet"], out=tmp_path, device="cpu", progress=False,
                           config=TrainingConfig(epochs=1, adversarial="pgd")))


def test_the_command_line_names_the_budget_flag(cohort, tmp_path) -> None:
    runner = CliRunner()
    for budget, message in (("linf:abc", "expected NORM:EPSILON"), ("l0:3", "--budget must be linf or l2")):
        result = runner.invoke(main, ["train", "--data", str(cohort), "--out", str(tmp_path), "--adversarial", "pgd",
                                      "--budget", budget, "--epochs", "1", "--quiet"])
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_a_run_trains_the_defended_model_beside_its_undefended_twin(cohort, tmp_path) -> None:
    # One config, two models of one architecture: the run's [training] and a model's own `training` with a defence.
    # Each is trained once, into its own checkpoint, and each has its own cells on the page's store.
    config_path = tmp_path / "twins.toml"
    config_path.write_text(f'''out = "{tmp_path / 'run'}"
models_dir = "{tmp_path / 'models'}"
[dataset]
path = "{cohort}"
count = 4
[training]
epochs = 2
batch_size = 4
[[models]]
name = "cnn3d"
[[models]]
name = "cnn3d"
label = "cnn3d (PGD training)"
training = {{ adversarial = "pgd", adversarial_epsilon = 0.004, adversarial_steps = 1 }}
[[budgets]]
norm = "linf"
epsilon = [0.004]
[[attacks]]
name = "fgsm"
''')
    config = load_config(config_path)
    assert config.models[1].training.adversarial == "pgd" and config.models[1].training.epochs == 2
    lines: list[str] = []
    summary = run(config, progress=False, echo=lines.append)
    assert summary.done == 2 and not summary.failed
    assert sorted(path.name for path in (tmp_path / "models").glob("*.safetensors")) == [
        "cnn3d-at-pgd-linf0.004-1steps-seed0.safetensors", "cnn3d-seed0.safetensors"]
    assert any("adversarially (pgd linf 0.004)" in line for line in lines)
    with ResultStore(config.out) as store:
        cells = store.cells()
    cards = dict(zip(cells["model"], cells["model_card"], strict=True))
    assert cards["cnn3d"]["training"]["defence"] is None
    assert cards["cnn3d (PGD training)"]["training"]["defence"]["attack"] == "pgd"
    page_table = cells.assign(model_card=cells["model_card"].map(json.dumps))  # as the page reads the store
    trained = model_cards(page_table, cells.iloc[0:0]).set_index("model")["trained"]
    assert "adversarially trained against pgd (linf 0.004 of range, 1 steps" in trained["cnn3d (PGD training)"]
    assert "adversarially" not in trained["cnn3d"]
    bad = config_path.read_text().replace("adversarial_steps = 1", "adversarial_steps = 0")
    config_path.write_text(bad)
    with pytest.raises(MedrobustError, match=r"models\[1\]\.training\.adversarial_steps must be at least 1"):
        load_config(config_path)


def test_every_setting_of_a_defence_names_its_own_checkpoint() -> None:
    # A checkpoint found under a defence's stem is taken as trained with it: two defences never share one.
    defences = [TrainingConfig(), TrainingConfig(adversarial="pgd"), TrainingConfig(adversarial="bim"),
                TrainingConfig(adversarial="pgd", adversarial_epsilon=2e-3),
                TrainingConfig(adversarial="pgd", adversarial_norm="l2"),
                TrainingConfig(adversarial="pgd", adversarial_steps=5),
                TrainingConfig(adversarial="pgd", adversarial_ratio=0.5),
                TrainingConfig(adversarial="pgd", adversarial_threat_model="perturbed"),
                TrainingConfig(adversarial="pgd", adversarial_warmup=5),
                TrainingConfig(noise_sigma=0.25), TrainingConfig(adversarial="pgd", noise_sigma=0.25)]
    stems = [config.stem("cnn3d") for config in defences]
    assert len(set(stems)) == len(stems) and stems[0] == "cnn3d-seed0"
    assert stems[6] == "cnn3d-at-pgd-linf0.001-3steps-ratio0.5-seed0" and stems[9] == "cnn3d-noise0.25-seed0"
    assert stems[8] == "cnn3d-at-pgd-linf0.001-3steps-warmup5-seed0"


def test_noise_augmented_training_is_its_own_deterministic_checkpoint(cohort, tmp_path) -> None:
    def trained(out: Path, sigma: float) -> dict:
        config = TrainingConfig(epochs=1, batch_size=4, seed=5, noise_sigma=sigma)
        (result,) = train(TrainRequest(data=cohort, models=["cnn3d"], out=out, config=config, device="cpu",
                                       progress=False))
        return result.checkpoint, load_checkpoint(result.checkpoint)[0].state_dict()

    (first, weights), (_, again), (plain, clean) = (trained(tmp_path / "a", 0.5), trained(tmp_path / "b", 0.5),
                                                    trained(tmp_path / "c", 0.0))
    assert first.name == "cnn3d-noise0.5-seed5.safetensors" and plain.name == "cnn3d-seed5.safetensors"
    assert all(torch.equal(weights[key], again[key]) for key in weights)
    assert not all(torch.equal(weights[key], clean[key]) for key in weights)


def test_the_warmup_ramps_epsilon_up_and_is_never_the_chosen_epoch(cohort, tmp_path) -> None:
    config = TrainingConfig(epochs=4, batch_size=4, seed=5, adversarial="pgd", adversarial_warmup=2,
                            adversarial_steps=1)
    (result,) = train(TrainRequest(data=cohort, models=["cnn3d"], out=tmp_path, config=config, device="cpu",
                                   progress=False))
    assert result.best_epoch >= 3
    assert result.checkpoint.name == "cnn3d-at-pgd-linf0.001-1steps-warmup2-seed5.safetensors"
    # epoch 1 is clean (no attack pass), epoch 2 at half epsilon, 3 and 4 at full: 3 attacked epochs of 7 batches,
    # each one step (one backward) per attacked batch
    recorded = json.loads(result.checkpoint.with_suffix(".json").read_text())["extra"]["training"]
    assert recorded["attack_passes"]["backward"] == 3 * 7
