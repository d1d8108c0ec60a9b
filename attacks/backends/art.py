"""Running an ART evasion attack (Adversarial Robustness Toolbox) on our model, budget and objective.

ART attacks a regressor through ``PyTorchRegressor``: a model ``x -> prediction`` and a loss ``(prediction, y)``
whose gradient an untargeted attack ascends. We give it the attacked model with the batch's context features
bound (``ImageOnlyModel``), our objective as the loss, and as ``y`` a float array of shape (N,) holding what the
objective compares each prediction with: the clean prediction (``deviation``), the target age (``target``) or
the true age (``error``, and ``older``/``younger`` when ages are given, which ignore it). Never (N, 1) or None:
ART then broadcasts its loss to N x N with only a warning.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_count, check_step_size
from medrobust.attacks.backends.base import ExternalAttack, ImageOnlyModel
from medrobust.attacks.base import AttackState
from medrobust.attacks.objectives import objective_score


class ObjectiveLoss(nn.Module):
    """ART's loss: our objective summed over the batch, from the prediction and the reference ``y`` ART passes
    along (see the module's docstring). ART's untargeted attacks ascend it, so they maximize the objective."""

    def __init__(self, objective: str) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, prediction: Tensor, reference: Tensor) -> Tensor:
        return objective_score(self.objective, prediction, reference, reference, reference).sum()


class ARTAttack(ExternalAttack):
    """Base of the ART backends: builds the regressor for one call and runs ``art_evasion`` on the whole batch.

    The budget is in our units: ART gets each image's radius as an ``eps`` array of shape (N, 1, ..., 1). ART
    has one clip range for all images; we pass each image's own [min, max] as arrays of the same shape, which
    ART's clipping broadcasts because the batch runs as ONE ART batch (``batch_size`` = N). The result is then
    projected by ``AttackState.project``, which only fixes float rounding (ART adds the perturbation without our
    one-ulp correction) and guarantees the contract. Masks reach ART as a zero gradient outside the mask
    (``ImageOnlyModel``): ART's FGSM ignores its own ``mask`` for regressors.

    ART computes every step in NumPy (float32, on the host): each step copies the batch from and to the device.
    """

    package = "art"
    install = "pip install 'medrobust[art]' (adversarial-robustness-toolbox and packaging, which it imports undeclared)"

    def art_norm(self) -> float:
        """The budget's norm as ART names it."""
        return np.inf if self.budget.norm == "linf" else 2.0

    def art_evasion(self, regressor, radius: np.ndarray, batch_size: int):
        """The ART evasion attack for this call, on ``regressor`` with per-image radius [N, 1, ..., 1]."""
        raise NotImplementedError

    def perturb(self, state: AttackState) -> Tensor:
        self.backend()
        from art.estimators.regression.pytorch import PyTorchRegressor

        images = state.images
        clip_values = None
        if state.lower is not None:
            lower = _numpy(state.lower)
            # ART refuses min >= max; a constant image has radius 0 in unit range, and the projection clips it.
            clip_values = (lower, np.maximum(_numpy(state.upper), np.nextafter(lower, np.inf)))
        device = torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext()
        with device:
            regressor = PyTorchRegressor(
                model=ImageOnlyModel(state),
                loss=ObjectiveLoss(self.objective),
                input_shape=tuple(images.shape[1:]),
                clip_values=clip_values,
                device_type="gpu" if images.is_cuda else "cpu",
            )
            radius = _numpy(state.radius).reshape((-1,) + (1,) * (images.dim() - 1))
            evasion = self.art_evasion(regressor, radius, len(images))
            adversarial = evasion.generate(_numpy(images), _numpy(_reference(state)))
        return state.project(torch.from_numpy(adversarial).to(device=images.device, dtype=images.dtype))


def positive(step: np.ndarray) -> np.ndarray:
    """ART refuses a step of 0 (an image whose radius is 0); the projection keeps such an image still anyway."""
    return np.maximum(step, np.finfo(step.dtype).tiny)


def _reference(state: AttackState) -> Tensor:
    objective = state.attack.objective
    if objective == "target":
        return torch.full_like(state.clean_prediction, state.attack.target_age)
    if objective == "error" or (objective != "deviation" and state.ages is not None):
        return state.ages.to(state.clean_prediction.dtype)
    return state.clean_prediction


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


@register_attack
class ARTFGSM(ARTAttack):
    """``fgsm`` as ART computes it (``art.attacks.evasion.FastGradientMethod``): one step of the radius along
    the sign of the objective's gradient (l-inf) or the normalized gradient (l2), clipped to each image's
    range and projected. No arguments of its own. Needs ``adversarial-robustness-toolbox``.

    Costs one forward and one backward pass, plus the clean and the final prediction.
    """

    name = "art-fgsm"
    role = "one-step"
    norms = ("linf", "l2")

    def art_evasion(self, regressor, radius: np.ndarray, batch_size: int):
        from art.attacks.evasion import FastGradientMethod

        return FastGradientMethod(regressor, norm=self.art_norm(), eps=radius, eps_step=positive(radius),
                                  batch_size=batch_size)


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
        self.steps, self.step_size = check_count("steps", steps), check_step_size(step_size)

    def art_evasion(self, regressor, radius: np.ndarray, batch_size: int):
        from art.attacks.evasion import ProjectedGradientDescent

        return ProjectedGradientDescent(regressor, norm=self.art_norm(), eps=radius,
                                        eps_step=positive(self.step_size * radius), max_iter=self.steps,
                                        batch_size=batch_size, verbose=False)
