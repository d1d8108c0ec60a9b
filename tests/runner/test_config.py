"""Run configs: the shipped ones parse; every bad field is one clear error naming it, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from medrobust.cli import main
from medrobust.runner.config import load_config

REPO = Path(__file__).resolve().parents[2]

GOOD = """
out = "{out}"
seed = 1
batch_size = 4
objective = ["older", "younger"]

[dataset]
builtin = true
path = "{out}/cohort"
subjects = 24
shape = [32, 32, 32]
voxel_size = [6, 6, 6]
split = "test"
count = 3

[training]
epochs = 1

[[models]]
name = "cnn3d"

[[models]]
name = "hybrid"
label = "hybrid (two-stage)"

[[budgets]]
norm = "linf"
epsilon = [1e-3, 2e-3]

[[budgets]]
norm = "l2"
unit = "abs"
epsilon = 0.5

[[attacks]]
name = "fgsm"

[[attacks]]
name = "pgd"
steps = 2
random_start = false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text.replace("{out}", str(tmp_path / "out")))
    return path


def test_shipped_configs_parse():
    for path in sorted((REPO / "configs").glob("*.toml")):
        config = load_config(path)
        assert config.models and config.attacks


def test_extractor_is_one_or_a_list():
    config = load_config(REPO / "configs" / "threat_models.toml")
    assert config.extractors == ["soft", "segmenter"]
    assert config.segmenter == Path("configs/demo-models/seg_unet-seed0.safetensors")
    assert load_config(REPO / "configs" / "demo.toml").extractors == ["soft"]


def test_demo_config_is_the_issue_grid():
    config = load_config(REPO / "configs" / "demo.toml")
    assert [m.name for m in config.models] == ["cnn3d", "hybrid", "hybrid_e2e"]
    assert [a.name for a in config.attacks] == ["fgsm", "pgd"]
    linf = sorted(b.epsilon for b in config.budgets if b.norm == "linf" and b.unit == "range")
    assert {5e-4, 1e-3, 2e-3} <= set(linf)
    assert len([b for b in config.budgets if b.norm == "l2"]) >= 2
    assert config.dataset.split == "test" and config.dataset.count == 100
    pgd = config.attacks[1].params
    assert pgd == {"steps": 4, "step_size": 0.25, "random_start": False}  # the paper's l-inf attack


