"""What an attack maximizes, per sample, for a brain-age regressor."""

from __future__ import annotations

import torch
from torch import Tensor

from medrobust.arguments import is_finite_real
from medrobust.errors import MedrobustError
from medrobust.vocabulary import OBJECTIVES


def check_objective(objective: str, target_age: float | None) -> float | None:
    """Validate an objective and its target age (required, finite, iff the objective is ``target``)."""
    if objective not in OBJECTIVES:
        raise MedrobustError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective != "target":
        if target_age is not None:
            raise MedrobustError(f"target_age is only used by objective 'target', not {objective!r}; drop it")
        return None
    if not is_finite_real(target_age):
        raise MedrobustError(f"objective 'target' needs target_age, a finite age in years, got {target_age!r}")
    return float(target_age)


def objective_score(
    name: str,
    prediction: Tensor,
    clean_prediction: Tensor,
    ages: Tensor | None = None,
    target_age: float | Tensor | None = None,
) -> Tensor:
    """The per-sample quantity [B] an attack maximizes, from predictions [B] in years.

    older: p; younger: -p; deviation: |p - p_clean|; target: -|p - target_age|; error: |p - ages|.
    """
    if name == "older":
        return prediction
    if name == "younger":
        return -prediction
    if name == "deviation":
        return _abs(prediction - clean_prediction.detach())
    if name == "target":
        if target_age is None:
            raise MedrobustError("objective 'target' needs target_age, the age in years to reach")
        return -_abs(prediction - torch.as_tensor(target_age, dtype=prediction.dtype, device=prediction.device))
    if name == "error":
        if ages is None:
            raise MedrobustError("objective 'error' needs ages, the true age [B] of each sample")
        return _abs(prediction - ages.to(dtype=prediction.dtype, device=prediction.device))
    raise MedrobustError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")


def _abs(d: Tensor) -> Tensor:
    # torch.abs has gradient 0 at 0: a one-step attack starting where p == p_clean would not move at all.
    return torch.where(d >= 0, d, -d)
