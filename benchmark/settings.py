"""The settings of training and of the built-in cohort: dataclasses with their defaults and validation, torch-free,
so that the command line shows and checks them without importing torch, and the config reads the same fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

from medrobust.errors import FieldError

LOSSES = ("l1", "mse")
# What adversarial training attacks: budgets in fractions of each image's range (l0 counts voxels), and the image
# alone or the image and the regional volumes (`recomputed` needs an extractor training has not).
ADVERSARIAL_NORMS = ("linf", "l2")
ADVERSARIAL_THREAT_MODELS = ("fixed", "perturbed")


@dataclass(frozen=True)
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
    # Adversarial training (Madry et al., ICLR 2018) for regression: in every batch a fraction
    # `adversarial_ratio` of the subjects is replaced by adversarial examples of the registered attack
    # `adversarial` (None: standard training) that maximize |f(x') - y| (objective "error") within
    # `adversarial_epsilon` of each image's intensity range in norm `adversarial_norm`, in `adversarial_steps`
    # steps where the attack takes steps; under `adversarial_threat_model` "perturbed" the attacker moves the
    # regional volumes too (each within 5 % of its value), so that a context model learns not to trust them blindly.
    adversarial: str | None = None
    adversarial_norm: str = "linf"
    adversarial_epsilon: float = 1e-3
    adversarial_steps: int = 3
    adversarial_ratio: float = 1.0
    adversarial_threat_model: str = "fixed"
    # Epochs over which the attack's epsilon ramps up linearly from 0 (the first epoch clean) to its full value; the
    # best epoch is chosen among those at full strength only (the paper's CNN does not learn under the full budget
    # from its first epoch).
    adversarial_warmup: int = 0
    # Gaussian noise augmentation: noise of this scale (the model's input units, as medrobust.models.smoothing's
    # sigma) added to every training image, so that a median-smoothed model at that sigma certifies something.
    noise_sigma: float = 0.0

    def defence(self) -> dict | None:
        """The defence these settings train (attack, norm, epsilon of range, steps, ratio, threat model), or None
        for standard training."""
        if self.adversarial is None:
            return None
        return {"attack": self.adversarial, "norm": self.adversarial_norm, "epsilon": self.adversarial_epsilon,
                "unit": "range", "steps": self.adversarial_steps, "ratio": self.adversarial_ratio,
                "threat_model": self.adversarial_threat_model, "warmup": self.adversarial_warmup}

    def stem(self, name: str) -> str:
        """The checkpoint stem of model ``name`` trained with these settings: ``<name>-seed<seed>``, with the defence
        in it for adversarial training (``cnn3d-at-pgd-linf0.002-3steps-seed0``) and noise augmentation
        (``cnn3d-noise0.25-seed0``), so that a defended model and its undefended twin live side by side."""
        defence, tag = self.defence(), ""
        if defence is not None:  # every setting that makes another defence, so that no two share a checkpoint
            tag = f"-at-{defence['attack']}-{defence['norm']}{defence['epsilon']:g}-{defence['steps']}steps"
            tag += f"-ratio{defence['ratio']:g}" if defence["ratio"] != 1 else ""
            tag += f"-{defence['threat_model']}" if defence["threat_model"] != "fixed" else ""
            tag += f"-warmup{defence['warmup']}" if defence["warmup"] else ""
        if self.noise_sigma > 0:
            tag += f"-noise{self.noise_sigma:g}"
        return f"{name}{tag}-seed{self.seed}"

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
        if not (self.noise_sigma >= 0 and math.isfinite(self.noise_sigma)):
            raise FieldError("noise_sigma", f"must be a non-negative number, got {self.noise_sigma}")
        if self.adversarial is not None:
            if not self.adversarial:
                raise FieldError("adversarial", "must name a registered attack (leave it out for standard training)")
            if self.adversarial_norm not in ADVERSARIAL_NORMS:
                raise FieldError("adversarial_norm", f"must be {' or '.join(ADVERSARIAL_NORMS)}, got "
                                                     f"{self.adversarial_norm!r}")
            if not (self.adversarial_epsilon > 0 and math.isfinite(self.adversarial_epsilon)):
                raise FieldError("adversarial_epsilon", f"must be a positive fraction of the image's range, got "
                                                        f"{self.adversarial_epsilon}")
            if self.adversarial_steps < 1:
                raise FieldError("adversarial_steps", f"must be at least 1, got {self.adversarial_steps}")
            if not 0 < self.adversarial_ratio <= 1:
                raise FieldError("adversarial_ratio", f"must be in (0, 1], got {self.adversarial_ratio}")
            if not 0 <= self.adversarial_warmup < self.epochs:
                raise FieldError("adversarial_warmup", f"must be at least 0 and fewer than the {self.epochs} epochs, "
                                                       f"got {self.adversarial_warmup}")
            if self.adversarial_threat_model not in ADVERSARIAL_THREAT_MODELS:
                raise FieldError("adversarial_threat_model", f"must be {' or '.join(ADVERSARIAL_THREAT_MODELS)}, got "
                                                             f"{self.adversarial_threat_model!r}")


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
