"""The runner: dataset -> models -> cells (model x attack x budget x objective x threat model) -> store.

Data flows one way: the runner prepares the data and the models, runs each pending cell's attack batch by batch,
computes the per-subject and per-cell metrics and writes each finished cell in one transaction. A cell's id is a
hash of everything that decides its result, so re-running a config skips the cells already in the store.

The driver (``run``) holds the store's writer lock, plans the grid (``_plan``; cached in the run folder so that a
finished grid re-runs without loading anything), and hands the pending cells as ``CellTask``s to an executor
(``medrobust.runner.executors``: in this process, one worker per GPU, or Ray tasks); a worker runs a cell with
``perform`` in its own ``Workspace`` (models and subjects loaded once per process and device) and returns a
``CellOutcome``, which only the driver writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medrobust.attacks import Budget, attack_entrypoint, create_attack, perturbation_norms
from medrobust.attacks.extractors import make_extractor
from medrobust.data.cohort import synthesize
from medrobust.data.preprocess import PreparedDataset
from medrobust.data.splits import load_or_create_splits
from medrobust.environment import describe_environment
from medrobust.errors import MedrobustError
from medrobust.models import BrainAgeModel, load_checkpoint
from medrobust.models.checkpoint import checkpoint_paths
from medrobust.results.metrics import image_metrics, rows_metrics
from medrobust.results.reliability import reliability_flags
from medrobust.results.store import ResultStore, describe_spec
from medrobust.runner.config import AttackSpec, ModelSpec, RunConfig, builtin_cohort
from medrobust.training import TRAINING_ORDER, TrainRequest, load_prepared, resolve_device, train

# Spec keys that locate or describe a cell without changing its result: left out of its id.
_NOT_IDENTITY = ("checkpoint", "dataset", "device", "cell_seed")
# Spec keys that decide what is measured, not what the attack does: part of a cell's id, not of its seed.
_MEASUREMENT_ONLY = ("ssim",)
# How a cell's random draws are seeded (part of its id, so cells computed under another scheme are redone):
# 2 = the attack's seed derived from the cell's attack setting, and one random stream per subject.
SEEDING = 2
# The autocast dtype of each reduced precision (fp32: no autocast).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        return _digest({k: v for k, v in self.spec.items() if k not in _NOT_IDENTITY})

    @property
    def seed(self) -> int:
        """The seed of the cell's random draws, from everything that decides what its attack does (not what is
        measured of it): two cells draw differently, a re-run repeats, and switching a measurement off or on
        leaves the attacked images as they were."""
        drop = _NOT_IDENTITY + _MEASUREMENT_ONLY
        return int(_digest({k: v for k, v in self.spec.items() if k not in drop})[:8], 16)

    def describe(self) -> str:
        return describe_spec({"model": self.model, "attack": self.attack.name, **self.budget.as_dict(),
                              "objective": self.objective, "threat_model": self.threat_model})


@dataclass
class RunSummary:
    """What one `medrobust run` did."""

    out: Path
    store: Path
    cells: int
    skipped: int
    done: int
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell description, error)
    failed_before: int = 0  # cells that failed in an earlier run and were skipped (not retried)
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
                        if threat_model == "recomputed":  # how the features are measured on the attacked image
                            cell.spec["extractor"] = config.extractor
                        cells.append(cell)
    return cells


def _grid(model: BrainAgeModel) -> tuple:
    return tuple(model.meta.input_shape), tuple(model.meta.voxel_size)


def _digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def subject_seeds(seed: int, subjects: list[str]) -> list[int]:
    """One seed per subject (its own random stream), so that a result does not depend on how the subjects are cut
    into batches: a batch halved after an out-of-memory error gives the same images."""
    return [int(hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()[:8], 16) for subject in subjects]


def _attack_for(cell: Cell, model: BrainAgeModel, config: RunConfig, seed: int | None = None):
    return create_attack(cell.attack.name, model, budget=cell.budget, objective=cell.objective,
                         target_age=config.target_age, threat_model=cell.threat_model,
                         seed=config.seed if seed is None else seed, **cell.attack.params)


def _inputs(data: PreparedDataset, rows: slice, model: BrainAgeModel, config: RunConfig,
            device: torch.device | None, recompute: bool = False) -> dict:
    """An attack's keyword arguments for the subjects ``rows`` of `data`, on `device` (None: host memory); with
    ``recompute`` (threat model ``recomputed``), the config's feature extractor over the batch's label maps."""
    def move(tensor):
        return tensor if device is None else tensor.to(device)

    images = move(data.images[rows])
    inputs = {"images": images, "features": move(data.features[rows]) if model.meta.uses_features else None,
              "ages": move(data.ages[rows]), "mask": move(data.masks[rows]) if config.brain_mask else None}
    if recompute:
        inputs["extractor"] = make_extractor(config.extractor, data.labels[rows].to(images.device),
                                             data.feature_labels, data.feature_names, images, inputs["features"])
    return inputs


def _batches(data: PreparedDataset, model: BrainAgeModel, config: RunConfig, device: torch.device | None,
             recompute: bool = False) -> list[tuple]:
    """The batches of `data` as (images, features, ages, mask[, extractor]) tuples: what a universal attack fits on."""
    return [tuple(_inputs(data, slice(start, start + config.batch_size), model, config, device, recompute).values())
            for start in range(0, len(data.subject_ids), config.batch_size)]


def autocast(device: torch.device, precision: str):
    """The context the model's passes run in: nothing for fp32, torch.autocast in bfloat16 or float16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def _takes(call: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


