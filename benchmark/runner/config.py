"""The run configuration (`medrobust run CONFIG.toml`): read, validated in full before anything runs.

Every problem is a MedrobustError naming the file and the field, e.g. ``demo.toml: budgets[1].epsilon[0] must be
a finite number >= 0, got nan``. Relative paths are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from medrobust.attacks import Budget, attack_entrypoint, create_attack, list_attacks
from medrobust.data.index import AGE_RANGE
from medrobust.data.tables import FEATURE_FORMATS, FeatureSource
from medrobust.errors import FieldError, MedrobustError
from medrobust.models import list_models
from medrobust.models.adapter import contract_from
from medrobust.models.checkpoint import checkpoint_paths
from medrobust.models.smoothing import Smoothing
from medrobust.models.sources import ModelSource
from medrobust.plugins import import_plugins
from medrobust.settings import CohortSpec, TrainingConfig
from medrobust.vocabulary import (
    DEFAULT_EXTRACTOR,
    EXTRACTORS,
    OBJECTIVES,
    PRECISIONS,
    SEGMENTER_EXTRACTORS,
    SPLITS,
    THREAT_MODELS,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Constructor arguments an attack entry may not set: the run sets them for every attack alike.
RUN_LEVEL_ATTACK_ARGS = ("budget", "objective", "target_age", "threat_model", "seed")


@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid: a registered architecture and its checkpoint (trained if missing and allowed), or a
    model of one's own (``source``: a factory or a TorchScript file with its declared input contract; ``name``
    then says which kind and where, e.g. ``factory:my_lab.nets:SFCN``)."""

    name: str
    label: str
    checkpoint: Path | None = None
    train_if_missing: bool = True
    source: ModelSource | None = None
    training: TrainingConfig | None = None  # its own training settings (a defence, say); None: the run's
    smoothing: Smoothing | None = None  # median smoothing of its prediction (medrobust.models.smoothing)


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the grid: a registered name, its own arguments, and its budgets (else the run's)."""

    name: str
    params: dict
    budgets: tuple[Budget, ...] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Where the subjects come from and which of them are attacked."""

    path: Path
    builtin: bool = False
    subjects: int = 500
    split: str = "test"
    count: int | None = None
    split_seed: int = 0
    strict: bool = False
    fit_split: str = "train"  # where a universal perturbation is fitted
    fit_count: int | None = None  # None: as many as `count`
    cache_dir: Path | None = None  # the preprocessing cache; None: <dataset>/.medrobust_cache for the built-in
    # cohort, <out>/cache for a dataset of one's own (never written into)
    shape: tuple[int, int, int] | None = None  # built-in cohort grid; default CohortSpec's
    voxel_size: tuple[float, float, float] | None = None
    # Context features read by name (FreeSurfer stats, SynthSeg, a table of one's own) instead of the label maps.
    features: FeatureSource | None = None
    age_range: tuple[float, float] = AGE_RANGE  # plausible ages (years): others are skipped with that reason




@dataclass
class RunConfig:
    """A validated run configuration."""

    source: Path
    out: Path
    models_dir: Path  # where default checkpoints are read and missing ones trained
    dataset: DatasetSpec
    models: list[ModelSpec]
    attacks: list[AttackSpec]
    budgets: list[Budget]
    objectives: list[str]
    threat_models: list[str]
    target_age: float | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32, or bf16/fp16 autocast (checked against fp32 on each cell's first batch)
    # How "recomputed" measures the volumes on an attacked image (medrobust.attacks.extractors): each one its cells.
    extractors: list[str] = field(default_factory=lambda: [DEFAULT_EXTRACTOR])
    segmenter: Path | None = None  # the segmenter checkpoint of the segmenter extractors
    ssim: bool = True  # measure each attacked image's 3D SSIM (on a CPU about a fifth of a forward+backward pass)
    # Cells that differ only in their budget are computed together, sharing the passes at the clean images.
    share_clean_passes: bool = True
    batch_size: int = 8
    threads: int | None = None  # torch's CPU threads for the run and its training; None: what torch picks
    # Checkpoints trained elsewhere (the demo's, shipped): a missing default checkpoint is taken from here when
    # it was trained on this very dataset with these training settings, instead of being trained.
    models_from: Path | None = None
    brain_mask: bool = False
    training: TrainingConfig = field(default_factory=TrainingConfig)
    plugins: list[str] = field(default_factory=list)  # modules or .py files imported first (medrobust.plugins)
    raw: dict = field(default_factory=dict)


class _Table:
    """One TOML table being read: every key taken is checked; leftovers are unknown keys."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        self.where, self.source = where, source
        if not isinstance(data, dict):
            self.fail(f"{where or 'the file'} must be a table, got {type(data).__name__}")
        self.data = dict(data)

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, message: str):
        raise MedrobustError(f"{self.source}: {message}")

    def take(self, key: str, kind: str, default: Any = inspect.Parameter.empty) -> Any:
        """The value of ``key`` checked to be of ``kind`` (int, number, str, bool, list, table)."""
        if key not in self.data:
            if default is inspect.Parameter.empty:
                self.fail(f"{self.name(key)} is required")
            return default
        return _check(self.data.pop(key), kind, self.name(key), self)

    def take_list(self, key: str, kind: str, default: Any) -> list:
        """A value or a list of values of ``kind`` (a single value is a list of one)."""
        value = self.data.pop(key, default)
        values = value if isinstance(value, list) else [value]
        if not values:
            self.fail(f"{self.name(key)} must not be empty")
        return [_check(v, kind, f"{self.name(key)}[{i}]" if isinstance(value, list) else self.name(key), self)
                for i, v in enumerate(values)]

    def done(self) -> None:
        if self.data:
            self.fail(f"unknown key {self.name(sorted(self.data)[0])!r}")


_KINDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false", "list": "a list",
          "table": "a table"}


def _check(value: Any, kind: str, name: str, table: _Table) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "table": isinstance(value, dict),
    }[kind]
    if not ok:
        table.fail(f"{name} must be {_KINDS[kind]}, got {value!r}")
    if kind == "number" and not math.isfinite(value):
        table.fail(f"{name} must be a finite number, got {value!r}")
    return float(value) if kind == "number" else value


def _choice(value: str, choices: tuple[str, ...] | list[str], name: str, table: _Table) -> str:
    if value not in choices:
        table.fail(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _budgets(items: Any, where: str, table: _Table) -> list[Budget]:
    """Budget tables (norm, epsilon as a number or a list, unit), expanded to one Budget per epsilon."""
    _check(items, "list", where, table)
    if not items:
        table.fail(f"{where} must list at least one budget")
    budgets = []
    for i, item in enumerate(items):
        entry = _Table(item, f"{where}[{i}]", table.source)
        norm, unit = entry.take("norm", "str"), entry.take("unit", "str", None)  # None: the norm's default unit
        raw = entry.data.pop("epsilon", None)
        if raw is None:
            entry.fail(f"{entry.name('epsilon')} is required")
        if isinstance(raw, list) and not raw:
            entry.fail(f"{entry.name('epsilon')} is an empty list; give at least one epsilon")
        entry.done()
        for j, epsilon in enumerate(raw if isinstance(raw, list) else [raw]):
            name = entry.name(f"epsilon[{j}]" if isinstance(raw, list) else "epsilon")
            if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0 \
                    or not math.isfinite(epsilon):
                entry.fail(f"{name} must be a finite number >= 0, got {epsilon!r}")
            try:
                budgets.append(Budget(norm=norm, epsilon=float(epsilon), unit=unit))
            except MedrobustError as err:
                entry.fail(f"{entry.where}: {err}")
    return budgets


def builtin_cohort(spec: DatasetSpec) -> CohortSpec:
    """The built-in cohort a dataset spec asks for (the cohort's defaults where it is silent)."""
    grid = {k: v for k, v in (("shape", spec.shape), ("voxel_size", spec.voxel_size)) if v}
    return CohortSpec(n=spec.subjects, **grid)


def _triple(entry: _Table, key: str, kind: str) -> tuple | None:
    values = entry.take(key, "list", None)
    if values is None:
        return None
    if len(values) != 3:
        entry.fail(f"{entry.name(key)} must list three values (x, y, z), got {values!r}")
    values = tuple(_check(v, kind, f"{entry.name(key)}[{i}]", entry) for i, v in enumerate(values))
    if not all(v > 0 for v in values):
        entry.fail(f"{entry.name(key)} must be positive, got {list(values)}")
    return values


def _features(dataset: _Table) -> FeatureSource | None:
    """``[dataset.features]``: where the context features are read by name (medrobust.data.tables)."""
    if "features" not in dataset.data:
        return None
    entry = _Table(dataset.take("features", "table"), "dataset.features", dataset.source)
    format_ = _choice(entry.take("format", "str"), FEATURE_FORMATS, "dataset.features.format", entry)
    stats = entry.take_list("stats", "str", ["aseg.stats"]) if format_ == "freesurfer" else ["aseg.stats"]
    columns = entry.take("columns", "list", None)
    source = FeatureSource(format=format_, path=Path(entry.take("path", "str")), stats=tuple(stats),
                           id_column=entry.take("id_column", "str", None) if format_ != "freesurfer" else None,
                           columns=tuple(str(c) for c in columns) if columns is not None else None)
    entry.done()
    try:
        return source.validate()
    except MedrobustError as err:
        entry.fail(str(err))


def _age_range(dataset: _Table) -> tuple[float, float]:
    values = dataset.take("age_range", "list", None)
    if values is None:
        return AGE_RANGE
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in values) or not 0 <= values[0] < values[1]:
        dataset.fail(f"dataset.age_range must be [MIN, MAX] years with 0 <= MIN < MAX, got {values!r}")
    return float(values[0]), float(values[1])


