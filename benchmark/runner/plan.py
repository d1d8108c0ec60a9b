"""Planning a run: every cell of a config with its full spec and id, checked against its models and data, and
the plan cache that lets a finished grid re-run without loading anything."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from medrobust.errors import MedrobustError
from medrobust.models.checkpoint import checkpoint_paths
from medrobust.models.checks import Finding, inspect_model
from medrobust.models.sources import ModelSource
from medrobust.plugins import registered_source_files
from medrobust.runner.cells import SEEDING, Cell, build_attack, expand_cells, is_set_level
from medrobust.runner.config import RunConfig
from medrobust.runner.inputs import LoadedInputs, model_grid
from medrobust.runner.provision import checkpoint_exists, model_sources
from medrobust.vocabulary import SEGMENTER_EXTRACTORS, VOLUME_PREFIX, is_volume

# Subjects the checks of a loaded model run on, before any cell starts.
CHECK_SUBJECTS = 4


def model_findings(config: RunConfig, model, subset, probe: bool = False) -> list[Finding]:
    """The checks of a loaded model (``medrobust.models.checks.inspect_model``) on the first subjects it will be
    attacked on; a model whose predictions depend on the batch passes where the run attacks one at a time."""
    count = min(CHECK_SUBJECTS, len(subset.subject_ids))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    features = subset.features[:count].to(device) if model.meta.uses_features else None
    findings = inspect_model(model, subset.images[:count].to(device), features, probe=probe) if count >= 2 else []
    for finding in findings:
        if finding.name == "batch-independent" and config.batch_size == 1:
            finding.blocking = False
    return findings


def _check_extractors(config: RunConfig, root: Path, loaded: LoadedInputs, label: str, model, subset) -> None:
    """Refuse, before any cell runs, a `recomputed` extractor that cannot measure this model's features: one over
    label maps where there are none (or where the volumes come from files with no label-map region behind them), a
    segmenter on another grid than the model's, or one that measures none of the regions the model takes."""
    for extractor in config.extractors:
        if extractor in SEGMENTER_EXTRACTORS:
            segmenter = loaded.segmenter()[0]
            if model_grid(segmenter) != model_grid(model):
                raise MedrobustError(f"{config.source}: the segmenter {config.segmenter} works on the grid "
                                     f"{model_grid(segmenter)[:3]} and model {label!r} on {model_grid(model)[:3]} "
                                     f"(shape, voxel size, normalization): train the segmenter on the model's grid")
            regions = set(segmenter.region_names)
            if not any(is_volume(name) and name.removeprefix(VOLUME_PREFIX) in regions
                       for name in model.used_feature_names):
                raise MedrobustError(f"{config.source}: the segmenter {config.segmenter} measures none of the "
                                     f"regional volumes model {label!r} takes; train it on this dataset's label maps")
        elif subset.labels is None:
            raise MedrobustError(f"{config.source}: extractor {extractor!r} of threat_model 'recomputed' recomputes "
                                 f"the regional volumes from each subject's label map, and some subjects of {root} "
                                 f"have none (dseg); use extractor 'segmenter' with a trained segmenter")
        elif config.dataset.features and all(label is None for label in subset.feature_labels):
            raise MedrobustError(f"{config.source}: extractor {extractor!r} of threat_model 'recomputed' recomputes "
                                 f"the regional volumes from each subject's label map, and the volumes of "
                                 f"dataset.features are read from {config.dataset.features.format} files, with no "
                                 f"label map region behind them; use extractor 'segmenter' with a trained segmenter, "
                                 f"drop 'recomputed', or take the volumes from the label maps")


