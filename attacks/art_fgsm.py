"""FGSM / FGM computed by ART's FastGradientMethod through its PyTorchRegressor: a cross-check of ``fgsm``."""

from __future__ import annotations

import numpy as np

from medrobust.attacks._art import ARTAttack, positive
from medrobust.attacks._registry import register_attack


@register_attack
class ARTFGSM(ARTAttack):
    """``fgsm`` as ART computes it (``art.attacks.evasion.FastGradientMethod``): one step of the radius along
    the sign of the objective's gradient (l-inf) or the normalized gradient (l2), clipped to each image's
    range and projected. No arguments of its own. Needs ``adversarial-robustness-toolbox``.

    Costs one forward and one backward pass, plus the clean and the final prediction.
    """

    name = "art-fgsm"
    norms = ("linf", "l2")

    def art_evasion(self, regressor, radius: np.ndarray, batch_size: int):
        from art.attacks.evasion import FastGradientMethod

        return FastGradientMethod(regressor, norm=self.art_norm(), eps=radius, eps_step=positive(radius),
                                  batch_size=batch_size)
