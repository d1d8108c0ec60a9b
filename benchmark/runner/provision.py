"""Provisioning a run: the dataset (the built-in cohort generated when asked) and every model's checkpoint
(missing ones trained, after the trained models they are built from: each model declares what it requires)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from medrobust.data import load_prepared
from medrobust.data.cohort import synthesize
from medrobust.data.index import load_dataset_index
from medrobust.errors import MedrobustError
from medrobust.files import atomic_write
from medrobust.models import model_requires, training_order
from medrobust.models.checkpoint import beside, checkpoint_paths, load_checkpoint
from medrobust.models.sources import ModelSource
from medrobust.runner.config import ModelSpec, RunConfig, builtin_cohort
from medrobust.settings import TrainingConfig
from medrobust.training import TrainRequest, evaluate, read_predictions, train


def model_checkpoint(config: RunConfig, spec: ModelSpec) -> Path:
    """Where a registered model's checkpoint is: the configured one, else <models_dir>/<name>-seed<training
    seed>, the defence of its training settings in the name (``TrainingConfig.stem``)."""
    return spec.checkpoint or config.models_dir / training_of(config, spec).stem(spec.name)


def training_of(config: RunConfig, spec: ModelSpec) -> TrainingConfig:
    """The training settings of a registered model: its own where it has them (a defence), else the run's."""
    return spec.training or config.training


def model_source(config: RunConfig, spec: ModelSpec) -> ModelSource:
    """Where a model of the grid comes from: a model of one's own as configured, a registered one from its
    checkpoint."""
    if spec.source is not None:
        return dataclasses.replace(spec.source, smoothing=spec.smoothing)
    return ModelSource(checkpoint=model_checkpoint(config, spec), name=spec.name, smoothing=spec.smoothing)


def model_sources(config: RunConfig) -> dict[str, ModelSource]:
    """The source of every model of the grid, by label."""
    return {spec.label: model_source(config, spec) for spec in config.models}


def checkpoint_exists(checkpoint: Path) -> bool:
    """Whether both files of a checkpoint are there."""
    return all(path.is_file() for path in checkpoint_paths(checkpoint))


def ensure_dataset(config: RunConfig, progress: bool = True) -> Path:
    """The dataset folder; the built-in cohort is generated there first when asked and not there yet."""
    if config.dataset.builtin:
        return synthesize(config.dataset.path, builtin_cohort(config.dataset), progress=progress)
    return config.dataset.path


def adopt_checkpoint(config: RunConfig, name: str, target: Path, fingerprint: str, echo,
                     training: TrainingConfig | None = None) -> bool:
    """Copy ``<models_from>/<target's name>`` to ``target`` when it was trained on this run's dataset (the same
    content ``fingerprint`` and split seed) with ``training`` (default: the run's settings); True when it was.
    A built-in cohort generated on another kind of CPU differs in a few voxels' rounding: there the checkpoint
    is taken when it still predicts its recorded test subjects as it did. A checkpoint trained on anything else
    is left where it is, and the model is trained as usual."""
    shipped = config.models_from / target.name
    if not checkpoint_exists(shipped):
        return False
    try:
        recorded = json.loads(checkpoint_paths(shipped)[1].read_text()).get("extra", {})
    except (OSError, ValueError, AttributeError):
        return False
    dataset = config.dataset
    settings = asdict(training or config.training)
    # a sidecar written before a setting existed trained with its default
    trained_with = {**asdict(TrainingConfig()), **recorded.get("training", {})}
    trained_with = {key: value for key, value in trained_with.items() if key in settings}
    trained_on = recorded.get("dataset", {})
    same = trained_on.get("split_seed") == dataset.split_seed and trained_with == settings
    how = "was trained on this dataset"
    if same and trained_on.get("fingerprint") != fingerprint:
        same = dataset.builtin and _predicts_as_recorded(shipped, config)
        how = (f"was trained on this built-in cohort as generated on another CPU (it predicts the test subjects "
               f"within {PREDICTION_TOLERANCE} y of what it recorded)")
    if not same:
        echo(f"{shipped}: trained on another dataset or with other settings; training {name} here")
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    for source, copy in zip(checkpoint_paths(shipped), checkpoint_paths(target), strict=True):
        atomic_write(copy, lambda path, source=source: shutil.copyfile(source, path))
    echo(f"{name}: the shipped checkpoint {shipped} {how} with these settings; using it (--retrain trains it here)")
    return True


# How far a shipped model's test predictions may move on a built-in cohort generated on another CPU. Its voxels are
# rounded to integers after float work whose last bits differ between CPU kinds (AVX2, AVX-512), so a few voxels
# round the other way and the files' hashes differ; the demo's models then predict within 0.01 y of what their
# sidecars record. A model trained on another cohort misses by years.
PREDICTION_TOLERANCE = 0.05


