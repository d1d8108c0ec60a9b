"""What an attack returns for a batch."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class AttackResult:
    """One attacked batch.

    ``images``: the adversarial images (detached, dtype and device of the input); ``features``: the context
    features the adversarial prediction used (the clean ones under ``fixed``); predictions [B] in years;
    ``forward``/``backward``: model passes spent, the clean and final predictions included; ``steps``:
    gradient steps taken.
    """

    images: Tensor
    features: Tensor | None
    clean_prediction: Tensor
    adversarial_prediction: Tensor
    forward: int
    backward: int
    steps: int
