"""Perturbation budgets (norm, epsilon, unit) and the norms of a perturbation, over all non-batch dimensions."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from medrobust.arguments import is_finite_real
from medrobust.errors import MedrobustError
from medrobust.vocabulary import NORMS, UNITS


@dataclass(frozen=True)
class Budget:
    """How far an attack may move each image: ``norm`` of the perturbation at most ``epsilon`` in ``unit``.

    ``Budget("linf", 1e-3, "range")`` is the paper's l-inf budget: every voxel moves by at most 0.1 % of
    that image's intensity range. ``Budget("l0", 360)``: at most 360 voxels change (a fractional epsilon is
    rounded down). ``unit`` None is ``range``, or ``abs`` for ``l0``, the only unit a voxel count has.
    """

    norm: str = "linf"
    epsilon: float = 1e-3
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise MedrobustError(f"budget norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.unit is None:
            object.__setattr__(self, "unit", "abs" if self.norm == "l0" else "range")
        if self.norm == "l0" and self.unit != "abs":
            raise MedrobustError(f"budget unit of norm 'l0' must be 'abs' (epsilon counts voxels), got {self.unit!r}")
        if not is_finite_real(self.epsilon) or self.epsilon < 0:
            raise MedrobustError(f"budget epsilon must be a finite number >= 0, got {self.epsilon!r}")
        if self.unit not in UNITS:
            raise MedrobustError(f"budget unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        # A plain float keeps as_dict() JSON-native when epsilon came in as a NumPy scalar.
        object.__setattr__(self, "epsilon", float(self.epsilon))

    def radius(self, images: Tensor) -> Tensor:
        """The absolute radius [B] for each image of a batch [B, ...] (for l0 a voxel count), in the images' dtype
        and device."""
        flat = images.detach().flatten(1)
        if self.unit == "abs":
            epsilon = math.floor(self.epsilon) if self.norm == "l0" else self.epsilon
            return torch.full((flat.shape[0],), epsilon, dtype=flat.dtype, device=flat.device)
        if self.unit == "range":
            return self.epsilon * (flat.amax(dim=1) - flat.amin(dim=1))
        # Population std (divides by N), as the z-score normalization in preprocessing computes it.
        return self.epsilon * flat.std(dim=1, correction=0)

    def as_dict(self) -> dict:
        """``{"norm", "epsilon", "unit"}``: JSON-native, and ``Budget(**d)`` rebuilds it."""
        return dataclasses.asdict(self)


def as_budget(budget: Budget | dict | None) -> Budget:
    """A Budget from a Budget, a dict of its fields (as in a config file) or None (the default budget)."""
    if budget is None:
        return Budget()
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, dict):
        unknown = sorted(set(budget) - {f.name for f in dataclasses.fields(Budget)})
        if unknown:
            raise MedrobustError(f"budget has unknown keys {unknown}; use norm, epsilon and unit")
        return Budget(**budget)
    raise MedrobustError(f"budget must be a Budget, a dict with norm/epsilon/unit or None, got {budget!r}")


def perturbation_norms(delta: Tensor) -> dict[str, Tensor]:
    """l-inf, l2 and l0 (count of nonzero voxels) of each perturbation in a batch [B, ...], each [B].

    Computed over all non-batch dimensions, so 2D and 3D inputs need no special case. The l0 count has the
    dtype of ``delta`` so that all three average alike in the metrics.
    """
    flat = delta.detach().flatten(1)
    return {
        "linf": flat.abs().amax(dim=1),
        "l2": torch.linalg.vector_norm(flat, ord=2, dim=1),
        "l0": (flat != 0).sum(dim=1).to(flat.dtype),
    }