def _predicts_as_recorded(shipped: Path, config: RunConfig) -> bool:
    """Whether the shipped model predicts every test subject it recorded (``<stem>.test.tsv``: the same subjects,
    ages) within ``PREDICTION_TOLERANCE`` years on this run's dataset: the built-in cohort it was trained on,
    generated here."""
    recorded_path = beside(shipped, ".test.tsv")
    if not recorded_path.is_file():
        return False
    ids, ages, recorded = read_predictions(recorded_path)
    model, _ = load_checkpoint(shipped)
    meta = model.meta
    _, _, data = load_prepared(config.dataset.path, meta.input_shape, meta.voxel_size, progress=False,
                               normalization=meta.normalization, features=config.dataset.features,
                               age_range=config.dataset.age_range)
    if not set(ids) <= set(data.subject_ids):
        return False
    test = data.subset(ids)
    _, predicted = evaluate(model, test, torch.device("cpu"))
    return bool((test.ages - ages).abs().max() < 5e-3 and (predicted - recorded).abs().max() < PREDICTION_TOLERANCE)


def ensure_models(config: RunConfig, device: str, progress: bool = True,
                  echo=tqdm.write, retrain: bool = False) -> dict[str, ModelSource]:
    """The source of every model by label, training the missing registered ones on the run's dataset (a model of
    one's own is never trained here). A model built from trained models (its declared ``requires``) is built
    from their checkpoints: the config's model of that name, else the default checkpoint, trained first when it
    is not there either."""
    sources = model_sources(config)
    registered = [spec for spec in config.models if spec.source is None]
    checkpoints = {spec.label: sources[spec.label].checkpoint for spec in registered}
    for spec in registered:
        if not checkpoint_exists(checkpoints[spec.label]) and not spec.train_if_missing:
            raise MedrobustError(f"{config.source}: model {spec.label!r} has no checkpoint at "
                                 f"{checkpoints[spec.label]} and train_if_missing = false")
    missing = [spec for spec in registered
               if spec.checkpoint is None and not checkpoint_exists(checkpoints[spec.label])]
    if config.models_from is not None and not retrain and missing:
        dataset = config.dataset  # its fingerprint, once for every model
        fingerprint = load_dataset_index(dataset.path, features=dataset.features,
                                         age_range=dataset.age_range).fingerprint()
        for spec in missing:
            adopt_checkpoint(config, spec.name, checkpoints[spec.label], fingerprint, echo,
                             training_of(config, spec))
    # one training call per set of training settings (a defended model and its undefended twin: two)
    groups: dict[TrainingConfig, list[ModelSpec]] = {}
    for spec in registered:
        if not checkpoint_exists(checkpoints[spec.label]):
            groups.setdefault(training_of(config, spec), []).append(spec)
    for training, specs in groups.items():
        twins = [spec for spec in registered if training_of(config, spec) == training]
        _train_missing(config, training, specs, twins, device, progress, echo)
    return sources


def _train_missing(config: RunConfig, training: TrainingConfig, specs: list[ModelSpec], twins: list[ModelSpec],
                   device: str, progress: bool, echo) -> None:
    """Train the models of ``specs`` (all with the settings ``training``) after the models they are built from: the
    config's model of that name with the same settings (``twins``), else the default checkpoint, trained first
    when it is missing too."""
    pending = list(dict.fromkeys(spec.name for spec in specs))
    built_from: list[Path] = []
    for name in pending:  # grows while it is walked: a missing requirement is trained too
        for required in model_requires(name):
            spec = next((s for s in twins if s.name == required), ModelSpec(required, required, training=training))
            path = model_checkpoint(config, spec)
            if required in pending or path in built_from:
                continue
            if checkpoint_exists(path):
                built_from.append(path)
            else:
                pending.append(required)
    names = training_order(pending)
    defence = training.defence()
    how = "" if defence is None else f", adversarially ({defence['attack']} {defence['norm']} {defence['epsilon']:g})"
    echo(f"training {', '.join(names)} on {config.dataset.path}{how} (checkpoints into {config.models_dir})")
    request = TrainRequest(data=config.dataset.path, models=names, out=config.models_dir, config=training,
                           trained=built_from, split_seed=config.dataset.split_seed, device=device,
                           strict=config.dataset.strict, progress=progress, features=config.dataset.features,
                           age_range=config.dataset.age_range)
    for trained in train(request):
        echo(f"trained {trained.name}: clean test MAE {trained.test_metrics['mae']:.2f} y "
             f"({trained.seconds:.0f} s) -> {trained.checkpoint}")
