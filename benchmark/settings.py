"""The settings of training and of the built-in cohort: dataclasses with their defaults and validation, torch-free,
so that the command line shows and checks them without importing torch, and the config reads the same fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

from medrobust.errors import FieldError

LOSSES = ("l1", "mse")


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
        """Raise FieldError naming the first bad field."""
        if self.epochs < 1:
            raise FieldError("epochs", f"must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FieldError("lr", f"must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FieldError("weight_decay", f"must be a non-negative number, got {self.weight_decay}")
        if self.loss not in LOSSES:
            raise FieldError("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.patience < 1:
            raise FieldError("patience", f"must be at least 1, got {self.patience}")


@dataclass(frozen=True)
class CohortSpec:
    """Everything that determines a generated cohort. Same spec, same files."""

    n: int = 500
    seed: int = 0
    shape: tuple[int, int, int] = (48, 56, 48)
    voxel_size: tuple[float, float, float] = (3.5, 3.5, 3.5)
    age_range: tuple[float, float] = (5.0, 90.0)
    # Biological minus chronological age of the anatomy (years, sd at age >= 40, less in children):
    # a floor on any model's error, shared by image and regional volumes.
    anatomy_age_sd: float = 3.0
    # Scatter of the age that drives intensity (contrast maturation, white-matter hypointensities):
    # smaller than the anatomy's, so the image carries age information the volumes miss.
    intensity_age_sd: float = 1.5
    # Simulated segmentation error: per-region and per-subject bias of the grey-matter class
    # (in tissue-fraction units) when the label map is derived from the subject's tissue maps.
    segmentation_noise: float = 0.20
    segmentation_bias: float = 0.08
    deformation_mm: float = 3.0
    batch_size: int = 16

    def validate(self) -> None:
        """Raise FieldError naming the first bad field."""
        if self.n < 1:
            raise FieldError("n", f"must be at least 1, got {self.n}")
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise FieldError("shape", f"must be three sizes of at least 8 voxels, got {self.shape}")
        if len(self.voxel_size) != 3 or not all(0.25 <= v <= 10 for v in self.voxel_size):
            raise FieldError("voxel_size", f"must be three sizes in mm between 0.25 and 10, got {self.voxel_size}")
        low, high = self.age_range
        if not (0 <= low < high <= 110):
            raise FieldError("age_range", f"must be MIN MAX with 0 <= MIN < MAX <= 110, got {low} {high}")
