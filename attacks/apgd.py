"""APGD, the Auto-PGD of AutoAttack (Croce & Hein 2020), for our regression objectives, l-inf and l2."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_count, check_flag
from medrobust.attacks.base import Attack, AttackState

# The paper's constants: momentum alpha, the fraction rho of a window's steps that must raise the objective
# for the step size to stay, and the first step size (2 epsilon) as a fraction of the radius.
MOMENTUM = 0.75
SUCCESS_RATE = 0.75
INITIAL_STEP = 2.0


def checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step size: w_j = ceil(p_j * steps) for the paper's
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), keeping those in [1, steps - 1]
    (the last iterate is never followed by a step) once each; for 100 steps 22, 41, 57, 70, 80, 87, 93, 99."""
    # In hundredths, so that 0.22 * 100 is 22 and not 22.000000000000004 rounded up to 23.
    previous, current = 0, 22
    points: list[int] = []
    while current <= 100:
        point = -(-current * steps // 100)
        if 0 < point < steps and (not points or point > points[-1]):
            points.append(point)
        previous, current = current, current + max(current - previous - 3, 6)
    return points


def halve_step(increases: Tensor, window: int, best: Tensor, best_at_last_check: Tensor,
               halved_at_last_check: Tensor) -> Tensor:
    """Per sample [B], whether APGD halves its step size at a checkpoint closing a window of ``window``
    iterations: the objective rose from one iterate to the next in fewer than rho = 0.75 of them
    (``increases`` counts those rises), or the step was not halved at the previous checkpoint and the best
    objective has not improved since."""
    return (increases < SUCCESS_RATE * window) | (~halved_at_last_check & (best <= best_at_last_check))


@register_attack
class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", the first attack of AutoAttack), maximizing our per-sample objective
    instead of a classification loss; written from the paper.

    From x0 (the clean image, or with ``random_start`` a random point of the budget ball) each step goes
    z = P(x_k + eta * s(grad)) (s the sign for l-inf, the normalized gradient for l2, P the projection into
    mask, budget and range), then x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})) with
    momentum alpha = 0.75 (1 on the first step). The step size eta starts at 2 epsilon and is per sample:
    at the checkpoints (``checkpoints``) it is halved (``halve_step``) where the objective rose in fewer
    than 75 % of the window's steps or where it was not halved at the previous checkpoint and the best
    objective has not improved since; a halved sample restarts from its best iterate, with that iterate's
    gradient and no momentum (the paper leaves the momentum after a restart open). All per-sample choices
    are tensors (torch.where), so the loop never waits for the device. Each step's score comes with its
    gradient from ``state.evaluate``.

    ``steps`` counts gradient evaluations (AutoAttack's 100 iterations by default); the iterate after the
    last step is scored by the final prediction. With ``keep_best`` (the default, as AutoAttack returns its
    best point) the best image seen is returned, else the last iterate.

    Threat models: ``fixed``; ``recomputed``, where every iterate's features are measured by the extractor and
    the gradient flows through it; ``perturbed``, where the iterate is the pair (image, regional volumes): the
    volumes take the same update in their own box (an l-inf ball of ``feature_budget`` x |clean value| per
    volume), a signed step of the same per-sample step size as a fraction of their radius, then the same
    momentum combination, projected; a halving restarts both parts from the best pair, and the best pair is
    returned. The box is an l-inf ball, so the signed step is its steepest ascent, as for an l-inf image budget.

    Costs one forward and one backward pass per step, plus the clean and the final prediction (without a random
    start, the clean prediction comes from the first step's pass at the clean image).
    """

    name = "apgd"
    norms = ("linf", "l2")
    threat_models = ("fixed", "perturbed", "recomputed")

    def __init__(self, model: nn.Module, *args, steps: int = 100, random_start: bool = True, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.steps = check_count("steps", steps)
        self.random_start = check_flag("random_start", random_start)

    @property
    def starts_clean(self) -> bool:
        """Without a random start the first gradient step is at the clean image (see ``Attack.starts_clean``)."""
        return not self.random_start

    def perturb(self, state: AttackState) -> Tensor:
        return self.search(state)[0]

    def search(self, state: AttackState) -> tuple[Tensor, Tensor]:
        """The final iterate and each sample's final step size [B] as a fraction of the radius (2 halved once
        per halving); under ``perturbed``, ``state.features`` holds the final iterate's features."""
        view = (-1,) + (1,) * (state.images.dim() - 1)
        x = state.random_start() if self.random_start else state.images
        # Under perturbed the iterate is the pair (image, features); elsewhere the features follow from the image
        # (fixed: the clean ones; recomputed: measured by evaluate) and the feature parts stay None.
        f = state.clean_features if state.feature_radius is not None else None
        evaluation = state.evaluate(x, f)
        grad, feature_grad, score = evaluation.grad, evaluation.feature_grad, evaluation.score
        previous, previous_f = x, f
        best, best_x, best_grad, best_f, best_feature_grad = score, x, grad, f, feature_grad
        step = torch.full_like(score, INITIAL_STEP)
        increases = torch.zeros_like(score)
        best_at_last_check = best
        halved_at_last_check = torch.zeros_like(score, dtype=torch.bool)
        last_check = 0
        checks = set(checkpoints(self.steps))
        for k in range(1, self.steps):
            alpha = 1.0 if k == 1 else MOMENTUM
            (x, f), (previous, previous_f) = _advance(state, x, f, previous, previous_f, grad, feature_grad,
                                                      step.view(view), alpha), (x, f)
            evaluation = state.evaluate(x, f)
            grad, feature_grad = evaluation.grad, evaluation.feature_grad
            increases = increases + (evaluation.score > score)
            score = evaluation.score
            improved = score > best
            best = torch.where(improved, score, best)
            best_x, best_grad = _where(improved, x, best_x), _where(improved, grad, best_grad)
            best_f, best_feature_grad = _where(improved, f, best_f), _where(improved, feature_grad, best_feature_grad)
            if k in checks:
                halve = halve_step(increases, k - last_check, best, best_at_last_check, halved_at_last_check)
                step = torch.where(halve, step / 2, step)
                # A halved sample restarts from its best iterate (image and features), with no momentum.
                x, previous = _where(halve, best_x, x), _where(halve, best_x, previous)
                grad = _where(halve, best_grad, grad)
                f, previous_f = _where(halve, best_f, f), _where(halve, best_f, previous_f)
                feature_grad = _where(halve, best_feature_grad, feature_grad)
                score = torch.where(halve, best, score)
                increases = torch.zeros_like(increases)
                best_at_last_check, halved_at_last_check, last_check = best, halve, k
        x, f = _advance(state, x, f, previous, previous_f, grad, feature_grad, step.view(view),
                        1.0 if self.steps == 1 else MOMENTUM)
        if f is not None:  # finish() predicts the final iterate with state.features
            state.features = f
        return x, step


def _where(condition: Tensor, new: Tensor | None, old: Tensor | None) -> Tensor | None:
    """Per sample (``condition`` [B]), ``new`` where true else ``old``, for images and features alike; None for
    a part the iterate does not carry."""
    if new is None:
        return None
    return torch.where(condition.view((-1,) + (1,) * (new.dim() - 1)), new, old)


def _advance(state: AttackState, x: Tensor, f: Tensor | None, previous: Tensor, previous_f: Tensor | None,
             grad: Tensor, feature_grad: Tensor | None, step: Tensor, alpha: float) -> tuple[Tensor, Tensor | None]:
    """One APGD update of the image and, under ``perturbed``, of the features: the projected gradient step z, then
    the momentum combination, projected. The features follow the same rule in their own box (an l-inf ball of
    each feature's radius): a signed step of the same fraction of their radius, the same momentum."""
    z = state.ascend(x, grad, step)
    z_f = None if f is None else state.ascend_features(f, feature_grad, step)
    if alpha == 1.0:
        return z, z_f
    # x + alpha (z - x) + (1 - alpha)(x - previous) in two kernels: 2x - previous (a lerp with weight 2 from
    # previous through x), then a lerp from it towards z.
    x = state.project(torch.lerp(torch.lerp(previous, x, 2.0), z, alpha))
    if f is not None:
        f = state.project_features(torch.lerp(torch.lerp(previous_f, f, 2.0), z_f, alpha))
    return x, f
