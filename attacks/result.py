"""What an attack returns for a batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# What an attack records of the gradients it saw, per sample (the fields of AttackResult of these names); the runner
# counts each per cell as ``<name>_subjects`` and the reliability checks flag them.
GRADIENT_FAULTS = ("zero_gradient", "nonfinite_gradient")


def gradient_faults(grad: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Per sample [B] (bool), the ``GRADIENT_FAULTS`` of an input gradient [B, ...]: whether it is zero wherever
    the perturbation may go (``mask``, bool and broadcastable to ``grad``, or None; non-finite values counted as
    0), and whether it holds a NaN or inf. Tensors on the gradient's device: no host synchronisation."""
    moving = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if mask is not None:
        moving = torch.where(mask, moving, 0)
    return {"zero_gradient": ~moving.flatten(1).ne(0).any(dim=1),
            "nonfinite_gradient": ~torch.isfinite(grad.flatten(1)).all(dim=1)}


@dataclass
class AttackResult:
    """One attacked batch.

    ``images``: the adversarial images (detached, dtype and device of the input); ``features``: the context features
    the adversarial prediction used (the clean ones under ``fixed``); predictions [B] in years;
    ``forward``/``backward``: model passes spent, the clean and final predictions included; ``steps``: gradient
    steps taken; ``zero_gradient`` [B] (bool): the sample's gradient at the attack's first gradient pass was zero
    wherever the perturbation may go; ``nonfinite_gradient`` [B]: that pass's gradient held a NaN or inf (non-finite
    values are set to 0 at every pass). Both are None for an attack that took no gradient; the runner counts them
    per cell and the reliability checks flag them (masked or broken gradients). ``diagnostics``: per-sample values
    [B] an attack reports beside its result (the ensemble: which member won, the unbounded probe's shift); the
    runner stores their mean per cell as ``diag:<name>``.
    """

    images: Tensor
    features: Tensor | None
    clean_prediction: Tensor
    adversarial_prediction: Tensor
    forward: int
    backward: int
    steps: int
    zero_gradient: Tensor | None = None
    nonfinite_gradient: Tensor | None = None
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