class _Timer:
    """Attack time: CUDA events on a GPU (device time, no host stall inside the attack), wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    @contextlib.contextmanager
    def measure(self):
        if not self.cuda:
            began = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - began
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()
        self.seconds += start.elapsed_time(end) / 1000


def _attack_subjects(call, data: PreparedDataset, model: BrainAgeModel, config: RunConfig, device: torch.device,
                     on_batch: Callable[[dict], None] | None = None, recompute: bool = False, seed: int = 0,
                     parity: bool = True) -> tuple[dict, list[dict]]:
    """Run ``call`` (an attack, or a fitted universal perturbation's ``apply``) over every subject of `data`;
    returns (metrics, per-subject rows). With ``recompute`` (threat model ``recomputed``) each batch comes with
    the config's feature extractor over its label maps. A callable that takes ``sample_seeds`` gets one seed per
    subject.

    Batches have ``config.batch_size`` subjects until the device runs out of memory: the batch is then halved and
    retried (down to one subject), and later batches keep the smaller size; ``batch_size_used`` records it. In
    reduced precision (``config.precision``), the first batch is attacked in fp32 too and both mean |deviation|
    are kept (``parity_*``) for the sanity checks (with ``parity``)."""
    rows: list[dict] = []
    counters = {"forward": 0, "backward": 0, "steps": 0}
    timer = _Timer(device)
    feature_change: list[torch.Tensor] = []
    extra: dict = {}
    size, count, start = config.batch_size, len(data.subject_ids), 0
    seeded = _takes(call, "sample_seeds")
    while start < count:
        batch = slice(start, min(start + size, count))
        subjects = data.subject_ids[batch]
        try:
            inputs = _inputs(data, batch, model, config, device, recompute)
            if seeded:
                inputs["sample_seeds"] = subject_seeds(seed, subjects)
            with timer.measure(), autocast(device, config.precision):
                result = call(**inputs)
            if parity and config.precision != "fp32" and "parity_mean_abs_deviation" not in extra:
                reference = call(**inputs)  # the same first batch in fp32, outside the attack's time
                extra["parity_mean_abs_deviation"] = _mean_abs_deviation(result)
                extra["parity_fp32_mean_abs_deviation"] = _mean_abs_deviation(reference)
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            inputs = result = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            size = max(1, size // 2)
            continue
        images = inputs["images"]
        norms = perturbation_norms(result.images - images)
        image_range = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).clamp_min(1e-12)
        features = inputs["features"]
        if features is not None:  # how far the threat model moved the context features (0 under "fixed")
            moved = ((result.features - features).abs() / features.abs().clamp_min(1e-12)).nan_to_num(0.0)
            feature_change.append(moved.amax(dim=1).detach().double().cpu())
        # One host transfer per batch.
        host = {k: v.detach().double().cpu() for k, v in {
            "clean_prediction": result.clean_prediction, "adversarial_prediction": result.adversarial_prediction,
            "linf": norms["linf"], "l2": norms["l2"], "linf_rel": norms["linf"] / image_range,
            "l2_rel": norms["l2"] / image_range,
            **image_metrics(images, result.images.to(images.dtype), inputs["mask"], config.ssim)}.items()}
        for key in counters:
            counters[key] += getattr(result, key)
        for i, subject in enumerate(subjects):
            row = {"subject": subject, "true_age": float(data.ages[batch.start + i]),
                   **{k: float(v[i]) for k, v in host.items()}}
            row["l0"] = int(row["l0"])
            row["deviation"] = row["adversarial_prediction"] - row["clean_prediction"]
            rows.append(row)
        start = batch.stop
        if on_batch is not None:
            on_batch({"done": len(rows), "of": count,
                      "mean_abs_deviation": sum(abs(r["deviation"]) for r in rows) / len(rows)})
    metrics = rows_metrics(rows)
    metrics.update(counters, attack_seconds=timer.seconds, batch_size_used=size, **extra)
    if feature_change:  # the largest relative change of any context feature, averaged over subjects
        metrics["mean_feature_change_rel"] = float(torch.cat(feature_change).mean())
    return metrics, rows


def _mean_abs_deviation(result) -> float:
    return float((result.adversarial_prediction.double() - result.clean_prediction.double()).abs().mean())


# Metrics of a universal perturbation on the subjects it was fitted on, reported beside the held-out ones.
FIT_METRICS = ("n", "clean_mae", "adversarial_mae", "mean_abs_deviation", "mean_deviation", "success_5y")


def run_cell(cell: Cell, model: BrainAgeModel, data: PreparedDataset, config: RunConfig, device: torch.device,
             on_batch: Callable[[dict], None] | None = None, fit_data: PreparedDataset | None = None,
             seed: int | None = None) -> tuple[dict, list[dict]]:
    """Attack every subject of `data` in batches; returns (cell metrics, per-subject rows). A universal
    perturbation is fitted once on `fit_data` (its batches stay in host memory until used), then applied to
    `data` (the held-out subjects whose rows are stored); its effect on the fitting subjects is in `fit_*`.
    ``seed``: of the attack's random draws (default: the run's seed)."""
    seed = config.seed if seed is None else seed
    attack = _attack_for(cell, model, config, seed)
    recompute = cell.threat_model == "recomputed"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if fit_data is None or not _fits(cell.attack.name):
        metrics, rows = _attack_subjects(attack, data, model, config, device, on_batch, recompute, seed)
    else:
        began = time.perf_counter()
        with autocast(device, config.precision):
            attack.fit(_batches(fit_data, model, config, None, recompute))
        fit_seconds = time.perf_counter() - began
        metrics, rows = _attack_subjects(attack.apply, data, model, config, device, on_batch, recompute, seed)
        on_fit, _ = _attack_subjects(attack.apply, fit_data, model, config, device, None, recompute, seed,
                                     parity=False)
        for key, count in zip(("forward", "backward", "steps"), attack.fit_counters, strict=True):
            metrics[key] += count
        metrics["attack_seconds"] += fit_seconds
        metrics.update({f"fit_{key}": on_fit[key] for key in FIT_METRICS})
    metrics["timing"] = "cuda-events" if device.type == "cuda" else "wall-clock"
    metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return metrics, rows


class Workspace:
    """The models and prepared subjects one process attacks on one device, each loaded once.

    The driver's workspace also plans the grid; an executor's worker builds its own from the paths of its tasks.
    """

    def __init__(self, config: RunConfig, root: Path, device: torch.device, progress: bool = False) -> None:
        self.config, self.root, self.device, self.progress = config, Path(root), device, progress
        self._models: dict[str, tuple[BrainAgeModel, dict]] = {}
        self._prepared: dict[tuple, tuple] = {}  # grid -> (index, prepared dataset)
        self._subjects: dict[tuple, PreparedDataset] = {}  # (grid, fitting) -> subjects

    def model(self, checkpoint: Path) -> tuple[BrainAgeModel, dict]:
        """The model of a checkpoint on this workspace's device, and its sidecar."""
        key = str(checkpoint)
        if key not in self._models:
            self._models[key] = load_checkpoint(checkpoint, self.device)
        return self._models[key]

    def _index(self, grid: tuple) -> tuple:
        if grid not in self._prepared:
            index, _, prepared = load_prepared(self.root, *grid, strict=self.config.dataset.strict,
                                               progress=self.progress)
            self._prepared[grid] = (index, prepared)
        return self._prepared[grid]

    def fingerprint(self, grid: tuple) -> str:
        return self._index(grid)[0].fingerprint()

    def subjects(self, grid: tuple, fitting: bool = False) -> PreparedDataset:
        """The attacked subjects of the model grid ``grid`` (or, with ``fitting``, those a universal perturbation
        is fitted on), drawn as the config says."""
        if (grid, fitting) not in self._subjects:
            index, prepared = self._index(grid)
            all_ids = [s.subject_id for s in index.subjects]
            self._subjects[grid, fitting] = evaluation_subset(self.config, index.root, all_ids, prepared, fitting)
        return self._subjects[grid, fitting]


