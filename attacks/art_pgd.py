"""PGD computed by ART's ProjectedGradientDescent through its PyTorchRegressor: a cross-check of ``pgd``."""

from __future__ import annotations

import numpy as np
from torch import nn

from medrobust.attacks._art import ARTAttack, positive
from medrobust.attacks._external import check_steps
from medrobust.attacks._registry import register_attack


@register_attack
class ARTPGD(ARTAttack):
    """``pgd`` with ``random_start=False`` as ART computes it (``art.attacks.evasion.ProjectedGradientDescent``,
    the NumPy implementation ART uses for regressors): ``steps`` steps of ``step_size`` times the radius, each
    clipped to the image's range and then projected onto the budget ball. Needs ``adversarial-robustness-toolbox``.

    No random start: ART refuses one for regressors. Under an l2 budget, where the range clip binds, ART (clip,
    then project onto the ball) and ``pgd`` (project, then clip) take different steps; both stay in the budget
    and the range. Under l-inf the two orders give the same image.

    Costs one forward and one backward pass per step, plus the clean and the final prediction.
    """

    name = "art-pgd"
    norms = ("linf", "l2")

    def __init__(self, model: nn.Module, *args, steps: int = 10, step_size: float = 0.25, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.steps, self.step_size = check_steps(steps, step_size)

    def art_evasion(self, regressor, radius: np.ndarray, batch_size: int):
        from art.attacks.evasion import ProjectedGradientDescent

        return ProjectedGradientDescent(regressor, norm=self.art_norm(), eps=radius,
                                        eps_step=positive(self.step_size * radius), max_iter=self.steps,
                                        batch_size=batch_size, verbose=False)