def _dataset(table: _Table) -> DatasetSpec:
    entry = _Table(table.take("dataset", "table"), "dataset", table.source)
    builtin = entry.take("builtin", "bool", False)
    path = Path(entry.take("path", "str"))
    spec = DatasetSpec(
        path=path, builtin=builtin, subjects=entry.take("subjects", "int", 500),
        split=_choice(entry.take("split", "str", "test"), SPLITS, "dataset.split", entry),
        count=entry.take("count", "int", None), split_seed=entry.take("split_seed", "int", 0),
        fit_split=_choice(entry.take("fit_split", "str", "train"), SPLITS, "dataset.fit_split", entry),
        cache_dir=Path(entry.take("cache_dir", "str")) if "cache_dir" in entry.data else None,
        fit_count=entry.take("fit_count", "int", None),
        strict=entry.take("strict", "bool", False), shape=_triple(entry, "shape", "int"),
        voxel_size=_triple(entry, "voxel_size", "number"), features=_features(entry), age_range=_age_range(entry))
    entry.done()
    if not builtin and not path.exists():
        entry.fail(f"dataset.path {str(path)!r} does not exist; set builtin = true to generate the built-in cohort "
                   "there")
    if not builtin and (spec.shape or spec.voxel_size):
        entry.fail("dataset.shape and dataset.voxel_size set the built-in cohort's grid; they need builtin = true")
    for key in ("count", "fit_count"):
        if getattr(spec, key) is not None and getattr(spec, key) < 1:
            entry.fail(f"dataset.{key} must be at least 1, got {getattr(spec, key)}")
    if builtin:
        if spec.subjects < 10:
            entry.fail(f"dataset.subjects must be at least 10 for the built-in cohort, got {spec.subjects}")
        try:
            builtin_cohort(spec).validate()
        except FieldError as err:
            entry.fail(f"dataset.{'subjects' if err.field == 'n' else err.field} {err.problem}")

    return spec


