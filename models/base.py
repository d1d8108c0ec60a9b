"""The model contract: ``BrainAgeModel`` (forward(image, features) -> age in years) and its ``ModelMeta``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from medrobust.errors import MedrobustError


@dataclass
class ModelMeta:
    """What a model expects as input, enough to rebuild it and to prepare data for it.

    ``kwargs`` are JSON-native (lists, not tuples) so that ``create_model(name, **kwargs)`` rebuilds the
    architecture after a round trip through a JSON sidecar.
    """

    name: str
    kwargs: dict
    input_shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    normalization: str = "zscore_brain"
    feature_names: list[str] = field(default_factory=list)
    uses_image: bool = True
    uses_features: bool = False
    space: str = "resample"  # how images reach the grid (medrobust.vocabulary.SPACES)

    @classmethod
    def from_kwargs(cls, name: str, kwargs: dict, uses_image: bool, uses_features: bool) -> ModelMeta:
        """Metadata whose grid, normalization and feature names are those in the (validated) ``kwargs``."""
        return cls(name=name, kwargs=kwargs, input_shape=tuple(kwargs["input_shape"]),
                   voxel_size=tuple(kwargs["voxel_size"]), normalization=kwargs["normalization"],
                   feature_names=list(kwargs.get("feature_names", [])), uses_image=uses_image,
                   uses_features=uses_features)


def as_grid(input_shape: Sequence[int], name: str = "input_shape") -> tuple[int, int, int]:
    """Validate an image grid (x, y, z) of positive ints."""
    grid = tuple(input_shape)
    if len(grid) != 3 or not all(_is_positive_int(n) for n in grid):
        raise MedrobustError(f"{name} must be three positive integers (x, y, z), got {input_shape!r}")
    return tuple(int(n) for n in grid)


def as_voxel_size(voxel_size: Sequence[float]) -> tuple[float, float, float]:
    """Validate a voxel size (x, y, z) in mm."""
    size = tuple(float(v) for v in voxel_size)
    if len(size) != 3 or not all(math.isfinite(v) and v > 0 for v in size):
        raise MedrobustError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    return size


def as_widths(widths: Sequence[int], name: str) -> tuple[int, ...]:
    """Validate a non-empty list of layer widths (filters or dense units)."""
    out = tuple(widths)
    if not out or not all(_is_positive_int(n) for n in out):
        raise MedrobustError(f"{name} must be a non-empty list of positive integers, got {widths!r}")
    return tuple(int(n) for n in out)


def as_normalization(normalization: str) -> str:
    """Validate the name of the intensity normalization the model was trained with."""
    if not isinstance(normalization, str) or not normalization:
        raise MedrobustError(
            f"normalization must be a non-empty name such as 'zscore_brain', got {normalization!r}"
        )
    return normalization


def _is_positive_int(n: object) -> bool:
    # numbers.Integral admits NumPy integers; bool is an int subclass but never a size.
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0


def as_feature_names(feature_names: Sequence[str] | None) -> list[str]:
    """Validate the context-feature names of a feature model: non-empty, strings, unique."""
    names = list(feature_names or [])
    if not names or not all(isinstance(n, str) and n for n in names):
        raise MedrobustError(f"feature_names must be a non-empty list of names, got {feature_names!r}")
    if len(set(names)) != len(names):
        raise MedrobustError("feature_names contains duplicates; each context feature must be named once")
    return names


def check_grid_image(meta: ModelMeta, image: Tensor | None) -> Tensor:
    """``image`` when it is a float [B, 1, *meta.input_shape] tensor; a clear error naming the model otherwise."""
    grid = tuple(meta.input_shape)
    if image is None:
        raise MedrobustError(f"model '{meta.name}' needs an image [B, 1, X, Y, Z] on grid {grid}")
    if not image.is_floating_point():
        raise MedrobustError(f"model '{meta.name}' needs a float image, got {image.dtype}")
    if image.dim() != 5 or image.shape[1] != 1 or tuple(image.shape[2:]) != grid:
        raise MedrobustError(
            f"model '{meta.name}' expects images on the grid {grid} as [B, 1, {grid[0]}, {grid[1]}, "
            f"{grid[2]}], got {list(image.shape)}; resample the data to the model's grid"
        )
    return image


def init_he(module: nn.Module) -> None:
    """Kaiming (He) init for every conv/linear layer, bias 0.

    The paper's CNN has no normalization layers; with PyTorch's default init it stayed at the constant
    predictor in a feasibility run.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def dense_head(in_features: int, dense: Sequence[int]) -> nn.Sequential:
    """[Linear, ReLU] per width in ``dense``, then a linear output of one unit."""
    layers: list[nn.Module] = []
    width = in_features
    for units in dense:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, 1))
    head = nn.Sequential(*layers)
    init_he(head)
    return head


