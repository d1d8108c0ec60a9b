"""BIM (Kurakin et al. 2017): iterative FGSM from the clean image, i.e. PGD without a random start."""

from __future__ import annotations

from torch import nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.pgd import PGD
from medrobust.errors import MedrobustError


@register_attack
class BIM(PGD):
    """The basic iterative method: PGD from the clean image (``random_start`` is always False, so there is
    one restart). Its defaults are the paper's l-inf attack (Li et al. 2020): ``steps=4`` of ``step_size=0.25``
    of the radius, i.e. 4 steps of epsilon * R / 4 with the default budget unit ``range``; ``bim`` gives the
    same images as ``pgd`` with ``steps=4, step_size=0.25, random_start=False``. ``schedule`` works as in
    ``pgd``. l-inf only: under l2 with the intensity box four fixed steps cannot spread the budget over the
    voxels that still have room (about 0.76 of a linear model's optimum); ``pgd`` and ``apgd`` take l2 budgets.
    """

    name = "bim"
    norms = ("linf",)

    # step_size keeps pgd's default, 0.25 of the radius.
    def __init__(self, model: nn.Module, *args, steps: int = 4, random_start: bool = False, **kwargs) -> None:
        # Accepted (so that params() round-trips) but only as False: a random start makes it pgd.
        if random_start is not False:
            raise MedrobustError(f"bim never starts at random: random_start must be False, got {random_start!r}; "
                                 f"use pgd for a random start")
        super().__init__(model, *args, steps=steps, random_start=False, **kwargs)