# The keys of a [[models]] entry that name its source: exactly one of them.
MODEL_SOURCES = ("name", "factory", "torchscript")
# The input contract of a model of one's own (medrobust.models.adapter.InputContract).
CONTRACT_KEYS = {"input_shape": "list", "voxel_size": "list", "normalization": "str", "inputs": "str",
                 "features": "list", "output": "str", "age_mean": "number", "age_std": "number",
                 "bin_centres": "list", "space": "str"}


def _training(table: _Table, base: TrainingConfig) -> TrainingConfig:
    """Training settings from a ``[training]`` table (or a model's ``training``), the keys it leaves out as in
    ``base``."""
    values = {f.name: table.take(f.name, "number" if f.type == "float" else "str" if f.type.startswith("str")
                                 else "int", getattr(base, f.name))
              for f in fields(TrainingConfig)}
    table.done()
    training = TrainingConfig(**values)
    try:
        training.validate()
    except FieldError as err:
        table.fail(f"{table.where}.{err.field} {err.problem}")
    return training


def _models(table: _Table, training: TrainingConfig) -> list[ModelSpec]:
    items = table.take("models", "list")
    if not items:
        table.fail("models must list at least one model")
    models, labels = [], set()
    for i, item in enumerate(items):
        entry = _Table(item, f"models[{i}]", table.source)
        given = [key for key in MODEL_SOURCES if isinstance(entry.data, dict) and key in entry.data]
        if len(given) != 1:
            entry.fail(f"models[{i}] must name exactly one source: name (a registered model), factory "
                       f"('package.module:callable') or torchscript (a file); got {', '.join(given) or 'none'}")
        spec = _registered_model(entry, training) if given == ["name"] else _own_model(entry, given[0])
        smoothing = entry.take("smoothing", "table", None)
        if smoothing is not None:
            try:
                spec = dataclasses.replace(spec, smoothing=Smoothing(**smoothing))
            except TypeError:
                entry.fail(f"{entry.name('smoothing')} takes {', '.join(Smoothing().as_dict())}; got "
                           f"{', '.join(sorted(smoothing))}")
            except MedrobustError as err:
                entry.fail(f"{entry.name('smoothing')}: {err}")
        entry.done()
        if spec.label in labels:
            entry.fail(f"{entry.name('label')} {spec.label!r} is used twice; give each model its own label")
        labels.add(spec.label)
        models.append(spec)
    return models


def _registered_model(entry: _Table, training: TrainingConfig) -> ModelSpec:
    name = _choice(entry.take("name", "str"), list_models(), entry.name("name"), entry)
    checkpoint = entry.take("checkpoint", "str", None)
    own = entry.take("training", "table", None)  # this model's training settings over the run's [training]
    spec = ModelSpec(name=name, label=entry.take("label", "str", name),
                     checkpoint=Path(checkpoint) if checkpoint else None,
                     train_if_missing=entry.take("train_if_missing", "bool", True),
                     training=_training(_Table(own, entry.name("training"), entry.source), training)
                     if own is not None else None)
    if spec.checkpoint is not None and not all(path.is_file() for path in checkpoint_paths(spec.checkpoint)):
        weights, sidecar = checkpoint_paths(spec.checkpoint)
        if weights.is_file() or spec.checkpoint.suffix in (".pt", ".pth"):
            entry.fail(f"{entry.name('checkpoint')}: {str(spec.checkpoint)!r} is not a medrobust checkpoint "
                       f"(no sidecar {sidecar.name}); weights of a model of your own go in `weights`, with "
                       f"`factory` and its input contract (docs/your-model.md)")
        entry.fail(f"{entry.name('checkpoint')}: no checkpoint at {str(spec.checkpoint)!r} "
                   "(needs <stem>.safetensors and <stem>.json); leave checkpoint out to train one")
    return spec


