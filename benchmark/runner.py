"""The runner: dataset -> models -> cells (model x attack x budget x objective x threat model) -> store.

Data flows one way: the runner prepares the data and the models, runs each pending cell's attack batch by batch,
computes the per-subject and per-cell metrics and writes each finished cell in one transaction. A cell's id is a
hash of everything that decides its result, so re-running a config skips the cells already in the store.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medrobust.attacks import Budget, attack_entrypoint, create_attack, perturbation_norms
from medrobust.cohort import synthesize
from medrobust.config import AttackSpec, ModelSpec, RunConfig, builtin_cohort
from medrobust.context import SoftVolumes
from medrobust.environment import describe_environment
from medrobust.errors import MedrobustError
from medrobust.metrics import cell_metrics
from medrobust.models import BrainAgeModel, load_checkpoint
from medrobust.models.checkpoint import checkpoint_paths
from medrobust.preprocess import PreparedDataset
from medrobust.sanity import reliability_flags
from medrobust.splits import load_or_create_splits
from medrobust.store import ResultStore
from medrobust.training import TRAINING_ORDER, TrainRequest, load_prepared, resolve_device, train

# Spec keys that locate or describe a cell without changing its result: left out of its id.
_NOT_IDENTITY = ("checkpoint", "dataset", "device")


@dataclass
class Cell:
    """One unit of work and of results: a model under one attack, budget, objective and threat model."""

    model: str  # the model's label
    attack: AttackSpec
    budget: Budget
    objective: str
    threat_model: str
    spec: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        identity = {k: v for k, v in self.spec.items() if k not in _NOT_IDENTITY}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (f"{self.model} {self.attack.name} {self.budget.norm} eps={self.budget.epsilon:g} {self.budget.unit}"
                f" {self.objective} {self.threat_model}")


@dataclass
class RunSummary:
    """What one `medrobust run` did."""

    out: Path
    store: Path
    cells: int
    skipped: int
    done: int
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell description, error)
    unreliable: int = 0  # cells the sanity checks flag
    seconds: float = 0.0


def model_checkpoint(config: RunConfig, spec: ModelSpec) -> Path:
    """Where a model's checkpoint is: the configured one, else <models_dir>/<name>-seed<training seed>."""
    return spec.checkpoint or config.models_dir / f"{spec.name}-seed{config.training.seed}"


def _exists(checkpoint: Path) -> bool:
    return all(path.is_file() for path in checkpoint_paths(checkpoint))


def ensure_dataset(config: RunConfig, progress: bool = True) -> Path:
    """The dataset folder; the built-in cohort is generated there first when asked and not there yet."""
    if config.dataset.builtin:
        return synthesize(config.dataset.path, builtin_cohort(config.dataset), progress=progress)
    return config.dataset.path


def ensure_models(config: RunConfig, device: str, progress: bool = True, echo=tqdm.write) -> dict[str, Path]:
    """Checkpoint per model label, training the missing built-in ones on the run's dataset."""
    checkpoints = {spec.label: model_checkpoint(config, spec) for spec in config.models}
    missing = sorted({spec.name for spec in config.models if not _exists(checkpoints[spec.label])},
                     key=lambda name: (TRAINING_ORDER + (name,)).index(name))
    for spec in config.models:
        if not _exists(checkpoints[spec.label]) and not spec.train_if_missing:
            raise MedrobustError(f"{config.source}: model {spec.label!r} has no checkpoint at "
                                 f"{checkpoints[spec.label]} and train_if_missing = false")
    if not missing:
        return checkpoints
    trunk = None
    if "hybrid" in missing and "cnn3d" not in missing:
        trunk_spec = next((s for s in config.models if s.name == "cnn3d"), ModelSpec("cnn3d", "cnn3d"))
        trunk = model_checkpoint(config, trunk_spec)
        if not _exists(trunk):
            missing.insert(0, "cnn3d")  # the two-stage hybrid is trained on a trained cnn3d
            trunk = None
    echo(f"training {', '.join(missing)} on {config.dataset.path} (checkpoints into {config.models_dir})")
    request = TrainRequest(data=config.dataset.path, models=missing, out=config.models_dir,
                           config=config.training, trunk=trunk, split_seed=config.dataset.split_seed, device=device,
                           strict=config.dataset.strict, progress=progress)
    for trained in train(request):
        echo(f"trained {trained.name}: clean test MAE {trained.test_metrics['mae']:.2f} y "
             f"({trained.seconds:.0f} s) -> {trained.checkpoint}")
    return checkpoints


