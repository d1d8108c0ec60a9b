"""What an attack returns for a batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


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