def test_good_config_expands(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.seed == 1 and config.batch_size == 4 and config.objectives == ["older", "younger"]
    assert [(b.norm, b.epsilon, b.unit) for b in config.budgets] == [
        ("linf", 1e-3, "range"), ("linf", 2e-3, "range"), ("l2", 0.5, "abs")]
    assert config.models[1].label == "hybrid (two-stage)" and config.models[0].label == "cnn3d"
    assert config.dataset.shape == (32, 32, 32) and config.training.epochs == 1


def test_attack_entries_take_the_base_arguments_too(tmp_path):
    text = GOOD.replace('name = "fgsm"', 'name = "fgsm"\nclip = "none"\nkeep_best = false')
    config = load_config(write(tmp_path, text))
    assert config.attacks[0].params == {"clip": "none", "keep_best": False}


BAD = [
    # (replace this, with this, the error must mention)
    ('seed = 1', 'seed = 1\ncolour = "red"', "unknown key 'colour'"),
    ('subjects = 24', 'subjects = 24\nsize = 3', "unknown key 'dataset.size'"),
    ('name = "pgd"', 'name = "pgd"\nstepz = 3', "unknown key 'attacks[1].stepz'"),
    ('name = "pgd"', 'name = "pgd"\nseed = 3', "unknown key 'attacks[1].seed'"),
    ('name = "pgd"', 'name = "pgd"\nclip = "never"', "clip must be one of"),
    ('seed = 1', 'seed = "one"', "seed must be an integer"),
    ('batch_size = 4', 'batch_size = 0', "batch_size must be at least 1"),
    ('count = 3', 'count = "all"', "dataset.count must be an integer"),
    ('name = "cnn3d"', 'name = "resnet"', "models[0].name must be one of"),
    ('name = "fgsm"', 'name = "deepfool"', "attacks[0].name must be one of"),
    ('epsilon = [1e-3, 2e-3]', 'epsilon = [1e-3, -2e-3]', "budgets[0].epsilon[1] must be a finite number >= 0"),
    ('epsilon = [1e-3, 2e-3]', 'epsilon = [nan]', "budgets[0].epsilon[0] must be a finite number >= 0"),
    ('epsilon = 0.5', 'epsilon = inf', "budgets[1].epsilon must be a finite number >= 0"),
    ('norm = "linf"', 'norm = "l7"', "norm"),
    ('unit = "abs"', 'unit = "furlongs"', "unit"),
    ('steps = 2', 'steps = -2', "attacks[1] (pgd)"),
    ('objective = ["older", "younger"]', 'objective = "wiser"', "objective must be one of"),
    ('objective = ["older", "younger"]', 'objective = "target"', "target_age"),
    ('seed = 1', 'seed = 1\nthreat_model = "omniscient"', "threat_model must be one of"),
    ('epochs = 1', 'epochs = 0', "training.epochs must be at least 1"),
    ('split = "test"', 'split = "holdout"', "dataset.split"),
    ('builtin = true', 'builtin = false', "does not exist"),
    ('label = "hybrid (two-stage)"', 'label = "cnn3d"', "used twice"),
    ('name = "hybrid"', 'name = "hybrid"\ncheckpoint = "nowhere/cnn3d-seed0"', "no checkpoint at"),
    ('shape = [32, 32, 32]', 'shape = [32, 32]', "dataset.shape must list three values"),
    ('subjects = 24', 'subjects = 2', "dataset.subjects must be at least 10"),
    ('seed = 1', 'seed = 1\nprecision = "fp8"', "precision must be one of fp32, bf16, fp16"),
    ('seed = 1', 'seed = 1\nextractor = "magic"', "extractor must be one of soft, hard, hard-bpda"),
    ('seed = 1', 'seed = 1\nextractor = ["soft", "segmentr"]', "segmenter-hard-bpda; got 'segmentr'"),
    ('seed = 1', 'seed = 1\nextractor = ["soft", "segmenter"]', "name its checkpoint with segmenter = "),
    ('seed = 1', 'seed = 1\nextractor = []', "extractor must not be empty"),
    ('seed = 1', 'seed = 1\nssim = "yes"', "ssim must be"),
    ('epsilon = [1e-3, 2e-3]', 'epsilon = []', "budgets[0].epsilon is an empty list"),
    ('seed = 1', 'seed = 1\ndevice = "tpu"', ": device 'tpu' is not a device"),
    ('subjects = 24', 'subjects = 24\nage_range = [90, 18]', "dataset.age_range must be [MIN, MAX] years"),
    ('subjects = 24', 'subjects = 24\nage_range = [0, "old"]', "dataset.age_range must be [MIN, MAX] years"),
    ('subjects = 24', 'subjects = 24\nfeatures = { format = "fsl", path = "." }', "dataset.features.format must be"),
    ('subjects = 24', 'subjects = 24\nfeatures = { format = "table", path = "nowhere.csv" }', "does not exist"),
    ('subjects = 24', 'subjects = 24\nfeatures = { format = "table", path = ".", sheet = 1 }',
     "unknown key 'dataset.features.sheet'"),
]


@pytest.mark.parametrize("old,new,message", BAD, ids=[b[1].splitlines()[-1] for b in BAD])
def test_bad_config_is_one_line_and_exit_code_2(tmp_path, old, new, message):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert message in lines[0]
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_missing_and_malformed_files(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("seed = = 3\n")
    result = CliRunner().invoke(main, ["run", str(broken)])
    assert result.exit_code == 2 and "not valid TOML" in result.output
