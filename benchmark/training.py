"""Training brain-age models on a dataset: Adam on the standardized age, early stopping on validation MAE."""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from medrobust.attacks import Attack, attack_entrypoint, create_attack, list_attacks
from medrobust.attacks.budget import Budget
from medrobust.data import FeatureSource, load_prepared
from medrobust.data.features import FeatureScaler
from medrobust.data.index import AGE_RANGE
from medrobust.data.preprocess import PreparedDataset, Preprocessing
from medrobust.data.splits import load_or_create_splits
from medrobust.devices import cpu_threads, resolve_device
from medrobust.errors import FieldError, MedrobustError
from medrobust.models import (
    BrainAgeModel,
    create_from_trained,
    list_models,
    load_checkpoint,
    model_entrypoint,
    model_requires,
    save_checkpoint,
    training_order,
)
from medrobust.models.checkpoint import beside
from medrobust.models.segmenter import Segmenter, create_segmenter, list_segmenters, segmenter_entrypoint
from medrobust.plugins import load_entry_points
from medrobust.segmentation import (
    class_lookup,
    confusion_counts,
    dice_from_counts,
    evaluate_segmenter,
    labelled_regions,
    row_batches,
    segmentation_loss,
    targets,
    write_regions,
)
from medrobust.settings import TrainingConfig
from medrobust.vocabulary import is_volume


@dataclass
class TrainingResult:
    """What a training run produced: the best epoch's validation MAE and the per-epoch history."""

    best_epoch: int
    best_val_mae: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    attack_passes: dict | None = None  # adversarial training: the attack's forward and backward passes in all


class TrainingBatches:
    """The model's inputs for a dataset. Tensors stay in host memory and go to the device a batch at a time
    (a cohort at the paper's grid does not fit on a GPU); the output of a model's frozen part
    (``BrainAgeModel.cache_frozen``, e.g. the two-stage hybrid's trunk) is computed once, not every epoch."""

    def __init__(self, model: BrainAgeModel, data: PreparedDataset, device: torch.device, batch_size: int,
                 cache: bool = True):
        self.model = model
        self.device = device
        self.ages = data.ages
        self.features = data.features if model.meta.uses_features else None
        self.images = data.images if model.meta.uses_image else None
        self.cache = None
        if self.images is not None and cache:  # not under adversarial training: the attack needs the images
            with torch.no_grad():
                parts = [model.cache_frozen(self.images[rows].to(device))
                         for rows in row_batches(len(data.ages), batch_size)]
            if parts and parts[0] is not None:
                self.cache, self.images = torch.cat(parts), None

    def __len__(self) -> int:
        return len(self.ages)

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted age, true age) in years of the subjects `rows` (host indices), on the device."""
        images, features, ages = self.inputs(rows)
        if self.cache is not None:
            return self.model.forward_cached(self.cache[rows.to(self.cache.device)], features), ages
        return self.model(images, features), ages

    def inputs(self, rows: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(images, features, true ages) of the subjects ``rows``, on the device (images None for a model that
        does not see them, or whose frozen part is cached)."""
        images = self.images[rows].to(self.device) if self.images is not None else None
        features = self.features[rows].to(self.device) if self.features is not None else None
        return images, features, self.ages[rows].to(self.device)


