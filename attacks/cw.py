"""Carlini-Wagner l2 (Carlini & Wagner 2017) adapted to regression as Li et al. (2020) did: tanh box, Adam, and a
binary search over the constant c, per sample."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_count, check_non_negative, check_positive
from medrobust.attacks.base import Attack, AttackState
from medrobust.errors import MedrobustError

# paper: Li et al. 2020's settings; fast: a few seconds instead of minutes, for smoke runs and demos.
PRESETS = {"paper": {"iterations": 400, "search_steps": 10}, "fast": {"iterations": 50, "search_steps": 4}}
# Devices with torch.optim.Adam's fused kernel (one kernel per update, no host synchronisation).
FUSED_ADAM_DEVICES = ("cpu", "cuda")
# Under threat model "perturbed": Adam's learning rate for the regional volumes' variables v (volume = clean +
# radius * tanh(v)). v is in units of each volume's own budget, so one rate serves every volume; at 0.1 a
# volume can reach 96 % of its budget (tanh(2)) in about 20 iterations, well within the fast preset's 50.
FEATURE_LEARNING_RATE = 0.1


def next_constant(constant: Tensor, lower: Tensor, upper: Tensor, success: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One binary-search update of the constants c [B] and their brackets, as Carlini & Wagner do it: after a
    success c becomes an upper bound, after a failure a lower bound; the new c is the bracket's midpoint, or ten
    times c while no upper bound is known yet."""
    upper = torch.where(success, torch.minimum(upper, constant), upper)
    lower = torch.where(success, lower, torch.maximum(lower, constant))
    constant = torch.where(torch.isfinite(upper), (lower + upper) / 2, constant * 10)
    return constant, lower, upper