def evaluation_subset(config: RunConfig, root: Path, all_ids: list[str], data: PreparedDataset,
                      fitting: bool = False) -> PreparedDataset:
    """The configured split's usable subjects, `count` of them drawn with the split seed, in id order; with
    ``fitting``, those of the split a universal perturbation is fitted on (`fit_split`, `fit_count`)."""
    name, key = ("fit_split", "fit_count") if fitting else ("split", "count")
    split = load_or_create_splits(root, all_ids, config.dataset.split_seed)[getattr(config.dataset, name)]
    usable = set(data.subject_ids)
    ids = [s for s in split if s in usable]
    count = getattr(config.dataset, key) or (config.dataset.count if fitting else None) or len(ids)
    if count > len(ids):
        raise MedrobustError(f"{config.source}: dataset.{key} = {count} but the {getattr(config.dataset, name)} "
                             f"split of {root} has {len(ids)} usable subjects; lower dataset.{key}")
    return data.subset(sorted(random.Random(config.dataset.split_seed).sample(ids, count)))


def _fits(attack_name: str) -> bool:
    """Whether the attack fits one perturbation on a set (universal) rather than attacking each batch."""
    return callable(getattr(attack_entrypoint(attack_name), "fit", None))


def expand_cells(config: RunConfig, base_spec: dict[str, dict], uses_features: dict[str, bool] | None = None
                 ) -> list[Cell]:
    """Every (model, attack, budget, objective, threat model) of the config, with its spec. An attack meets only
    the budgets and threat models it supports; a model without context features (``uses_features`` False) only
    the threat model ``fixed``, the others being the same for it."""
    cells = []
    for spec in config.models:
        for attack in config.attacks:
            entry = attack_entrypoint(attack.name)
            budgets = [b for b in (attack.budgets or config.budgets) if b.norm in entry.norms]
            threat_models = [t for t in config.threat_models if t in entry.threat_models
                             and (t == "fixed" or (uses_features or {}).get(spec.label, True))]
            for budget in budgets:
                for objective in config.objectives:
                    for threat_model in threat_models:
                        cell = Cell(spec.label, attack, budget, objective, threat_model)
                        cell.spec = {**base_spec[spec.label], "attack": attack.name, **budget.as_dict(),
                                     "objective": objective, "threat_model": threat_model}
                        cells.append(cell)
    return cells


def _grid(model: BrainAgeModel) -> tuple:
    return tuple(model.meta.input_shape), tuple(model.meta.voxel_size)


def _attack_for(cell: Cell, model: BrainAgeModel, config: RunConfig):
    return create_attack(cell.attack.name, model, budget=cell.budget, objective=cell.objective,
                         target_age=config.target_age, threat_model=cell.threat_model, seed=config.seed,
                         **cell.attack.params)


def _batches(data: PreparedDataset, model: BrainAgeModel, config: RunConfig, device: torch.device | None):
    """(rows slice, images, features, ages, mask) per batch of `data`, on `device` (None: left in host memory)."""
    def move(tensor):
        return tensor if device is None else tensor.to(device)

    for start in range(0, len(data.subject_ids), config.batch_size):
        rows = slice(start, start + config.batch_size)
        yield (rows, move(data.images[rows]), move(data.features[rows]) if model.meta.uses_features else None,
               move(data.ages[rows]), move(data.masks[rows]) if config.brain_mask else None)


def _attack_subjects(call, data: PreparedDataset, model: BrainAgeModel, config: RunConfig, device: torch.device,
                     bar: tqdm | None = None, recompute: bool = False) -> tuple[dict, list[dict]]:
    """Run ``call`` (an attack, or a fitted universal perturbation's ``apply``) over every subject of `data`;
    returns (metrics, per-subject rows). With ``recompute`` (threat model ``recomputed``) each batch comes with
    a soft-volume extractor over its label maps."""
    rows: list[dict] = []
    counters = {"forward": 0, "backward": 0, "steps": 0}
    attack_seconds = 0.0
    feature_change: list[torch.Tensor] = []
    for batch, images, features, ages, mask in _batches(data, model, config, device):
        began = time.perf_counter()
        extra = {}
        if recompute:
            extra["extractor"] = SoftVolumes(data.labels[batch].to(images.device), data.feature_labels,
                                             data.feature_names, images, features)
        result = call(images, features=features, ages=ages, mask=mask, **extra)
        norms = perturbation_norms(result.images - images)
        image_range = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).clamp_min(1e-12)
        if features is not None:  # how far the threat model moved the context features (0 under "fixed")
            moved = ((result.features - features).abs() / features.abs().clamp_min(1e-12)).nan_to_num(0.0)
            feature_change.append(moved.amax(dim=1).detach().double().cpu())
        # One host transfer per batch (it also waits for the device, so the attack time is honest on CUDA).
        host = {k: v.detach().double().cpu() for k, v in {
            "clean_prediction": result.clean_prediction, "adversarial_prediction": result.adversarial_prediction,
            "linf": norms["linf"], "l2": norms["l2"], "linf_rel": norms["linf"] / image_range,
            "l2_rel": norms["l2"] / image_range}.items()}
        attack_seconds += time.perf_counter() - began
        for key in counters:
            counters[key] += getattr(result, key)
        for i, subject in enumerate(data.subject_ids[batch]):
            row = {"subject": subject, "true_age": float(data.ages[batch.start + i]),
                   **{k: float(v[i]) for k, v in host.items()}}
            row["deviation"] = row["adversarial_prediction"] - row["clean_prediction"]
            rows.append(row)
        if bar is not None:
            bar.update(1)
    metrics = cell_metrics(*(([r[k] for r in rows]) for k in ("true_age", "clean_prediction",
                                                               "adversarial_prediction", "linf", "l2", "linf_rel",
                                                               "l2_rel")))
    metrics.update(counters, attack_seconds=attack_seconds)
    if feature_change:  # the largest relative change of any context feature, averaged over subjects
        metrics["mean_feature_change_rel"] = float(torch.cat(feature_change).mean())
    return metrics, rows