def plan_cells(config: RunConfig, root: Path, sources: dict[str, ModelSource], loaded: LoadedInputs,
               echo=None) -> list[Cell]:
    """Every cell of `config` with its full spec and id, checking that models and data fit together and that
    each model passes its checks (a blocking failure is one error; the others are said through ``echo``)."""
    base_spec: dict[str, dict] = {}
    uses_features: dict[str, bool] = {}
    fitting = any(is_set_level(attack.name) for attack in config.attacks)
    for spec in config.models:
        model, record = loaded.model(sources[spec.label])
        grid = model_grid(model)
        subset = loaded.subjects(grid)
        if "recomputed" in config.threat_models and model.meta.uses_features:
            _check_extractors(config, root, loaded, spec.label, model, subset)
        if model.meta.uses_features and list(model.meta.feature_names) != list(subset.feature_names):
            raise MedrobustError(f"model {spec.label!r} ({sources[spec.label].describe()}) takes other context "
                                 f"features than {root} provides ({list(model.meta.feature_names)} against "
                                 f"{list(subset.feature_names)}); retrain it on this dataset, or declare the "
                                 f"features it takes")
        for finding in model_findings(config, model, subset):
            if not finding.passed and finding.blocking:
                raise MedrobustError(f"{config.source}: model {spec.label!r} fails its check '{finding.name}' "
                                     f"before any cell runs: {finding.detail} (`medrobust check-model` shows "
                                     f"every check)")
            if not finding.passed and echo is not None:
                echo(f"warning: model {spec.label!r}: {finding.name}: {finding.detail}")
        # The threat models beyond `fixed` move or re-measure the regional volumes: for a model that takes none,
        # they would repeat `fixed` under another name, so it gets `fixed` alone (and is told so).
        volumes = [name for name in model.used_feature_names if is_volume(name)]
        uses_features[spec.label] = model.meta.uses_features and bool(volumes)
        others = [t for t in config.threat_models if t != "fixed"]
        if model.meta.uses_features and not volumes and others and echo is not None:
            echo(f"warning: model {spec.label!r} takes no regional volume (features {model.used_feature_names}), "
                 f"so {' and '.join(others)} would repeat fixed: it runs under fixed only")
        base_spec[spec.label] = {
            "model": spec.label, "model_name": spec.name, "checkpoint": sources[spec.label].describe(),
            "checkpoint_sha256": record.get("weights_sha256"), **record.get("identity", {}), "dataset": str(root),
            "data_fingerprint": loaded.fingerprint(grid), "split": config.dataset.split,
            "split_seed": config.dataset.split_seed, "count": len(subset.subject_ids),
            "subjects_sha256": hashlib.sha256(json.dumps(subset.subject_ids).encode()).hexdigest(),
            "brain_mask": config.brain_mask, "seed": config.seed, "seeding": SEEDING,
            "batch_size": config.batch_size, "precision": config.precision, "ssim": config.ssim,
            "device": str(loaded.device)}
        if fitting:  # the subjects a universal perturbation is fitted on belong to its cells' identity
            fit_ids = loaded.subjects(grid, fitting=True).subject_ids
            base_spec[spec.label]["fit"] = {
                "fit_split": config.dataset.fit_split, "fit_count": len(fit_ids),
                "fit_subjects_sha256": hashlib.sha256(json.dumps(fit_ids).encode()).hexdigest()}
    cells = expand_cells(config, base_spec, uses_features)
    for cell in cells:
        if cell.extractor in SEGMENTER_EXTRACTORS:  # the segmenter's weights decide the recomputed features
            cell.spec["segmenter_sha256"] = loaded.segmenter()[1]["weights_sha256"]
        fit = cell.spec.pop("fit", None)
        if fit is not None and is_set_level(cell.attack.name):
            cell.spec.update(fit)
        try:  # the attack's full argument list (defaults included) belongs to the cell's identity
            model, _ = loaded.model(sources[cell.model])
            cell.spec["params"] = build_attack(cell, model, config).params()
        except MedrobustError as err:  # e.g. an image attack on a features-only model: a config mistake
            raise MedrobustError(f"{config.source}: {cell.describe()}: {err}") from None
        cell.spec["cell_seed"] = cell.seed
    same: dict[str, str] = {}
    for cell in cells:  # the label names a model, it is not part of it: two labels of one model are one model
        other = same.setdefault(cell.id, cell.model)
        if other != cell.model:
            raise MedrobustError(f"{config.source}: models {other!r} and {cell.model!r} are the same model (same "
                                 f"architecture, weights, code and contract); keep one [[models]] entry")
    return cells


