"""Training brain-age models on a dataset: Adam on the standardized age, early stopping on validation MAE."""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from medrobust.data.features import FeatureScaler
from medrobust.data.index import DatasetIndex, load_dataset_index
from medrobust.data.preprocess import PreparedDataset, Preprocessing, prepare_dataset
from medrobust.data.splits import load_or_create_splits
from medrobust.errors import MedrobustError
from medrobust.models import (
    BrainAgeModel,
    create_model,
    list_models,
    load_checkpoint,
    model_entrypoint,
    save_checkpoint,
)
from medrobust.models.hybrid import HybridModel

LOSSES = ("l1", "mse")
# The order a multi-model call trains in: the two-stage hybrid needs a trained cnn3d.
TRAINING_ORDER = ("cnn3d", "hybrid", "hybrid_e2e", "features_mlp")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present; otherwise the named device, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MedrobustError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedrobustError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


@dataclass
class TrainingConfig:
    """Optimization settings of one training run."""

    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    # L2 penalty: the dense heads see ~170 noisy regional volumes and ~350 subjects, and overfit without it.
    weight_decay: float = 0.03
    loss: str = "l1"
    patience: int = 10
    seed: int = 0

    def validate(self) -> None:
        """Raise MedrobustError naming the first bad setting."""
        if self.epochs < 1:
            raise MedrobustError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise MedrobustError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MedrobustError(f"--lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise MedrobustError(f"--weight-decay must be a non-negative number, got {self.weight_decay}")
        if self.loss not in LOSSES:
            raise MedrobustError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.patience < 1:
            raise MedrobustError(f"--patience must be at least 1, got {self.patience}")


@dataclass
class TrainingResult:
    """What a training run produced: the best epoch's validation MAE and the per-epoch history."""

    best_epoch: int
    best_val_mae: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


class _Inputs:
    """The model's inputs for a dataset. Tensors stay in host memory and go to the device a batch at a time
    (a cohort at the paper's grid does not fit on a GPU); a frozen trunk's features are computed once."""

    def __init__(self, model: BrainAgeModel, data: PreparedDataset, device: torch.device, batch_size: int):
        self.model = model
        self.device = device
        self.ages = data.ages
        self.features = data.features if model.meta.uses_features else None
        self.images = data.images if model.meta.uses_image else None
        # The two-stage hybrid trains only its head: running the frozen trunk every epoch would be waste.
        self.trunk = None
        if isinstance(model, HybridModel) and model.trunk_frozen:
            with torch.no_grad():
                self.trunk = torch.cat([model.trunk(self.images[rows].to(device))
                                        for rows in _batches(len(data.ages), batch_size)])
            self.images = None

    def __len__(self) -> int:
        return len(self.ages)

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(predicted age, true age) in years of the subjects `rows` (host indices), on the device."""
        features = self.features[rows].to(self.device) if self.features is not None else None
        ages = self.ages[rows].to(self.device)
        if self.trunk is None:
            images = self.images[rows].to(self.device) if self.images is not None else None
            return self.model(images, features), ages
        model = self.model
        trunk = self.trunk[rows.to(self.trunk.device)]
        joint = torch.cat([model.scale_trunk(trunk), model.standardize_features(features)], dim=1)
        return model.head(joint).squeeze(1) * model.age_std + model.age_mean, ages


def fit_scalings(model: BrainAgeModel, train: _Inputs) -> None:
    """Set the model's target, feature and trunk scalings from the training split only."""
    ages = train.ages.double()
    model.set_target_scaling(float(ages.mean()), float(ages.std().clamp_min(1e-3)))
    if model.meta.uses_features:
        scaler = FeatureScaler.fit(train.features.numpy())
        model.set_feature_scaling(scaler.mean, scaler.std)
    if train.trunk is not None:  # the frozen trunk's features, computed once by _Inputs
        model.set_trunk_scaling(train.trunk.min(0).values, train.trunk.max(0).values, train.trunk.mean(0))


def train_model(model: BrainAgeModel, train: PreparedDataset, val: PreparedDataset, config: TrainingConfig,
                device: torch.device, progress: bool = True) -> TrainingResult:
    """Train `model` in place (ending with its best-validation weights) and return the history."""
    config.validate()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model.to(device)

    parameters = [p for p in model.parameters_to_train() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    # A fixed cosine decay, not one driven by the (small, noisy) validation split: a plateau scheduler halved the
    # rate on noise and left the paper's CNN stuck in some seeds.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    train_inputs = _Inputs(model, train, device, config.batch_size)
    fit_scalings(model, train_inputs)
    val_inputs = _Inputs(model, val, device, config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    scale = float(model.age_std)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = (
        torch.nn.functional.l1_loss if config.loss == "l1" else torch.nn.functional.mse_loss)

    best = TrainingResult(best_epoch=0, best_val_mae=math.inf)
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(1, config.epochs + 1), desc=f"training {model.meta.name}", unit="epoch", disable=not progress)
    stale = 0
    for epoch in bar:
        model.train()
        total = torch.zeros((), device=device)
        for rows in _batches(len(train_inputs), config.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            predicted, true = train_inputs.batch(rows)
            # Loss on the standardized age: the same scale whatever the cohort's age range.
            loss = loss_fn(predicted / scale, true / scale)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
        model.eval()
        val_mae = float(mae(predict(val_inputs, config.batch_size), val_inputs.ages))
        train_loss = float(total) / len(train_inputs)
        best.history.append({"epoch": epoch, "train_loss": train_loss, "val_mae": val_mae,
                             "lr": optimizer.param_groups[0]["lr"]})
        scheduler.step()
        if val_mae < best.best_val_mae - 1e-4:
            best.best_epoch, best.best_val_mae, stale = epoch, val_mae, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        bar.set_postfix(loss=f"{train_loss:.3f}", val_mae=f"{val_mae:.2f}", best=f"{best.best_val_mae:.2f}")
        if stale >= config.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    best.seconds = time.perf_counter() - start
    return best


def predict(inputs: _Inputs, batch_size: int) -> Tensor:
    """Predictions in years for every subject of `inputs`, in order, in host memory."""
    with torch.no_grad():
        return torch.cat([inputs.batch(rows)[0].cpu() for rows in _batches(len(inputs), batch_size)])


def mae(predicted: Tensor, true: Tensor) -> Tensor:
    """Mean absolute error in years."""
    return (predicted - true).abs().mean()


def evaluate(model: BrainAgeModel, data: PreparedDataset, device: torch.device,
             batch_size: int = 16) -> tuple[dict, Tensor]:
    """Clean metrics (MAE, Pearson r, n) and the predictions [N] of `model` on `data`."""
    model.eval().to(device)
    inputs = _Inputs(model, data, device, batch_size)
    predicted = predict(inputs, batch_size).cpu()
    true = data.ages
    r = float(np.corrcoef(predicted.numpy(), true.numpy())[0, 1]) if len(true) > 1 else float("nan")
    return {"mae": float(mae(predicted, true)), "r": r, "n": len(true)}, predicted


def dataset_grid(index: DatasetIndex) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Grid (shape, voxel size) in RAS of the dataset's first readable 3D image: the default model grid."""
    for record in index.subjects:
        try:
            image = nib.as_closest_canonical(nib.load(str(record.t1_path)))
        except Exception:  # a damaged file is skipped later with its reason; look at the next one
            continue
        if len(image.shape) >= 3:
            shape = tuple(int(s) for s in image.shape[:3])
            voxel_size = tuple(round(float(z), 4) for z in image.header.get_zooms()[:3])
            return shape, voxel_size  # type: ignore[return-value]
    raise MedrobustError(f"{index.root}: no readable 3D T1w image to take the model grid from; "
                         "pass --shape and --voxel-size or fix the images")


def load_prepared(data: str | Path, shape: tuple[int, int, int] | None = None,
                  voxel_size: tuple[float, float, float] | None = None, cache_dir: Path | None = None,
                  strict: bool = False, progress: bool = True) -> tuple[DatasetIndex, Preprocessing, PreparedDataset]:
    """Index a dataset and prepare it on a grid (default: the dataset's own), through the content cache
    (default: <dataset>/.medrobust_cache). Skipped subjects are in the result's `skipped`."""
    index = load_dataset_index(data, strict=strict)
    if shape is None or voxel_size is None:
        default_shape, default_voxels = dataset_grid(index)
        shape, voxel_size = shape or default_shape, voxel_size or default_voxels
    preprocessing = Preprocessing(shape=shape, voxel_size=voxel_size)
    cache = cache_dir or Path(index.root) / ".medrobust_cache"
    return index, preprocessing, prepare_dataset(index, preprocessing, cache, strict=strict, progress=progress)


@dataclass
class TrainRequest:
    """One `medrobust train` call: which models, on which data, to where."""

    data: Path
    models: list[str]
    out: Path
    config: TrainingConfig = field(default_factory=TrainingConfig)
    shape: tuple[int, int, int] | None = None
    voxel_size: tuple[float, float, float] | None = None
    trunk: Path | None = None  # a trained cnn3d checkpoint for the two-stage hybrid
    split_seed: int = 0
    device: str = "auto"
    cache_dir: Path | None = None
    strict: bool = False
    progress: bool = True


@dataclass
class TrainedModel:
    """A trained model's checkpoint and clean test metrics."""

    name: str
    checkpoint: Path
    test_metrics: dict
    best_epoch: int
    seconds: float


def train(request: TrainRequest) -> list[TrainedModel]:
    """Train the requested models on one dataset and write their checkpoints and test predictions."""
    request.config.validate()
    unknown = [m for m in request.models if m not in list_models()]
    if unknown:
        raise MedrobustError(f"--model {unknown[0]!r} is not a registered model; known: {', '.join(list_models())}")
    names = sorted(dict.fromkeys(request.models), key=lambda m: (TRAINING_ORDER + (m,)).index(m))
    if "hybrid" in names and "cnn3d" not in names and request.trunk is None:
        raise MedrobustError("--model hybrid is trained two-stage on a trained cnn3d: pass --trunk CNN3D_CHECKPOINT "
                             "or also train --model cnn3d in the same call")
    device = resolve_device(request.device)
    trunk = load_checkpoint(request.trunk)[0] if request.trunk is not None else None
    # A hybrid on a given trunk works on that trunk's grid.
    shape = trunk.meta.input_shape if trunk is not None else request.shape
    voxel_size = trunk.meta.voxel_size if trunk is not None else request.voxel_size
    index, preprocessing, data = load_prepared(request.data, shape, voxel_size, request.cache_dir, request.strict,
                                               request.progress)
    for skipped in data.skipped:
        tqdm.write(f"skipped {skipped.subject_id}: {skipped.reason}")
    splits = load_or_create_splits(index.root, [s.subject_id for s in index.subjects], request.split_seed)
    usable = set(data.subject_ids)
    parts = {name: data.subset([s for s in ids if s in usable]) for name, ids in splits.items()}
    for name, part in parts.items():
        if len(part.subject_ids) == 0:
            raise MedrobustError(f"{index.root}: the {name} split has no usable subject; use a larger dataset")

    request.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        torch.manual_seed(request.config.seed)
        if name == "hybrid":
            model = HybridModel.from_cnn3d(trunk, feature_names=data.feature_names)
        else:
            model = create_model(name, **_architecture(name, preprocessing, data.feature_names))
        outcome = train_model(model, parts["train"], parts["val"], request.config, device, request.progress)
        metrics, predicted = evaluate(model, parts["test"], device, request.config.batch_size)
        stem = request.out / f"{name}-seed{request.config.seed}"
        extra = {
            "dataset": {"path": str(Path(request.data).resolve()), "fingerprint": index.fingerprint(),
                        "split_seed": request.split_seed,
                        "n": {k: len(v.subject_ids) for k, v in parts.items()}},
            "training": {**asdict(request.config), "device": str(device), "best_epoch": outcome.best_epoch,
                         "best_val_mae": outcome.best_val_mae, "seconds": round(outcome.seconds, 2),
                         "history": outcome.history},
            "test_metrics": metrics,
        }
        if name == "hybrid":
            trunk_from = str(request.trunk) if request.trunk else f"cnn3d-seed{request.config.seed}"
            extra["training"]["trunk_from"] = trunk_from
        checkpoint = save_checkpoint(model.cpu(), stem, extra)
        _write_predictions(stem.with_suffix(".test.tsv"), parts["test"], predicted)
        results.append(TrainedModel(name, checkpoint, metrics, outcome.best_epoch, outcome.seconds))
        if name == "cnn3d":
            trunk = model
    return results


def _architecture(name: str, preprocessing: Preprocessing, feature_names: list[str]) -> dict:
    """Constructor arguments of a registered model on the dataset's grid and features."""
    accepted = inspect.signature(model_entrypoint(name)).parameters
    kwargs = {"input_shape": preprocessing.shape, "voxel_size": preprocessing.voxel_size,
              "normalization": preprocessing.normalization, "feature_names": feature_names}
    return {k: v for k, v in kwargs.items() if k in accepted}


def _write_predictions(path: Path, data: PreparedDataset, predicted: Tensor) -> None:
    rows = [f"{s}\t{a:.3f}\t{p:.3f}" for s, a, p in zip(data.subject_ids, data.ages.tolist(), predicted.tolist(),
                                                         strict=True)]
    path.write_text("participant_id\tage\tpredicted_age\n" + "\n".join(rows) + "\n")