# Metrics of a universal perturbation on the subjects it was fitted on, reported beside the held-out ones.
FIT_METRICS = ("n", "clean_mae", "adversarial_mae", "mean_abs_deviation", "mean_deviation", "success_5y")


def run_cell(cell: Cell, model: BrainAgeModel, data: PreparedDataset, config: RunConfig, device: torch.device,
             bar: tqdm | None = None, fit_data: PreparedDataset | None = None) -> tuple[dict, list[dict]]:
    """Attack every subject of `data` in batches; returns (cell metrics, per-subject rows). A universal
    perturbation is fitted once on `fit_data` (its batches stay in host memory until used), then applied to
    `data` (the held-out subjects whose rows are stored); its effect on the fitting subjects is in `fit_*`."""
    attack = _attack_for(cell, model, config)
    if fit_data is None or not _fits(cell.attack.name):
        return _attack_subjects(attack, data, model, config, device, bar, cell.threat_model == "recomputed")
    began = time.perf_counter()
    attack.fit([batch[1:] for batch in _batches(fit_data, model, config, None)])
    fit_seconds = time.perf_counter() - began
    metrics, rows = _attack_subjects(attack.apply, data, model, config, device, bar)
    on_fit, _ = _attack_subjects(attack.apply, fit_data, model, config, device)
    for key, count in zip(("forward", "backward", "steps"), attack.fit_counters, strict=True):
        metrics[key] += count
    metrics["attack_seconds"] += fit_seconds
    metrics.update({f"fit_{key}": on_fit[key] for key in FIT_METRICS})
    return metrics, rows


@dataclass
class _Loaded:
    """The run's models by label, their cells' shared spec, and the attacked (and fitting) subjects per grid."""

    models: dict[str, BrainAgeModel] = field(default_factory=dict)
    base_spec: dict[str, dict] = field(default_factory=dict)
    subsets: dict[tuple, PreparedDataset] = field(default_factory=dict)
    fit_sets: dict[tuple, PreparedDataset] = field(default_factory=dict)  # where a universal attack is configured


def _load(config: RunConfig, root: Path, checkpoints: dict[str, Path], device: torch.device,
          progress: bool) -> _Loaded:
    """Load every model and prepare the subjects once per model grid, checking they fit together."""
    loaded = _Loaded()
    fitting = any(_fits(attack.name) for attack in config.attacks)
    fingerprint = None
    for spec in config.models:
        model, sidecar = load_checkpoint(checkpoints[spec.label], device)
        grid = _grid(model)
        if grid not in loaded.subsets:
            index, _, prepared = load_prepared(root, *grid, strict=config.dataset.strict, progress=progress)
            all_ids = [s.subject_id for s in index.subjects]
            loaded.subsets[grid] = evaluation_subset(config, index.root, all_ids, prepared)
            if fitting:
                loaded.fit_sets[grid] = evaluation_subset(config, index.root, all_ids, prepared, fitting=True)
            fingerprint = fingerprint or index.fingerprint()
        subset = loaded.subsets[grid]
        if "recomputed" in config.threat_models and model.meta.uses_features and subset.labels is None:
            raise MedrobustError(f"{config.source}: threat_model 'recomputed' recomputes the regional volumes from "
                                 f"each subject's label map, and some subjects of {root} have none (dseg)")
        if model.meta.uses_features and list(model.meta.feature_names) != list(subset.feature_names):
            raise MedrobustError(f"model {spec.label!r} ({checkpoints[spec.label]}) was trained on other context "
                                 f"features than {root} provides; retrain it on this dataset")
        loaded.models[spec.label] = model
        loaded.base_spec[spec.label] = {
            "model": spec.label, "model_name": spec.name, "checkpoint": str(checkpoints[spec.label]),
            "checkpoint_sha256": sidecar.get("weights_sha256"), "dataset": str(root), "data_fingerprint": fingerprint,
            "split": config.dataset.split, "split_seed": config.dataset.split_seed, "count": len(subset.subject_ids),
            "subjects_sha256": hashlib.sha256(json.dumps(subset.subject_ids).encode()).hexdigest(),
            "brain_mask": config.brain_mask, "seed": config.seed, "batch_size": config.batch_size,
            "device": str(device)}
    return loaded