class AugmentedBatches:
    """The batches of noise augmentation and adversarial training: Gaussian noise of ``noise_sigma`` added to every
    image, then the first ``ratio`` of each batch's subjects replaced by adversarial examples of the training's
    attack against the model as it is now, maximizing |f(x') - y| (the regression error) within the budget, in
    ``steps`` steps of 2.5 / ``steps`` of the radius where the attack takes them. Each image's random draws come
    from its own stream, seeded from its row and the epoch, so that a start differs between epochs and not with
    the batching. Counts the attack's passes."""

    def __init__(self, model: BrainAgeModel, inputs: TrainingBatches, config: TrainingConfig):
        self.inputs, self.model, self.sigma = inputs, model, config.noise_sigma
        self.noise = torch.Generator().manual_seed(config.seed)
        self.forward = self.backward = 0
        self.defence = config.defence()
        self._epoch_attack: tuple[int, Attack | None] | None = None
        if self.defence is not None:
            entry = attack_entrypoint(self.defence["attack"])
            # Madry et al.'s few-step recipe: steps of 2.5 epsilon / steps, so that the walk can cross the ball
            arguments = {"steps": self.defence["steps"], "step_size": 2.5 / self.defence["steps"]}
            self._arguments = {key: value for key, value in arguments.items() if key in entry.argument_names()}
            self._seed = config.seed

    def attack_of(self, epoch: int) -> Attack | None:
        """The attack of an epoch (1-based), its epsilon ramped up over the warm-up; None without a defence and
        while the epsilon is 0."""
        if self.defence is None:
            return None
        if self._epoch_attack is None or self._epoch_attack[0] != epoch:
            warmup = self.defence["warmup"]
            scale = min(1.0, (epoch - 1) / warmup) if warmup else 1.0
            defence = self.defence
            attack = None if scale == 0 else create_attack(
                defence["attack"], self.model, budget=Budget(defence["norm"], scale * defence["epsilon"]),
                objective="error", threat_model=defence["threat_model"], seed=self._seed, **self._arguments)
            self._epoch_attack = (epoch, attack)
        return self._epoch_attack[1]

    def batch(self, rows: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """(predicted age, true age) in years of the subjects ``rows``, noisy and the first ``ratio`` attacked."""
        images, features, ages = self.inputs.inputs(rows)
        if self.sigma > 0:
            images = images + self.sigma * torch.randn(images.shape, generator=self.noise).to(images.device)
        attack = self.attack_of(epoch)
        if attack is None:
            return self.model(images, features), ages
        attacked = max(1, round(self.defence["ratio"] * len(rows)))
        result = attack(images[:attacked], features[:attacked] if features is not None else None, ages[:attacked],
                        sample_seeds=(rows[:attacked] + epoch * len(self.inputs)).tolist())
        self.forward += result.forward
        self.backward += result.backward
        images = torch.cat([result.images, images[attacked:]])
        if features is not None:
            features = torch.cat([result.features, features[attacked:]])
        return self.model(images, features), ages


def fit_scalings(model: BrainAgeModel, train: TrainingBatches) -> None:
    """Set the model's target, feature and trunk scalings from the training split only."""
    ages = train.ages.double()
    model.set_target_scaling(float(ages.mean()), float(ages.std().clamp_min(1e-3)))
    if model.meta.uses_features:
        scaler = FeatureScaler.fit(train.features.numpy())
        model.set_feature_scaling(scaler.mean, scaler.std)
    if train.cache is not None:  # the frozen part's output, computed once by TrainingBatches
        model.fit_cache_scaling(train.cache)


def train_model(model: BrainAgeModel, train: PreparedDataset, val: PreparedDataset, config: TrainingConfig,
                device: torch.device, progress: bool = True) -> TrainingResult:
    """Train `model` in place (ending with its best-validation weights) and return the history."""
    config.validate()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model.to(device)

    parameters = [p for p in model.parameters_to_train() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    augmented = None
    if config.defence() is not None or config.noise_sigma > 0:  # noisy or attacked batches need the images
        # the scalings from the cached frozen part, as in standard training; then the images themselves
        fit_scalings(model, TrainingBatches(model, train, device, config.batch_size))
        train_inputs = TrainingBatches(model, train, device, config.batch_size, cache=False)
        augmented = AugmentedBatches(model, train_inputs, config)
    else:
        train_inputs = TrainingBatches(model, train, device, config.batch_size)
        fit_scalings(model, train_inputs)
    val_inputs = TrainingBatches(model, val, device, config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    scale = float(model.age_std)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = (
        torch.nn.functional.l1_loss if config.loss == "l1" else torch.nn.functional.mse_loss)

    def epoch_loss(epoch: int) -> float:
        total = torch.zeros((), device=device)
        for rows in row_batches(len(train_inputs), config.batch_size, generator):
            if len(rows) < model.min_training_batch:  # a remnant too small for the model (batch norm): next epoch
                continue
            optimizer.zero_grad(set_to_none=True)
            predicted, true = augmented.batch(rows, epoch) if augmented is not None else train_inputs.batch(rows)
            # Loss on the standardized age: the same scale whatever the cohort's age range.
            loss = loss_fn(predicted / scale, true / scale)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
        return float(total) / len(train_inputs)

    def validate() -> float:
        return float(mae(predict(val_inputs, config.batch_size), val_inputs.ages))

    best_epoch, best_value, history = fit(model, optimizer, config, epoch_loss, validate, "val_mae", progress,
                                          select_from=config.adversarial_warmup + 1 if config.defence() else 1)
    result = TrainingResult(best_epoch, best_value, history, time.perf_counter() - start)
    if augmented is not None and augmented.defence is not None:  # what the defence cost: the attack's passes
        result.attack_passes = {"forward": augmented.forward, "backward": augmented.backward}
    return result


def fit(module: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainingConfig,
        epoch_loss: Callable[[int], float], validate: Callable[[], float], metric: str,
        progress: bool = True, select_from: int = 1) -> tuple[int, float, list[dict]]:
    """The epoch loop of every trainer: ``epoch_loss(epoch)`` trains ``module`` one epoch (in train mode) and
    returns its mean loss, ``validate()`` scores it on the validation split (in eval mode) as ``metric``: a
    ``val_mae`` is minimized, anything else (``val_dice``) maximized. The rate follows a fixed cosine decay over
    ``config.epochs`` (not one driven by the small, noisy validation split: a plateau scheduler halved the rate on
    noise and left the paper's CNN stuck in some seeds); training stops after ``config.patience`` epochs without
    improvement and ends with the best epoch's weights, chosen from epoch ``select_from`` on (an adversarial
    training's warm-up is never chosen). Returns (best epoch, its validation score, history)."""
    minimize = metric == "val_mae"
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    best_epoch, best_value, history, stale = 0, math.inf if minimize else -math.inf, [], 0
    best_state = copy.deepcopy(module.state_dict())
    bar = tqdm(range(1, config.epochs + 1), desc=f"training {module.meta.name}", unit="epoch", disable=not progress)
    for epoch in bar:
        module.train()
        train_loss = epoch_loss(epoch)
        module.eval()
        value = validate()
        history.append({"epoch": epoch, "train_loss": train_loss, metric: value,
                        "lr": optimizer.param_groups[0]["lr"]})
        scheduler.step()
        improved = (value < best_value - 1e-4) if minimize else (value > best_value + 1e-4)
        if epoch >= select_from and improved:
            best_epoch, best_value, stale = epoch, value, 0
            best_state = copy.deepcopy(module.state_dict())
        elif epoch >= select_from:
            stale += 1
        bar.set_postfix(loss=f"{train_loss:.3f}", **{metric: f"{value:.3f}", "best": f"{best_value:.3f}"})
        if stale >= config.patience:
            break
    module.load_state_dict(best_state)
    module.eval()
    return best_epoch, best_value, history


def train_segmenter(segmenter: Segmenter, train: PreparedDataset, val: PreparedDataset, config: TrainingConfig,
                    device: torch.device, progress: bool = True) -> dict:
    """Train ``segmenter`` in place on ``train``'s label maps (``medrobust.segmentation.segmentation_loss``),
    ending with its best-validation weights; returns the best epoch, its validation mean Dice, the per-epoch
    history and the seconds taken. Adam without weight decay (the age models' L2 penalty is tuned for their dense
    heads); ``config``'s rate, epochs, batch size, patience and seed."""
    config.validate()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    segmenter.to(device)
    lookup, val_lookup = class_lookup(segmenter, train), class_lookup(segmenter, val)
    n_classes = 1 + len(segmenter.class_names)
    optimizer = torch.optim.Adam(segmenter.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    def epoch_loss(epoch: int) -> float:
        total, seen = torch.zeros((), device=device), 0
        # an epoch of a segmenter takes minutes on a CPU: its batches have a bar of their own
        for rows in tqdm(row_batches(len(train.subject_ids), config.batch_size, generator), desc=f"epoch {epoch}",
                         unit="batch", leave=False, disable=not progress):
            if len(rows) < segmenter.min_training_batch:  # a remnant too small for batch norm: next epoch
                continue
            optimizer.zero_grad(set_to_none=True)
            logits = segmenter(train.images[rows].to(device))
            loss = segmentation_loss(logits, targets(train, rows, lookup).to(device))
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
            seen += len(rows)
        return float(total) / max(seen, 1)

    def validate() -> float:
        counts = torch.zeros(n_classes, 3, dtype=torch.long)
        with torch.no_grad():
            for rows in row_batches(len(val.subject_ids), config.batch_size):
                predicted = segmenter(val.images[rows].to(device)).argmax(1).cpu()
                counts += confusion_counts(predicted, targets(val, rows, val_lookup), n_classes)
        dice = dice_from_counts(counts)[1:]
        return float(dice[torch.isfinite(dice)].mean())

    best_epoch, best_dice, history = fit(segmenter, optimizer, config, epoch_loss, validate, "val_dice", progress)
    return {"best_epoch": best_epoch, "best_val_dice": best_dice, "history": history,
            "seconds": round(time.perf_counter() - start, 2)}


def predict(inputs: TrainingBatches, batch_size: int) -> Tensor:
    """Predictions in years for every subject of `inputs`, in order, in host memory."""
    with torch.no_grad():
        return torch.cat([inputs.batch(rows)[0].cpu() for rows in row_batches(len(inputs), batch_size)])


def mae(predicted: Tensor, true: Tensor) -> Tensor:
    """Mean absolute error in years."""
    return (predicted - true).abs().mean()


def evaluate(model: BrainAgeModel, data: PreparedDataset, device: torch.device,
             batch_size: int = 16) -> tuple[dict, Tensor]:
    """Clean metrics (MAE, Pearson r, n) and the predictions [N] of `model` on `data`."""
    model.eval().to(device)
    inputs = TrainingBatches(model, data, device, batch_size)
    predicted = predict(inputs, batch_size).cpu()
    true = data.ages
    r = float(np.corrcoef(predicted.numpy(), true.numpy())[0, 1]) if len(true) > 1 else float("nan")
    return {"mae": float(mae(predicted, true)), "r": r, "n": len(true)}, predicted




@dataclass
class TrainRequest:
    """One `medrobust train` call: which models, on which data, to where."""

    data: Path
    models: list[str]
    out: Path
    config: TrainingConfig = field(default_factory=TrainingConfig)
    shape: tuple[int, int, int] | None = None
    voxel_size: tuple[float, float, float] | None = None
    # Checkpoints of trained models that requested models are built from (each model declares what it requires:
    # the two-stage hybrid a cnn3d); the models trained in the same call serve too.
    trained: list[Path] = field(default_factory=list)
    split_seed: int = 0
    device: str = "auto"
    cache_dir: Path | None = None
    strict: bool = False
    progress: bool = True
    features: FeatureSource | None = None  # context features read by name instead of from the label maps
    age_range: tuple[float, float] = AGE_RANGE  # plausible ages: others are skipped
    threads: int | None = None  # torch's CPU threads while training; None: what torch picks


@dataclass
class TrainedModel:
    """A trained model's (or segmenter's) checkpoint and clean test metrics."""

    name: str
    checkpoint: Path
    test_metrics: dict
    best_epoch: int
    seconds: float

    @property
    def summary(self) -> str:
        """The test metrics in a few words: MAE, r and n of a brain-age model; mean Dice and n of a segmenter."""
        m = self.test_metrics
        if "dice_mean" in m:
            return f"test Dice {m['dice_mean']:.3f} (mean of {len(m['regions'])} regions)  n {m['n']}"
        return f"test MAE {m['mae']:6.2f} y  r {m['r']:.3f}  n {m['n']}"


def train(request: TrainRequest) -> list[TrainedModel]:
    """Train the requested models on one dataset and write their checkpoints and test predictions. Models come
    after those they are built from; a model built from trained models works on their grid. With
    ``request.threads``, torch uses that many CPU threads meanwhile."""
    with cpu_threads(request.threads):
        return _train(request)


def _train(request: TrainRequest) -> list[TrainedModel]:
    request.config.validate()
    load_entry_points()  # installed plugins' models are trainable by name
    segmenters = [m for m in dict.fromkeys(request.models) if m in list_segmenters()]
    unknown = [m for m in request.models if m not in list_models() and m not in segmenters]
    if unknown:
        raise FieldError("model", f"{unknown[0]!r} is not a registered model; known: "
                                  f"{', '.join(list_models() + list_segmenters())}")
    names = training_order([m for m in request.models if m not in segmenters])
    _check_defence(request.config, segmenters)
    given = {}  # the trained models given as checkpoints, by registered name
    for path in request.trained:
        model = load_checkpoint(path)[0]
        given[model.meta.name] = (model, str(path))
    for name in names:
        for required in model_requires(name):
            if required not in names and required not in given:
                raise FieldError("trained", f"needs a trained {required} for model {name!r}, which is built from one: "
                                            f"give its checkpoint, or train {required} in the same call")
    device = resolve_device(request.device)
    shape, voxel_size = request.shape, request.voxel_size
    if given:
        first = next(iter(given.values()))[0]
        shape, voxel_size = first.meta.input_shape, first.meta.voxel_size
    index, preprocessing, data = load_prepared(request.data, shape, voxel_size, request.cache_dir, request.strict,
                                               request.progress, features=request.features,
                                               age_range=request.age_range)
    for skipped in data.skipped:
        tqdm.write(f"skipped {skipped.subject_id}: {skipped.reason}")
    splits = load_or_create_splits(index.root, [s.subject_id for s in index.subjects], request.split_seed)
    usable = set(data.subject_ids)
    parts = {name: data.subset([s for s in ids if s in usable]) for name, ids in splits.items()}
    for name, part in parts.items():
        if len(part.subject_ids) == 0:
            raise MedrobustError(f"{index.root}: the {name} split has no usable subject; use a larger dataset")

    volumes = [i for i, name in enumerate(data.feature_names) if is_volume(name)]
    if not volumes or not torch.isfinite(data.features[:, volumes]).any():
        context = [n for n in names if "feature_names" in inspect.signature(model_entrypoint(n)).parameters]
        if context:
            raise MedrobustError(f"{index.root}: no subject has regional volumes (no label maps, no vol_* columns), "
                                 f"so {', '.join(context)} would learn from sex and field strength alone; give "
                                 f"the subjects label maps (derivatives/.../*_dseg) or volume columns, or train "
                                 f"only image models")
    request.out.mkdir(parents=True, exist_ok=True)
    # the dataset as it was given (a relative path stays relative, so shipped checkpoints name no machine's folder)
    dataset = {"path": str(request.data), "fingerprint": index.fingerprint(),
               "split_seed": request.split_seed, "n": {k: len(v.subject_ids) for k, v in parts.items()}}
    results = []
    for name in segmenters:
        torch.manual_seed(request.config.seed)
        segmenter = create_segmenter(name, **architecture(segmenter_entrypoint(name), preprocessing,
                                                           region_names=labelled_regions(data)))
        outcome = train_segmenter(segmenter, parts["train"], parts["val"], request.config, device, request.progress)
        metrics = evaluate_segmenter(segmenter, parts["test"], device, request.config.batch_size)
        stem = request.out / request.config.stem(name)
        extra = {"dataset": dataset, "training": {**asdict(request.config), "device": str(device), **outcome},
                 "test_metrics": metrics}
        checkpoint = save_checkpoint(segmenter.cpu(), stem, extra)
        write_regions(beside(stem, ".regions.tsv"), metrics)
        results.append(TrainedModel(name, checkpoint, metrics, outcome["best_epoch"], outcome["seconds"]))
    trained = {name: model for name, (model, _) in given.items()}
    sources = {name: source for name, (_, source) in given.items()}
    for name in names:
        torch.manual_seed(request.config.seed)
        model = create_from_trained(name, trained, **architecture(model_entrypoint(name), preprocessing,
                                                                   feature_names=data.feature_names))
        outcome = train_model(model, parts["train"], parts["val"], request.config, device, request.progress)
        metrics, predicted = evaluate(model, parts["test"], device, request.config.batch_size)
        stem = request.out / request.config.stem(name)
        extra = {
            "dataset": dataset,
            "training": {**asdict(request.config), "device": str(device), "best_epoch": outcome.best_epoch,
                         "best_val_mae": outcome.best_val_mae, "seconds": round(outcome.seconds, 2),
                         "history": outcome.history},
            "test_metrics": metrics,
        }
        if outcome.attack_passes is not None:
            extra["training"]["attack_passes"] = outcome.attack_passes
        if model_requires(name):
            extra["training"]["built_from"] = {r: sources[r] for r in model_requires(name)}
        checkpoint = save_checkpoint(model.cpu(), stem, extra)
        write_predictions(beside(stem, ".test.tsv"), parts["test"], predicted)
        results.append(TrainedModel(name, checkpoint, metrics, outcome.best_epoch, outcome.seconds))
        trained[name], sources[name] = model, str(checkpoint)
    return results


def _check_defence(config: TrainingConfig, segmenters: list[str]) -> None:
    """Refuse, naming the field, an adversarial training the attack cannot do (unknown, set-level, another norm or
    threat model), and a defence or noise asked of a segmenter."""
    defence = config.defence()
    if segmenters and (defence is not None or config.noise_sigma > 0):
        raise FieldError("adversarial" if defence else "noise_sigma",
                         f"trains brain-age models; train {', '.join(segmenters)} without it")
    if defence is None:
        return
    if defence["attack"] not in list_attacks():
        raise FieldError("adversarial", f"{defence['attack']!r} is not a registered attack; known: "
                                        f"{', '.join(list_attacks())}")
    entry = attack_entrypoint(defence["attack"])
    if entry.scope != "batch":
        raise FieldError("adversarial", f"{defence['attack']!r} fits one perturbation on a set of subjects; train "
                                        f"against an attack of each batch (pgd, bim, fgsm)")
    if defence["norm"] not in entry.norms:
        raise FieldError("adversarial_norm", f"{defence['attack']!r} supports {', '.join(entry.norms)}, got "
                                             f"{defence['norm']!r}")
    if defence["threat_model"] not in entry.threat_models:
        raise FieldError("adversarial_threat_model", f"{defence['attack']!r} supports "
                                                     f"{', '.join(entry.threat_models)}, got "
                                                     f"{defence['threat_model']!r}")


def architecture(factory: Callable, preprocessing: Preprocessing, **named) -> dict:
    """Constructor arguments of a registered model's (or segmenter's) ``factory`` on the dataset's grid, and those
    of ``named`` (its feature or region names) that it takes."""
    accepted = inspect.signature(factory).parameters
    kwargs = {"input_shape": preprocessing.shape, "voxel_size": preprocessing.voxel_size,
              "normalization": preprocessing.normalization, **named}
    return {k: v for k, v in kwargs.items() if k in accepted}


def write_predictions(path: Path, data: PreparedDataset, predicted: Tensor) -> None:
    """A model's test predictions beside its checkpoint (``<stem>.test.tsv``): subject, true and predicted age."""
    rows = [f"{s}\t{a:.3f}\t{p:.3f}" for s, a, p in zip(data.subject_ids, data.ages.tolist(), predicted.tolist(),
                                                         strict=True)]
    path.write_text("participant_id\tage\tpredicted_age\n" + "\n".join(rows) + "\n")


def read_predictions(path: Path) -> tuple[list[str], Tensor, Tensor]:
    """What ``write_predictions`` wrote: (subject ids, true ages [N], predicted ages [N])."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return ([row[0] for row in rows], torch.tensor([float(row[1]) for row in rows]),
            torch.tensor([float(row[2]) for row in rows]))
