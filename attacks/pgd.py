"""PGD (Madry et al. 2018): projected steepest ascent, l-inf or l2, from an optional random start."""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.base import Attack, AttackState
from medrobust.attacks.budget import is_finite_real
from medrobust.errors import MedrobustError


@register_attack
class PGD(Attack):
    """Projected gradient descent (ascent on the objective): ``steps`` steps of ``step_size`` times the
    budget radius along the sign of the gradient (l-inf) or the normalized gradient (l2), each followed by a
    projection into the mask, budget and intensity range; ``random_start`` begins at a random point of the
    budget ball instead of the clean image.

    ``steps=4, step_size=0.25, random_start=False`` with an l-inf budget in unit ``range`` is exactly the
    paper's l-inf attack (Li et al. 2020): iterative FGSM, 4 steps of epsilon * R / 4, no random start.

    Costs one forward and one backward pass per step, plus the clean and the final prediction.
    """

    name = "pgd"
    norms = ("linf", "l2")

    def __init__(
        self,
        model: nn.Module,
        *args,
        steps: int = 10,
        step_size: float = 0.25,
        random_start: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
            raise MedrobustError(f"steps must be an integer >= 1, got {steps!r}")
        # A fraction of the budget radius, so one setting serves every epsilon and unit.
        if not is_finite_real(step_size) or step_size <= 0:
            raise MedrobustError(f"step_size must be a finite number > 0 (a fraction of the radius), "
                                 f"got {step_size!r}")
        if not isinstance(random_start, bool):
            raise MedrobustError(f"random_start must be True or False, got {random_start!r}")
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.random_start = random_start

    def perturb(self, state: AttackState) -> Tensor:
        adversarial = state.random_start() if self.random_start else state.images
        for _ in range(self.steps):
            adversarial = state.ascend(adversarial, state.gradient(adversarial), self.step_size)
        return adversarial