def run(config: RunConfig, progress: bool = True, echo=tqdm.write) -> RunSummary:
    """Run every pending cell of `config` and record it in `<out>/results.sqlite`."""
    began = time.perf_counter()
    device = resolve_device(config.device)
    if device.type == "cuda":
        # fp32 means fp32, and a re-run repeats: no TF32 in convolutions or matrix products (it moves predictions
        # by hundredths of a year), and deterministic cuDNN algorithms (the default 3D convolution backward is not).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    config.out.mkdir(parents=True, exist_ok=True)
    root = ensure_dataset(config, progress)
    checkpoints = ensure_models(config, str(device), progress, echo)

    loaded = _load(config, root, checkpoints, device, progress)
    models, subsets, fit_sets = loaded.models, loaded.subsets, loaded.fit_sets

    cells = expand_cells(config, loaded.base_spec, {label: m.meta.uses_features for label, m in models.items()})
    for cell in cells:  # the attack's full argument list (defaults included) belongs to the cell's identity
        if _fits(cell.attack.name):  # so do the subjects a universal perturbation is fitted on
            fit_ids = fit_sets[_grid(models[cell.model])].subject_ids
            cell.spec.update(fit_split=config.dataset.fit_split, fit_count=len(fit_ids),
                             fit_subjects_sha256=hashlib.sha256(json.dumps(fit_ids).encode()).hexdigest())
        try:
            cell.spec["params"] = _attack_for(cell, models[cell.model], config).params()
        except MedrobustError as err:  # e.g. an image attack on a features-only model: a config mistake
            raise MedrobustError(f"{config.source}: {cell.describe()}: {err}") from None
    with ResultStore(config.out) as store:
        run_id = store.start_run(config.raw, describe_environment(device))
        finished = store.finished_cells()
        pending = [cell for cell in cells if cell.id not in finished]
        skipped = len(cells) - len(pending)
        if skipped:
            echo(f"{skipped} of {len(cells)} cells already finished in {store.path}; skipping them")
        summary = RunSummary(out=config.out, store=store.path, cells=len(cells), skipped=skipped, done=0)
        batches = {label: -(-len(subsets[_grid(m)].subject_ids) // config.batch_size) for label, m in models.items()}
        bar = tqdm(total=sum(batches[c.model] for c in pending), unit="batch", disable=not progress or not pending)
        for number, cell in enumerate(pending, start=1):
            model = models[cell.model]
            data = subsets[_grid(model)]
            bar.set_description(f"cell {number}/{len(pending)} {cell.describe()}")
            started = time.perf_counter()
            try:
                metrics, rows = run_cell(cell, model, data, config, device, bar, fit_sets.get(_grid(model)))
            except Exception as err:  # a broken cell is recorded with its reason; the grid goes on
                error = f"{type(err).__name__}: {err}"
                store.write_cell(cell.id, run_id, cell.spec, {}, [], time.perf_counter() - started, "failed", error)
                summary.failed.append((cell.describe(), error))
                echo(f"FAILED {cell.describe()}: {error}")
                continue
            seconds = time.perf_counter() - started
            store.write_cell(cell.id, run_id, cell.spec, metrics, rows, seconds)
            summary.done += 1
            echo(f"{cell.describe()}: mean |deviation| {metrics['mean_abs_deviation']:.2f} y, adversarial MAE "
                 f"{metrics['adversarial_mae']:.2f} y (clean {metrics['clean_mae']:.2f} y), {seconds:.1f} s")
        bar.close()
        # The checks compare cells with each other, so they are redone over the whole store each time.
        flags = reliability_flags(store.cells())
        store.write_reliability(flags)
        summary.unreliable = len(flags)
        names = {cell.id: cell.describe() for cell in cells}
        for cell_id, reasons in sorted(flags.items()):
            echo(f"possibly unreliable: {names.get(cell_id, 'cell ' + cell_id)}: {'; '.join(reasons)}")
        store.finish_run(run_id)
    summary.seconds = time.perf_counter() - began
    return summary