@dataclass
class CellTask:
    """What an executor runs: one cell and where its model and data live (paths, no tensors: it pickles small)."""

    cell: Cell
    config: RunConfig
    root: Path
    checkpoint: Path


@dataclass
class CellOutcome:
    """A finished cell as the driver writes it: status ``done`` with metrics and rows, or ``failed`` and why."""

    cell_id: str
    status: str
    metrics: dict
    rows: list[dict]
    seconds: float
    error: str | None = None


def perform(task: CellTask, workspace: Workspace, on_batch: Callable[[dict], None] | None = None) -> CellOutcome:
    """Run one cell in ``workspace``; an exception becomes a ``failed`` outcome with its reason (the grid goes on)."""
    cell, started = task.cell, time.perf_counter()
    try:
        model, _ = workspace.model(task.checkpoint)
        grid = _grid(model)
        fit_data = workspace.subjects(grid, fitting=True) if _fits(cell.attack.name) else None
        report = None if on_batch is None else (lambda state: on_batch({**state, "cell": cell.describe()}))
        metrics, rows = run_cell(cell, model, workspace.subjects(grid), task.config, workspace.device, report,
                                 fit_data, cell.spec.get("cell_seed"))
    except Exception as err:  # a broken cell is recorded with its reason
        return CellOutcome(cell.id, "failed", {}, [], time.perf_counter() - started, f"{type(err).__name__}: {err}")
    return CellOutcome(cell.id, "done", metrics, rows, time.perf_counter() - started)


