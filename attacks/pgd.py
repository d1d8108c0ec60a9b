"""PGD (Madry et al. 2018): projected steepest ascent, l-inf or l2, from an optional random start, with random
restarts and a step-size schedule."""

from __future__ import annotations

import math

from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_count, check_flag, check_step_size
from medrobust.attacks.base import Attack, AttackState
from medrobust.errors import MedrobustError

# constant: every step is step_size; cosine and linear decay from step_size towards 0 over the steps.
SCHEDULES = ("constant", "cosine", "linear")


@register_attack
class PGD(Attack):
    """Projected gradient descent (ascent on the objective): ``steps`` steps of ``step_size`` times the
    budget radius along the sign of the gradient (l-inf) or the normalized gradient (l2), each followed by a
    projection into the mask, budget and intensity range; ``random_start`` begins at a random point of the
    budget ball instead of the clean image.

    ``schedule`` scales the step size over the steps (``step_fractions``): ``constant``; ``linear``, step t of T
    is step_size * (1 - t / T); ``cosine``, step_size * (1 + cos(pi t / T)) / 2 (t from 0: the first step is
    step_size, the last a small positive fraction of it). ``restarts`` runs the whole ascent that many times,
    each from a new random start drawn from the same seeded generator, and returns per sample the best image
    over all restarts (through ``keep_best``, so restarts need ``keep_best=True`` and ``random_start=True``).

    ``steps=4, step_size=0.25, random_start=False`` with an l-inf budget in unit ``range`` is exactly the
    paper's l-inf attack (Li et al. 2020): iterative FGSM, 4 steps of epsilon * R / 4, no random start (the
    ``bim`` attack).

    Costs one forward and one backward pass per step and restart, one forward per restart but the last (to
    score its final iterate), plus the clean and the final prediction; without a random start the first step's
    pass at the clean image also gives the clean prediction (no forward pass of its own).
    """

    name = "pgd"
    norms = ("linf", "l2")
    threat_models = ("fixed", "perturbed", "recomputed")

    def __init__(
        self,
        model: nn.Module,
        *args,
        steps: int = 20,
        step_size: float = 0.25,
        random_start: bool = True,
        restarts: int = 1,
        schedule: str = "constant",
        **kwargs,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        self.steps = check_count("steps", steps)
        check_step_size(step_size)
        check_flag("random_start", random_start)
        self.restarts = check_count("restarts", restarts)
        if self.restarts > 1 and not random_start:
            raise MedrobustError(f"restarts={restarts} needs random_start=True: without a random start every "
                                 f"restart repeats the first")
        if self.restarts > 1 and not self.keep_best:
            raise MedrobustError(f"restarts={restarts} needs keep_best=True: the best image over the restarts "
                                 f"is the best iterate that keep_best keeps")
        if schedule not in SCHEDULES:
            raise MedrobustError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.step_size = float(step_size)
        self.random_start = random_start
        self.schedule = schedule

    @property
    def starts_clean(self) -> bool:
        """Without a random start the first gradient step is at the clean image (see ``Attack.starts_clean``)."""
        return not self.random_start

    def step_fractions(self) -> list[float]:
        """The step length of each step as a fraction of the radius (host floats, computed once per call)."""
        steps = self.steps
        if self.schedule == "linear":
            return [self.step_size * (1 - t / steps) for t in range(steps)]
        if self.schedule == "cosine":
            return [self.step_size * (1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]
        return [self.step_size] * steps

    def perturb(self, state: AttackState) -> Tensor:
        fractions = self.step_fractions()
        for restart in range(self.restarts):
            adversarial = state.random_start() if self.random_start else state.images
            for fraction in fractions:
                adversarial = state.ascend(adversarial, state.gradient(adversarial), fraction, consume=True)
            if restart < self.restarts - 1:
                # The last restart's final iterate is scored by finish(); the others' are scored here.
                prediction = state.predict(adversarial)
                state.record(adversarial, prediction, state.score(prediction))
        return adversarial
