"""torchattacks' PGD with our regression objective and each image's bounds: a cross-check of ``pgd``."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_count, check_flag, check_step_size
from medrobust.attacks.backends.base import ExternalAttack, ImageOnlyModel
from medrobust.attacks.base import AttackState


@register_attack
class TorchattacksPGD(ExternalAttack):
    """``pgd`` (l-inf, constant step size, one start) as torchattacks computes it: a subclass of
    ``torchattacks.PGD`` whose step loop is torchattacks' own with two substitutions: our objective for its
    cross-entropy, and each image's [min, max] (or none, under ``clip="none"``) for its [0, 1] clamp. Its random
    start draws from the attack's seeded generator instead of the global one, so repeats are identical; it is
    then the same start as ``pgd``'s. The result is projected by ``AttackState.project``, which only fixes float
    rounding. Needs ``torchattacks``.

    Costs one forward and one backward pass per step, plus the clean and the final prediction.
    """

    name = "torchattacks-pgd"
    norms = ("linf",)
    package = "torchattacks"
    # Its metadata pulls torchvision, a CUDA build of torch and an old requests, none of which it needs here.
    install = "pip install --no-deps torchattacks==3.5.1"

    def __init__(self, model: nn.Module, *args, steps: int = 10, step_size: float = 0.25, random_start: bool = True,
                 **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.steps, self.step_size = check_count("steps", steps), check_step_size(step_size)
        self.random_start = check_flag("random_start", random_start)

    def perturb(self, state: AttackState) -> Tensor:
        self.backend()
        attack = _regression_pgd()(ImageOnlyModel(state), state, self.step_size, self.steps, self.random_start)
        return state.project(attack(state.images))


@functools.cache
def _regression_pgd() -> type:
    """The torchattacks.PGD subclass, defined on first use: torchattacks is imported only then."""
    import torchattacks

    class RegressionPGD(torchattacks.PGD):
        """torchattacks.PGD with a regression objective and per-image bounds; ``eps`` and ``alpha`` are each
        image's radius and step, shaped to broadcast."""

        def __init__(self, model: ImageOnlyModel, state: AttackState, step_size: float, steps: int,
                     random_start: bool) -> None:
            radius = state.radius.view((-1,) + (1,) * (state.images.dim() - 1))
            super().__init__(model, eps=radius, alpha=step_size * radius, steps=steps, random_start=random_start)
            self.state = state

        def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
            state = self.state
            images = images.clone().detach()
            adv_images = state.random_start() if self.random_start else images.clone().detach()
            for _ in range(self.steps):
                adv_images.requires_grad = True
                outputs = self.get_logits(adv_images)
                cost = state.score(outputs).sum()
                grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
                adv_images = adv_images.detach() + self.alpha * grad.sign()
                delta = torch.clamp(adv_images - images, min=-self.eps, max=self.eps)
                adv_images = images + delta
                if state.lower is not None:
                    adv_images = torch.clamp(adv_images, min=state.lower, max=state.upper)
                adv_images = adv_images.detach()
            return adv_images

    return RegressionPGD