def plan(config: RunConfig) -> list[Cell]:
    """The cells `config` describes, with their ids, without running or training anything (the dataset and every
    checkpoint must exist): what ``medrobust status --config`` compares with a store."""
    root = config.dataset.path
    sources = model_sources(config)
    missing = [f"{label} ({source.checkpoint})" for label, source in sources.items()
               if source.checkpoint is not None and not checkpoint_exists(source.checkpoint)]
    if missing:
        raise MedrobustError(f"{config.source}: no checkpoint yet for {', '.join(missing)}; `medrobust run` trains "
                             f"them")
    if not Path(root).is_dir():
        raise MedrobustError(f"{config.source}: dataset {root} does not exist yet; `medrobust run` creates it")
    return plan_cells(config, root, sources, LoadedInputs(config, root, torch.device("cpu")))


# The grid's cell ids, cached in the run folder under a key of everything they derive from, so that re-running a
# finished grid answers without loading models or subjects.
PLAN_CACHE = "plan-cache.json"


def _stat(path: Path) -> tuple[str, int, int]:
    """(path, size, modification time) of a file for the plan's key; a link whose target is gone (a dangling
    symlink in the dataset folder) counts as itself, so it neither crashes the key nor goes unnoticed."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        stat = path.lstat()
    return str(path), stat.st_size, stat.st_mtime_ns


def plan_key(config: RunConfig, root: Path, sources: dict[str, ModelSource], device: torch.device) -> str:
    """A hash of the config, this package's version and seeding scheme, the device, and the size and modification
    time of every checkpoint and dataset file (the preprocessing cache aside) and features file, of this package's
    own source files
    and of every registered model's and attack's, plugins included (an attack's supported threat models or
    defaults decide the grid): any change means a new plan."""
    import medrobust
    import medrobust.attacks
    import medrobust.models
    from medrobust import __version__

    files = [path for source in sources.values() for path in source.files()]
    for package in (medrobust, medrobust.attacks, medrobust.models):
        files.extend(sorted(Path(package.__file__).parent.rglob("*.py")))
    files.extend(path for path in registered_source_files() if path not in files)
    if config.dataset.features is not None:  # features read from outside the dataset folder
        files.extend(config.dataset.features.files())
    if config.segmenter is not None:
        files.extend(checkpoint_paths(config.segmenter))
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files.extend(Path(folder) / name for name in sorted(names))
    stats = [_stat(path) for path in files]
    content = {"config": config.raw, "source": str(config.source), "version": __version__, "seeding": SEEDING,
               "device": str(device), "files": stats}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def cached_plan(config: RunConfig, key: str) -> list[str] | None:
    """The cell ids of the plan cached under ``key``, or None."""
    try:
        cached = json.loads((config.out / PLAN_CACHE).read_text())
    except (OSError, ValueError):
        return None
    return cached.get("cells") if isinstance(cached, dict) and cached.get("key") == key else None


def check_models(config: RunConfig, labels: list[str] | None = None, probe: bool = True) -> dict[str, list[Finding]]:
    """Every check of each model of `config` (or of those ``labels``) on the first subjects it would be attacked
    on, nothing trained or run (the dataset and every checkpoint must exist): ``medrobust check-model``."""
    root = config.dataset.path
    if not Path(root).is_dir():
        raise MedrobustError(f"{config.source}: dataset {root} does not exist yet; `medrobust run` creates it")
    sources = model_sources(config)
    chosen = [spec for spec in config.models if labels is None or spec.label in labels]
    unknown = sorted(set(labels or []) - {spec.label for spec in config.models})
    if unknown:
        raise MedrobustError(f"{config.source}: no model labelled {unknown[0]!r}; labels: "
                             f"{', '.join(spec.label for spec in config.models)}")
    loaded = LoadedInputs(config, root, torch.device("cpu"))
    findings = {}
    for spec in chosen:
        source = sources[spec.label]
        if source.checkpoint is not None and not checkpoint_exists(source.checkpoint):
            raise MedrobustError(f"{config.source}: no checkpoint yet for {spec.label} ({source.checkpoint}); "
                                 f"`medrobust run` trains it")
        model, _ = loaded.model(source)
        findings[spec.label] = model_findings(config, model, loaded.subjects(model_grid(model)), probe)
    return findings