class BrainAgeModel(nn.Module):
    """Base of every model: ``forward(image, features) -> predicted age [B] in years``.

    Subclasses implement ``predict_standardized(image, features)`` returning the raw output [B] in
    standardized-target units; this class validates inputs, standardizes the RAW context features (so attacks
    can perturb features in their own units, e.g. mL) and maps the output back to years.
    """

    meta: ModelMeta
    # What a checkpoint of it holds (``medrobust.models.checkpoint.KINDS``): a brain-age model.
    kind: ClassVar[str] = "model"
    # The smallest training batch the model can take (2 where batch norm meets a 1-voxel map); training skips a
    # smaller remnant batch of an epoch (the order is reshuffled every epoch).
    min_training_batch: ClassVar[int] = 1

    def __init__(self, meta: ModelMeta) -> None:
        super().__init__()
        self.meta = meta
        self.register_buffer("age_mean", torch.tensor(0.0))
        self.register_buffer("age_std", torch.tensor(1.0))
        if meta.uses_features:
            n = len(meta.feature_names)
            self.register_buffer("feature_mean", torch.zeros(n))
            self.register_buffer("feature_std", torch.ones(n))

    def set_target_scaling(self, mean: float, std: float) -> None:
        """Output in years = raw * std + mean (training targets were standardized with these)."""
        mean, std = float(mean), float(std)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise MedrobustError(f"target scaling needs a finite mean and a positive std, got {mean}, {std}")
        self.age_mean.fill_(mean)
        self.age_std.fill_(std)

    def set_feature_scaling(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        """Training-set mean and std [F] of the raw context features, in their own units."""
        if not self.meta.uses_features:
            raise MedrobustError(f"model '{self.meta.name}' uses no context features, so no feature scaling")
        n = len(self.meta.feature_names)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).detach().cpu()
        std_t = torch.as_tensor(std, dtype=torch.float32).detach().cpu()
        if mean_t.shape != (n,) or std_t.shape != (n,):
            raise MedrobustError(
                f"feature scaling must have {n} values (one per feature name), "
                f"got mean {tuple(mean_t.shape)} and std {tuple(std_t.shape)}"
            )
        if not torch.isfinite(mean_t).all():
            raise MedrobustError("feature scaling mean has NaN/inf entries; compute it with a NaN-aware mean")
        # A feature constant over the training set (std 0) carries nothing; dividing by 1 keeps it finite.
        std_t = torch.where(torch.isfinite(std_t) & (std_t > 0), std_t, torch.ones_like(std_t))
        self.feature_mean.copy_(mean_t)
        self.feature_std.copy_(std_t)

    def check_image(self, image: Tensor | None) -> Tensor:
        """Raise a clear error unless ``image`` is a float [B, 1, *input_shape] tensor."""
        return check_grid_image(self.meta, image)

    def standardize_features(self, features: Tensor | None) -> Tensor:
        """(raw - mean) / std per feature; missing values (NaN) become 0, i.e. the training mean."""
        n = len(self.meta.feature_names)
        if features is None:
            raise MedrobustError(f"model '{self.meta.name}' needs context features [B, {n}]")
        if features.dim() != 2 or features.shape[1] != n:
            raise MedrobustError(
                f"model '{self.meta.name}' expects context features [B, {n}] in the order of "
                f"meta.feature_names, got {list(features.shape)}"
            )
        z = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return torch.where(torch.isnan(z), torch.zeros_like(z), z)

    def forward(self, image: Tensor | None, features: Tensor | None = None) -> Tensor:
        """Predicted age [B] in years from image [B,1,X,Y,Z] and/or raw context features [B,F]."""
        image = self.check_image(image) if self.meta.uses_image else None
        z = self.standardize_features(features) if self.meta.uses_features else None
        if image is not None and z is not None and image.shape[0] != z.shape[0]:
            raise MedrobustError(
                f"image batch ({image.shape[0]}) and feature batch ({z.shape[0]}) differ in size"
            )
        return self.predict_standardized(image, z) * self.age_std + self.age_mean

    @property
    def used_feature_names(self) -> list[str]:
        """The context features the model's prediction depends on (its ``feature_names`` unless it takes a
        subset of the columns it is given): what the threat models may move or re-measure."""
        return list(self.meta.feature_names)

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The parameters a trainer should optimize (all of them unless a subclass freezes some)."""
        return list(self.parameters())

    def predict_standardized(self, image: Tensor | None, features: Tensor | None) -> Tensor:
        """Raw output [B] in standardized-target units; ``features`` are already standardized."""
        raise NotImplementedError

    # A model with a frozen part (the two-stage hybrid's trunk) lets training compute that part once per subject
    # instead of every epoch: ``cache_frozen`` gives its output, ``forward_cached`` the prediction from it.

    def cache_frozen(self, image: Tensor) -> Tensor | None:
        """The output [B, ...] of the model's frozen part for ``image``, or None where nothing is frozen."""
        return None

    def forward_cached(self, cache: Tensor, features: Tensor | None) -> Tensor:
        """Predicted age [B] in years from ``cache_frozen``'s output and the raw context features."""
        raise NotImplementedError(f"model '{self.meta.name}' has no frozen part to cache")

    def fit_cache_scaling(self, cache: Tensor) -> None:
        """Set what the model scales its frozen part's output by, from that output over the training split."""