def _own_model(entry: _Table, kind: str) -> ModelSpec:
    """A model of one's own: a factory (with kwargs and weights) or a TorchScript file, and its contract."""
    where = f"{entry.source}: {entry.where}"
    value = entry.take(kind, "str")
    values = {key: entry.take(key, kinds, None) for key, kinds in CONTRACT_KEYS.items()}
    for key in ("input_shape", "voxel_size"):
        if values[key] is None:
            entry.fail(f"{entry.name(key)} is required for a model of your own: the grid it was trained on "
                       f"(the data are prepared on it)")
    try:
        contract = contract_from(values)
    except FieldError as err:
        entry.fail(f"{entry.name(err.field)} {err.problem}")
    except (TypeError, ValueError) as err:
        entry.fail(f"{entry.where}: the input contract is malformed ({err})")
    kwargs = entry.take("kwargs", "table", {}) if kind == "factory" else {}
    weights = entry.take("weights", "str", None)
    strict = entry.take("strict", "bool", True)
    if kind == "torchscript":
        if weights is not None:
            entry.fail(f"{entry.name('weights')}: a TorchScript file carries its weights; leave weights out")
        if not Path(value).is_file():
            entry.fail(f"{entry.name('torchscript')}: no file at {value!r}")
        default_label, name = Path(value).stem, f"torchscript:{Path(value).name}"
    else:
        default_label, name = value.rpartition(":")[2] or value, f"factory:{value}"
    label = entry.take("label", "str", default_label)
    try:
        kwargs_json = json.dumps(kwargs, sort_keys=True)
    except (TypeError, ValueError) as err:
        entry.fail(f"{entry.name('kwargs')} must be JSON-like values ({err})")
    source = ModelSource(factory=value if kind == "factory" else None, kwargs_json=kwargs_json,
                         torchscript=Path(value) if kind == "torchscript" else None,
                         weights=Path(weights) if weights else None, strict=strict, contract=contract,
                         name=label, where=where)
    if source.weights is not None and not source.weights.is_file():
        entry.fail(f"{entry.name('weights')}: no file at {weights!r}")
    return ModelSpec(name=name, label=label, train_if_missing=False, source=source)


def _attacks(table: _Table) -> list[AttackSpec]:
    items = table.take("attacks", "list")
    if not items:
        table.fail("attacks must list at least one attack")
    attacks = []
    for i, item in enumerate(items):
        entry = _Table(item, f"attacks[{i}]", table.source)
        name = _choice(entry.take("name", "str"), list_attacks(), entry.name("name"), entry)
        budgets = entry.data.pop("budgets", None)
        budgets = tuple(_budgets(budgets, entry.name("budgets"), entry)) if budgets is not None else None
        accepted = [p for p in attack_entrypoint(name).argument_names() if p not in RUN_LEVEL_ATTACK_ARGS]
        unknown = [key for key in entry.data if key not in accepted]
        if unknown:
            entry.fail(f"unknown key {entry.name(unknown[0])!r}; {name} takes {', '.join(accepted) or 'no arguments'}"
                       f" (budget, objective, threat model and seed are set for the whole run)")
        attacks.append(AttackSpec(name=name, params=dict(entry.data), budgets=budgets))
    return attacks