@register_attack
class CW(Attack):
    """Carlini-Wagner l2 for a regressor, after Carlini & Wagner (2017) and its regression form in Li et al.
    (2020). Our own implementation, batched over samples.

    Each image is reparametrized inside its clean range [lo, hi] as x' = lo + R (tanh(w) + 1) / 2 (R = hi - lo),
    w starting at the clean image (voxels on a bound start one float epsilon inside). Adam (``learning_rate``)
    minimizes, per sample, ``||x' - x||^2 / R^2 - c * objective`` for ``iterations`` iterations. The model is
    evaluated at the projection of x' onto the budget ball (``state.project``), so every forward pass scores an
    image inside the budget and is kept if it is the best so far; inside the ball this is exactly C&W's loss, and
    outside it the objective term no longer grows with the distance, which pulls the iterate back.

    ``search_steps`` binary-search steps over c, per sample, starting at ``initial_constant``; each step restarts
    from the clean image with fresh Adam moments. A step succeeds when its best iterate improved the objective
    by at least ``success_years`` over the clean image (``older``, ``younger``, ``deviation``, ``error``), or for
    ``target`` came within ``success_years`` of the target age; c is then lowered, else raised (see
    ``next_constant``). ``preset`` gives ``iterations`` and ``search_steps`` (``paper``: 400 and 10, ``fast``: 50
    and 4) unless they are given.

    The tanh box keeps every image inside its clean range even with ``clip="none"``. The attack is meant for l2
    budgets (the paper's); an l-inf budget, the default of every attack, is accepted too: the loss stays the same
    and the model sees the iterate projected onto the l-inf ball. Costs one forward and one backward pass per
    iteration, plus the clean and the final prediction; no host synchronisation.

    Threat models: ``fixed``; ``recomputed``, where the extractor measures the features on every projected iterate
    and the objective's gradient flows through it (the chain rule through P and the tanh box is unchanged: it
    starts from the total gradient at P(x')); ``perturbed``, where the regional volumes are a second variable of
    the same form, volume = clean + radius * tanh(v) (v from 0, radius ``feature_budget`` x |clean value|),
    minimizing the same loss with the same Adam (learning rate ``FEATURE_LEARNING_RATE``: v is in units of each
    volume's own budget) and restarting with the image at every search step. This is C&W's own answer to a box
    constraint, and the volumes' budget is a box: the change of variables keeps them inside it with no
    projection that Adam's moments would not see, and both parts of the iterate follow one optimizer on one
    loss. The volumes add no distance term (their box is their whole budget; the distance C&W minimizes is the
    image's). The best (image, volumes) pair is kept and returned.
    """

    name = "cw"
    quick = {"iterations": 3, "search_steps": 2}
    bounded = True
    norms = ("linf", "l2")
    threat_models = ("fixed", "perturbed", "recomputed")

    def __init__(
        self,
        model: nn.Module,
        *args,
        preset: str = "paper",
        iterations: int | None = None,
        search_steps: int | None = None,
        learning_rate: float = 0.01,
        initial_constant: float = 10.0,
        success_years: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        if preset not in PRESETS:
            raise MedrobustError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        counts = {"iterations": iterations, "search_steps": search_steps}
        for key, value in counts.items():
            counts[key] = PRESETS[preset][key] if value is None else check_count(key, value)
        for key, value in {"learning_rate": learning_rate, "initial_constant": initial_constant}.items():
            check_positive(key, value)
        check_non_negative("success_years", success_years, "years")
        self.preset = preset
        self.iterations = int(counts["iterations"])
        self.search_steps = int(counts["search_steps"])
        self.learning_rate = float(learning_rate)
        self.initial_constant = float(initial_constant)
        self.success_years = float(success_years)

    def perturb(self, state: AttackState) -> Tensor:
        images, mask = state.images, state.mask
        view = (-1,) + (1,) * (images.dim() - 1)
        flat = images.flatten(1)
        lower, upper = flat.amin(dim=1).view(view), flat.amax(dim=1).view(view)
        span = upper - lower
        info = torch.finfo(images.dtype)
        # Voxels on a bound would start at w = +-inf: one epsilon inside keeps w finite, and tanh(w0) is used as
        # the start so that the perturbation is exactly zero there (and outside the mask, where w never moves
        # because its gradient is zero there).
        position = ((images - lower) / span.clamp_min(info.tiny) * 2 - 1).clamp(-1 + info.eps, 1 - info.eps)
        start = torch.atanh(position)
        tanh_start = torch.tanh(start)
        # x' - x = (R / 2) direction, direction = tanh(w) - tanh(w0), and dx'/dw = (R / 2) (1 - tanh(w)^2): the
        # per-sample factor R / 2 stays out of the full-size tensors, folded into per-sample factors.
        half = (span / 2).flatten()
        # The distance term's gradient with respect to w is (2 / R^2) (R / 2)^2 direction (1 - tanh(w)^2).
        distance = 2 / (span * span).clamp_min(info.tiny).flatten() * half * half
        bound = state.radius / half.clamp_min(info.tiny)  # the radius in units of direction: r / (R / 2)
        one = torch.ones((), dtype=images.dtype, device=images.device)
        moving = state.feature_radius is not None

        clean_score = state.score(state.clean_prediction)
        if self.objective == "target":
            threshold = torch.full_like(clean_score, -self.success_years)
        else:
            threshold = clean_score + self.success_years
        constant = torch.full_like(clean_score, self.initial_constant)
        bracket_low = torch.zeros_like(clean_score)
        bracket_high = torch.full_like(clean_score, math.inf)

        fused = images.device.type in FUSED_ADAM_DEVICES
        adversarial = images
        for _ in range(self.search_steps):
            # Each search step restarts from the clean image (and clean features) with fresh Adam moments.
            w = start.clone().requires_grad_(True)
            groups = [{"params": [w]}]
            if moving:
                v = torch.zeros_like(state.clean_features).requires_grad_(True)
                groups.append({"params": [v], "lr": FEATURE_LEARNING_RATE})
            optimizer = torch.optim.Adam(groups, lr=self.learning_rate, fused=fused)
            step_best = torch.full_like(clean_score, -math.inf)
            for _ in range(self.iterations):
                with torch.no_grad():
                    tanh = torch.tanh(w)
                    direction = torch.sub(tanh, tanh_start)
                    length = shrink = None
                    scale = half
                    if self.budget.norm == "l2":
                        length = torch.linalg.vector_norm(direction.flatten(1), dim=1)  # ||x' - x|| / (R / 2)
                        shrink = state.l2_shrink(length, bound)
                        scale = half * shrink
                    # The model sees the iterate projected into the budget: every forward scores an allowed image.
                    adversarial = state.project_delta(direction, scale)
                    if state.lower is None:  # clip="none": the tanh box still holds, float rounding included
                        adversarial = adversarial.clamp_(lower, upper)
                    features = None
                    if moving:
                        tanh_v = torch.tanh(v)
                        features = state.project_features(state.clean_features + state.feature_radius * tanh_v)
                evaluation = state.evaluate(adversarial, features, constant)
                step_best = torch.maximum(step_best, evaluation.score)
                with torch.no_grad():
                    w.grad = self._loss_gradient(direction, tanh, evaluation.grad, half, distance, bound, length,
                                                 shrink, scale, one, mask)
                    if moving:
                        # d(-c objective)/dv through f = clean + r tanh(v); no distance term: the box is the budget.
                        v.grad = -evaluation.feature_grad * state.feature_radius * (1 - tanh_v * tanh_v)
                optimizer.step()
            constant, bracket_low, bracket_high = next_constant(
                constant, bracket_low, bracket_high, step_best >= threshold
            )
        return adversarial

    def _loss_gradient(self, direction: Tensor, tanh: Tensor, scaled_grad: Tensor, half: Tensor, distance: Tensor,
                       bound: Tensor, length: Tensor | None, shrink: Tensor | None, scale: Tensor, one: Tensor,
                       mask: Tensor | None) -> Tensor:
        """Gradient with respect to w of ||x' - x||^2 / R^2 - c * objective(P(x')), P the projection into the
        budget ball, from c * (gradient of the objective at P(x')) (``scaled_grad``): the chain rule through P and
        the tanh box, with x' - x = d = (R / 2) ``direction``, zero outside the mask. Per sample [B]: ``half``,
        R / 2; ``distance``, the distance term's factor (2 / R^2) (R / 2)^2; l-inf: ``bound``, r / (R / 2); l2:
        ``length``, ||direction||, ``shrink``, P's factor r / ||d|| (1 inside the ball), and ``scale``, shrink (R / 2).
        """
        view = (-1,) + (1,) * (direction.dim() - 1)
        if self.budget.norm == "linf":
            # P clamps each voxel: where it binds (|d| > r), the objective does not move with that voxel.
            inside = direction.abs() <= bound.view(view)
            objective = torch.where(inside, scaled_grad, 0)
            grad = torch.mul(direction, distance.view(view)).addcmul_(objective, half.view(view), value=-1)
        else:
            # Outside the ball P(d) = r d / n (n = ||d||), whose Jacobian is (r / n) (I - d d^T / n^2), so the
            # objective's part is -s (g - (d . g) d / n^2) with s = r / n; (d . g) d / n^2 = (direction . g)
            # direction / ||direction||^2: the factors R / 2 cancel.
            tiny = torch.finfo(direction.dtype).tiny
            dot = torch.linalg.vecdot(direction.flatten(1), scaled_grad.flatten(1))
            radial = torch.where(shrink < 1, scale * dot / length.square().clamp_min(tiny), 0)
            grad = torch.mul(direction, (distance + radial).view(view))
            grad = grad.addcmul_(scaled_grad, scale.view(view), value=-1)
        # The rest of dx'/dw: 1 - tanh(w)^2; zero outside the mask, so that w never moves there.
        grad = grad.mul_(torch.addcmul(one, tanh, tanh, value=-1))
        return grad if mask is None else torch.where(mask, grad, 0)