def resolve_devices(name: str) -> list[torch.device]:
    """The devices a run uses: with ``auto`` or ``cuda`` and several visible GPUs, all of them (one cell per GPU);
    otherwise the one device named (``auto``: CUDA when present)."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [resolve_device(name)]


def _deterministic_cuda() -> None:
    # fp32 means fp32, and a re-run repeats: no TF32 in convolutions or matrix products (it moves predictions
    # by hundredths of a year), and deterministic cuDNN algorithms (the default 3D convolution backward is not).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _plan(config: RunConfig, root: Path, checkpoints: dict[str, Path], workspace: Workspace) -> list[Cell]:
    """Every cell of `config` with its full spec and id, checking that models and data fit together."""
    base_spec: dict[str, dict] = {}
    uses_features: dict[str, bool] = {}
    fitting = any(_fits(attack.name) for attack in config.attacks)
    for spec in config.models:
        model, sidecar = workspace.model(checkpoints[spec.label])
        grid = _grid(model)
        subset = workspace.subjects(grid)
        if "recomputed" in config.threat_models and model.meta.uses_features and subset.labels is None:
            raise MedrobustError(f"{config.source}: threat_model 'recomputed' recomputes the regional volumes from "
                                 f"each subject's label map, and some subjects of {root} have none (dseg)")
        if model.meta.uses_features and list(model.meta.feature_names) != list(subset.feature_names):
            raise MedrobustError(f"model {spec.label!r} ({checkpoints[spec.label]}) was trained on other context "
                                 f"features than {root} provides; retrain it on this dataset")
        uses_features[spec.label] = model.meta.uses_features
        base_spec[spec.label] = {
            "model": spec.label, "model_name": spec.name, "checkpoint": str(checkpoints[spec.label]),
            "checkpoint_sha256": sidecar.get("weights_sha256"), "dataset": str(root),
            "data_fingerprint": workspace.fingerprint(grid), "split": config.dataset.split,
            "split_seed": config.dataset.split_seed, "count": len(subset.subject_ids),
            "subjects_sha256": hashlib.sha256(json.dumps(subset.subject_ids).encode()).hexdigest(),
            "brain_mask": config.brain_mask, "seed": config.seed, "seeding": SEEDING,
            "batch_size": config.batch_size, "precision": config.precision, "ssim": config.ssim,
            "device": str(workspace.device)}
        if fitting:  # the subjects a universal perturbation is fitted on belong to its cells' identity
            fit_ids = workspace.subjects(grid, fitting=True).subject_ids
            base_spec[spec.label]["fit"] = {
                "fit_split": config.dataset.fit_split, "fit_count": len(fit_ids),
                "fit_subjects_sha256": hashlib.sha256(json.dumps(fit_ids).encode()).hexdigest()}
    cells = expand_cells(config, base_spec, uses_features)
    for cell in cells:
        fit = cell.spec.pop("fit", None)
        if fit is not None and _fits(cell.attack.name):
            cell.spec.update(fit)
        try:  # the attack's full argument list (defaults included) belongs to the cell's identity
            model, _ = workspace.model(checkpoints[cell.model])
            cell.spec["params"] = _attack_for(cell, model, config).params()
        except MedrobustError as err:  # e.g. an image attack on a features-only model: a config mistake
            raise MedrobustError(f"{config.source}: {cell.describe()}: {err}") from None
        cell.spec["cell_seed"] = cell.seed
    return cells


def plan(config: RunConfig) -> list[Cell]:
    """The cells `config` describes, with their ids, without running or training anything (the dataset and every
    checkpoint must exist): what ``medrobust status --config`` compares with a store."""
    root = config.dataset.path
    checkpoints = {spec.label: model_checkpoint(config, spec) for spec in config.models}
    missing = [f"{label} ({path})" for label, path in checkpoints.items() if not _exists(path)]
    if missing:
        raise MedrobustError(f"{config.source}: no checkpoint yet for {', '.join(missing)}; `medrobust run` trains "
                             f"them")
    if not Path(root).is_dir():
        raise MedrobustError(f"{config.source}: dataset {root} does not exist yet; `medrobust run` creates it")
    return _plan(config, root, checkpoints, Workspace(config, root, torch.device("cpu")))


# The grid's cell ids, cached in the run folder under a key of everything they derive from, so that re-running a
# finished grid answers without loading models or subjects.
PLAN_CACHE = "plan-cache.json"


def _plan_key(config: RunConfig, root: Path, checkpoints: dict[str, Path], device: torch.device) -> str:
    """A hash of the config, this package's version and seeding scheme, the device, and the size and modification
    time of every checkpoint and dataset file (the preprocessing cache aside) and of this package's own source
    files (an attack's supported threat models or defaults decide the grid): any change means a new plan."""
    import medrobust
    import medrobust.attacks
    import medrobust.models
    from medrobust import __version__

    files = [path for checkpoint in checkpoints.values() for path in checkpoint_paths(checkpoint)]
    for package in (medrobust, medrobust.attacks, medrobust.models):
        files.extend(sorted(Path(package.__file__).parent.rglob("*.py")))
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files.extend(Path(folder) / name for name in sorted(names))
    stats = [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    content = {"config": config.raw, "source": str(config.source), "version": __version__, "seeding": SEEDING,
               "device": str(device), "files": stats}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _cached_plan(config: RunConfig, key: str) -> list[str] | None:
    """The cell ids of the plan cached under ``key``, or None."""
    try:
        cached = json.loads((config.out / PLAN_CACHE).read_text())
    except (OSError, ValueError):
        return None
    return cached.get("cells") if isinstance(cached, dict) and cached.get("key") == key else None


def _finished_already(config: RunConfig, store: ResultStore, key: str, retry_failed: bool,
                      echo) -> RunSummary | None:
    """When the cached plan's cells are all in the store (failed ones counting unless ``retry_failed``), the run's
    summary without loading anything; else None."""
    ids = _cached_plan(config, key)
    if ids is None:
        return None
    statuses = store.statuses()
    if any(statuses.get(i) is None or (retry_failed and statuses[i] == "failed") for i in ids):
        return None
    failed = sum(1 for i in ids if statuses[i] == "failed")
    cells = store.cells()
    flagged = set(cells[cells["reliability"].map(bool)]["id"]) & set(ids)
    return _skipping(RunSummary(out=config.out, store=store.path, cells=len(ids), skipped=len(ids), done=0,
                                failed_before=failed, unreliable=len(flagged)), echo)


def _skipping(summary: RunSummary, echo) -> RunSummary:
    """Say what a run skips: the finished cells, and those that failed before (unless retried)."""
    finished = summary.skipped - summary.failed_before
    if finished:
        echo(f"{finished} of {summary.cells} cells already finished in {summary.store}; skipping them")
    if summary.failed_before:
        echo(f"{summary.failed_before} cells failed in an earlier run; skipping them (--retry-failed reruns them)")
    return summary


def run(config: RunConfig, progress: bool = True, echo=tqdm.write, retry_failed: bool = False,
        executor: str = "local", ray_address: str | None = None) -> RunSummary:
    """Run every pending cell of `config` and record it in `<out>/results.sqlite`.

    Pending: not in the store yet; cells recorded as failed only with ``retry_failed``. ``executor``: ``local``
    (in this process; one cell per GPU when several are visible) or ``ray`` (a Ray cluster at ``ray_address``, or a
    local one): either way only this process writes the store, one transaction per finished cell, so a killed run
    loses at most the cells in flight and the same command resumes it."""
    began = time.perf_counter()
    devices = resolve_devices(config.device)
    if devices[0].type == "cuda":
        _deterministic_cuda()
    config.out.mkdir(parents=True, exist_ok=True)
    # The store's writer lock first: a second run on this folder is refused before it generates or trains anything.
    with ResultStore(config.out, writer=True) as store:
        summary = _run(config, store, devices, progress, echo, retry_failed, executor, ray_address)
    summary.seconds = time.perf_counter() - began
    return summary


def _run(config: RunConfig, store: ResultStore, devices: list[torch.device], progress: bool, echo,
         retry_failed: bool, executor: str, ray_address: str | None) -> RunSummary:
    from medrobust.runner.executors import make_executor  # executors import this module

    root = ensure_dataset(config, progress)
    checkpoints = ensure_models(config, str(devices[0]), progress, echo)
    key = _plan_key(config, root, checkpoints, devices[0])
    finished = _finished_already(config, store, key, retry_failed, echo)
    if finished is not None:  # nothing to run: no models or subjects loaded, no run recorded
        return finished
    workspace = Workspace(config, root, devices[0], progress)
    cells = _plan(config, root, checkpoints, workspace)
    (config.out / PLAN_CACHE).write_text(json.dumps({"key": key, "cells": [cell.id for cell in cells]}))
    statuses = store.statuses()
    pending = [c for c in cells if statuses.get(c.id) != "done" and (retry_failed or statuses.get(c.id) is None)]
    summary = _skipping(RunSummary(
        out=config.out, store=store.path, cells=len(cells), skipped=len(cells) - len(pending), done=0,
        failed_before=0 if retry_failed else sum(1 for c in cells if statuses.get(c.id) == "failed")), echo)
    run_id = store.start_run(config.raw, describe_environment(devices[0]))
    tasks = [CellTask(cell, config, root, checkpoints[cell.model]) for cell in pending]
    names = {cell.id: cell.describe() for cell in cells}
    specs = {cell.id: cell.spec for cell in pending}
    bar = tqdm(total=len(tasks), unit="cell", disable=not progress or not tasks)

    def on_batch(state: dict) -> None:  # the cell in progress: what it is, how far, its deviation so far
        bar.set_postfix_str(f"{state['cell']}: {state['done']}/{state['of']} subjects, mean |deviation| so far "
                            f"{state['mean_abs_deviation']:.2f} y")

    with make_executor(executor, workspace, devices, ray_address) as pool:
        for outcome in pool.map(tasks, on_batch if progress else None):
            store.write_cell(outcome.cell_id, run_id, specs[outcome.cell_id], outcome.metrics, outcome.rows,
                             outcome.seconds, outcome.status, outcome.error)
            name = names[outcome.cell_id]
            if outcome.status == "failed":
                summary.failed.append((name, outcome.error))
                echo(f"FAILED {name}: {outcome.error}")
            else:
                summary.done += 1
                metrics = outcome.metrics
                echo(f"{name}: mean |deviation| {metrics['mean_abs_deviation']:.2f} y, adversarial MAE "
                     f"{metrics['adversarial_mae']:.2f} y (clean {metrics['clean_mae']:.2f} y), "
                     f"{outcome.seconds:.1f} s")
            bar.update(1)
    bar.close()
    # The checks compare cells with each other, so they are redone over the whole store each time.
    flags = reliability_flags(store.cells())
    store.write_reliability(flags)
    summary.unreliable = len(flags)
    for cell_id, reasons in sorted(flags.items()):
        echo(f"possibly unreliable: {names.get(cell_id, 'cell ' + cell_id)}: {'; '.join(reasons)}")
    store.finish_run(run_id)
    return summary