def parse_config(data: dict, source: str = "config", models: list[ModelSpec] | None = None) -> RunConfig:
    """Validate a config already read from TOML into a RunConfig. Plugins (installed entry points, then the
    config's ``plugins``) are imported first, so that their models and attacks are known by name. ``models``:
    the grid's models, built by the caller (an in-memory module: ``medrobust.evaluate``), in place of a
    ``[[models]]`` table."""
    table = _Table(data, "", source)
    plugins = [_check(p, "str", f"plugins[{i}]", table) for i, p in enumerate(table.take("plugins", "list", []))]
    import_plugins(plugins, f"{source}: plugins")
    objectives = [_choice(o, OBJECTIVES, "objective", table) for o in table.take_list("objective", "str", "older")]
    threat_models = [_choice(t, THREAT_MODELS, "threat_model", table)
                     for t in table.take_list("threat_model", "str", "fixed")]
    target_age = table.take("target_age", "number", None)
    if "target" in objectives and target_age is None:
        table.fail("objective 'target' needs target_age (years)")
    budgets_raw = table.data.pop("budgets", None)
    training = _training(_Table(table.take("training", "table", {}), "training", source), TrainingConfig())
    out = Path(table.take("out", "str", f"runs/{Path(source).stem}"))
    config = RunConfig(
        source=Path(source), out=out, models_dir=Path(table.take("models_dir", "str", str(out / "models"))),
        dataset=_dataset(table), models=_models(table, training) if models is None else list(models),
        attacks=_attacks(table),
        budgets=_budgets(budgets_raw, "budgets", table) if budgets_raw is not None else [],
        objectives=objectives, threat_models=threat_models, target_age=target_age,
        seed=table.take("seed", "int", 0), device=table.take("device", "str", "auto"),
        precision=table.take("precision", "str", "fp32"),
        extractors=[_choice(e, EXTRACTORS, "extractor", table)
                    for e in table.take_list("extractor", "str", DEFAULT_EXTRACTOR)],
        segmenter=Path(table.take("segmenter", "str")) if "segmenter" in table.data else None,
        ssim=table.take("ssim", "bool", True),
        share_clean_passes=table.take("share_clean_passes", "bool", True),
        batch_size=table.take("batch_size", "int", 8), threads=table.take("threads", "int", None),
        models_from=Path(table.take("models_from", "str")) if "models_from" in table.data else None,
        brain_mask=table.take("brain_mask", "bool", False),
        training=training, plugins=plugins, raw=data)
    table.done()
    if config.batch_size < 1:
        table.fail(f"batch_size must be at least 1, got {config.batch_size}")
    if config.threads is not None and config.threads < 1:
        table.fail(f"threads must be at least 1, got {config.threads}")
    if config.precision not in PRECISIONS:
        table.fail(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if config.segmenter is None and any(e in SEGMENTER_EXTRACTORS for e in config.extractors):
        table.fail("extractor 'segmenter' measures the volumes with a trained segmenter: name its checkpoint with "
                   "segmenter = \"path/to/seg_unet-seed0.safetensors\" (`medrobust train --model seg_unet` trains "
                   "one)")
    if config.device != "auto":
        try:  # the name alone (whether CUDA is there is the run's question): the config's key, not --device
            torch.device(config.device)
        except RuntimeError:
            table.fail(f"device {config.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    _check_attacks(config, table)
    return config


def _check_attacks(config: RunConfig, table: _Table) -> None:
    """Build every attack once on a stand-in model, so a bad argument value fails now, not an hour in."""
    stand_in = torch.nn.Identity()
    for i, spec in enumerate(config.attacks):
        budgets = spec.budgets if spec.budgets is not None else config.budgets
        if not budgets:
            table.fail(f"attacks[{i}] ({spec.name}) has no budget: add [[budgets]] or attacks[{i}].budgets")
        supported = attack_entrypoint(spec.name).norms
        threat_models = [t for t in config.threat_models if t in attack_entrypoint(spec.name).threat_models]
        if not threat_models:
            table.fail(f"attacks[{i}] ({spec.name}) supports threat models "
                       f"{', '.join(attack_entrypoint(spec.name).threat_models)}; threat_model lists none of them")
        if not any(b.norm in supported for b in budgets):
            table.fail(f"attacks[{i}] ({spec.name}) supports norms {', '.join(supported)}; no budget uses one")
        if spec.budgets is not None:
            for budget in spec.budgets:
                if budget.norm not in supported:
                    table.fail(f"attacks[{i}].budgets: {spec.name} does not support norm {budget.norm!r}")
        for budget in budgets:
            if budget.norm not in supported:
                continue
            try:
                create_attack(spec.name, stand_in, budget=budget, objective=config.objectives[0],
                              target_age=config.target_age, threat_model=threat_models[0], seed=config.seed,
                              **spec.params)
            except (MedrobustError, TypeError, ValueError) as err:
                table.fail(f"attacks[{i}] ({spec.name}): {err}")


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run configuration."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedrobustError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MedrobustError(f"config file {path} is unreadable ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise MedrobustError(f"{path}: not valid TOML ({err})") from None
    return parse_config(data, str(path))
