"""FGSM (Goodfellow et al. 2015) and, under an l2 budget, its l2 form FGM: one gradient step of the full radius."""

from __future__ import annotations

from torch import Tensor

from medrobust.attacks._registry import register_attack
from medrobust.attacks.base import Attack, AttackState


@register_attack
class FGSM(Attack):
    """Fast gradient sign method: one step of size r along the sign of the objective's gradient (l-inf), or
    along the gradient divided by its l2 norm (l2), then projected into the mask, budget and range.

    Costs one forward and one backward pass, which also gives the clean prediction, and the final prediction.
    """

    name = "fgsm"
    role = "one-step"
    norms = ("linf", "l2")
    threat_models = ("fixed", "perturbed", "recomputed")
    starts_clean = True

    def perturb(self, state: AttackState) -> Tensor:
        return state.ascend(state.images, state.gradient(state.images), 1.0, consume=True)
