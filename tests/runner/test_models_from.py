"""Checkpoints trained elsewhere (``models_from``: the demo's, shipped in configs/demo-models): taken for a missing
model only when they were trained on this very dataset with these training settings; trained otherwise, and
with ``--retrain``."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from medrobust.cli import main

GRID = '\n[[budgets]]\nnorm = "linf"\nepsilon = [1e-3]\n\n[[attacks]]\nname = "fgsm"\n'


def _run(config: Path, *options: str):
    result = CliRunner().invoke(main, ["run", str(config), "--no-report", *options])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_shipped_checkpoint_is_used_only_for_its_own_dataset_and_settings(tmp_path: Path, tiny_config) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    first = tiny_config(shipped, "first", "", GRID)
    assert "trained cnn3d" in _run(first, "--quiet")
    checkpoint = shipped / "models" / "cnn3d-seed0"

    def config(name: str, training: str = "") -> Path:
        # The same cohort spec, generated again in this folder: the same content fingerprint. Each run its own
        # models folder, so that each decides for itself.
        path = tiny_config(tmp_path, name, f'models_from = "{shipped / "models"}"', GRID)
        path.write_text(path.read_text().replace(f'models_dir = "{tmp_path / "models"}"',
                                                 f'models_dir = "{tmp_path / name / "models"}"')
                        .replace("[training]\n", f"[training]\n{training}"))
        return path

    output = _run(config("same"), "--quiet")
    assert "the shipped checkpoint" in output and "trained cnn3d" not in output
    for suffix in (".safetensors", ".json"):
        copied = tmp_path / "same" / "models" / f"cnn3d-seed0{suffix}"
        assert copied.read_bytes() == checkpoint.with_suffix(suffix).read_bytes()
    # Other training settings: not the shipped model; trained here.
    output = _run(config("other", "lr = 0.0005\n"), "--quiet")
    assert "trained on another dataset or with other settings" in output and "trained cnn3d" in output
    # --retrain: trained here although the shipped one would do.
    output = _run(config("retrained"), "--quiet", "--retrain")
    assert "trained cnn3d" in output and "the shipped checkpoint" not in output


DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
DEMO_MODELS = ("cnn3d", "hybrid", "hybrid_e2e")


def test_the_shipped_demo_checkpoints_are_taken_for_the_cohort_generated_on_this_machine(tmp_path: Path) -> None:
    # configs/demo-models holds what `medrobust run configs/demo.toml` trained. The cohort it generates is the same
    # on every machine up to a few voxels' rounding (float kernels differ between CPU kinds), so its bytes' hash may
    # differ from the one the sidecars record: the checkpoints are taken when they predict their recorded test
    # subjects as they did, and then reach their recorded clean metrics here. Retraining reproduces them only on
    # the same kind of CPU: 30 epochs amplify the last bits (elsewhere cnn3d retrained to 5.7 y against 4.1 y).
    import dataclasses
    import json

    import torch

    from medrobust.data import load_prepared
    from medrobust.data.index import load_dataset_index
    from medrobust.data.splits import load_or_create_splits
    from medrobust.models.checkpoint import load_checkpoint
    from medrobust.runner.config import load_config
    from medrobust.runner.provision import ensure_dataset, ensure_models
    from medrobust.training import evaluate

    config = load_config(DEMO)
    config = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, path=tmp_path / "cohort"),
                                 models_dir=tmp_path / "models", models_from=DEMO.parent / config.models_from.name)
    cohort = ensure_dataset(config, progress=False)
    lines: list[str] = []
    ensure_models(config, "cpu", progress=False, echo=lines.append)
    assert len(lines) == len(DEMO_MODELS) and all("using it" in line for line in lines), lines
    subjects = [record.subject_id for record in load_dataset_index(cohort).subjects]
    test_ids = load_or_create_splits(cohort, subjects, config.dataset.split_seed)["test"]
    for name in DEMO_MODELS:
        model, sidecar = load_checkpoint(tmp_path / "models" / f"{name}-seed0")
        shipped = json.loads((config.models_from / f"{name}-seed0.json").read_text())
        assert sidecar == shipped
        _, _, data = load_prepared(cohort, model.meta.input_shape, model.meta.voxel_size, progress=False)
        metrics, _ = evaluate(model, data.subset(test_ids), torch.device("cpu"))
        recorded_ids = [line.split("\t")[0] for line in
                        (config.models_from / f"{name}-seed0.test.tsv").read_text().splitlines()[1:]]
        assert recorded_ids == test_ids
        recorded = shipped["extra"]["test_metrics"]
        assert metrics["n"] == recorded["n"] == 100
        assert abs(metrics["mae"] - recorded["mae"]) < 0.01, (name, metrics, recorded)

    # A checkpoint whose recorded predictions this cohort does not give (here one subject's, moved by a year) is
    # another cohort's: trained here instead of taken (adopt_checkpoint declines it).
    from medrobust.runner.provision import adopt_checkpoint

    other = tmp_path / "other-models"
    shutil.copytree(config.models_from, other)
    predictions = other / "cnn3d-seed0.test.tsv"
    header, first, *rest = predictions.read_text().splitlines()
    subject, age, predicted = first.split("\t")
    predictions.write_text("\n".join([header, f"{subject}\t{age}\t{float(predicted) + 1:.3f}", *rest]) + "\n")
    lines.clear()
    taken = adopt_checkpoint(dataclasses.replace(config, models_from=other), "cnn3d",
                             tmp_path / "taken" / "cnn3d-seed0", "another fingerprint", lines.append)
    assert not taken and "trained on another dataset" in lines[0]
