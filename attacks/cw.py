"""Carlini-Wagner l2 (Carlini & Wagner 2017) adapted to regression as Li et al. (2020) did: tanh box, Adam, and a
binary search over the constant c, per sample."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.base import Attack, AttackState
from medrobust.attacks.budget import is_finite_real
from medrobust.errors import MedrobustError

# paper: Li et al. 2020's settings; fast: a few seconds instead of minutes, for smoke runs and demos.
PRESETS = {"paper": {"iterations": 400, "search_steps": 10}, "fast": {"iterations": 50, "search_steps": 4}}
# Adam's moment decays and epsilon (torch.optim.Adam's defaults).
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


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
    """

    name = "cw"
    norms = ("linf", "l2")

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
            if value is None:
                counts[key] = PRESETS[preset][key]
            elif not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise MedrobustError(f"{key} must be an integer >= 1 (or None for the preset's), got {value!r}")
        for key, value in {"learning_rate": learning_rate, "initial_constant": initial_constant}.items():
            if not is_finite_real(value) or value <= 0:
                raise MedrobustError(f"{key} must be a finite number > 0, got {value!r}")
        if not is_finite_real(success_years) or success_years < 0:
            raise MedrobustError(f"success_years must be a finite number >= 0 (years), got {success_years!r}")
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
        # the start so that the perturbation is exactly zero there (and outside the mask, where w never moves).
        position = ((images - lower) / span.clamp_min(info.tiny) * 2 - 1).clamp(-1 + info.eps, 1 - info.eps)
        start = torch.atanh(position)
        tanh_start = torch.tanh(start)
        half_span = span / 2
        inverse_square_range = 1 / (span * span).clamp_min(info.tiny).flatten()
        radius = state.radius.view(view)

        clean_score = state.score(state.clean_prediction)
        if self.objective == "target":
            threshold = torch.full_like(clean_score, -self.success_years)
        else:
            threshold = clean_score + self.success_years
        constant = torch.full_like(clean_score, self.initial_constant)
        bracket_low = torch.zeros_like(clean_score)
        bracket_high = torch.full_like(clean_score, math.inf)

        adversarial = images
        for _ in range(self.search_steps):
            w = start.clone().requires_grad_(True)
            first_moment = torch.zeros_like(images)
            second_moment = torch.zeros_like(images)
            step_best = torch.full_like(clean_score, -math.inf)
            for iteration in range(1, self.iterations + 1):
                delta = half_span * (torch.tanh(w) - tanh_start)
                if mask is not None:
                    delta = torch.where(mask, delta, torch.zeros_like(delta))
                # The exact in-budget image from state.project is what the model sees; its gradient flows through
                # the differentiable form of the same projection.
                projected = images + self._shrink(delta, radius, info.tiny)
                adversarial = torch.clamp(state.project(images + delta.detach()), lower, upper)
                prediction = self.model(adversarial + (projected - projected.detach()), state.features)
                score = state.score(prediction)
                distance = delta.flatten(1).pow(2).sum(dim=1) * inverse_square_range
                (grad,) = torch.autograd.grad((distance - constant * score).sum(), w)
                state.forward += 1
                state.backward += 1
                state.steps += 1
                score = score.detach()
                state.record(adversarial, prediction.detach(), score)
                step_best = torch.maximum(step_best, score)
                with torch.no_grad():
                    _adam_step(w, grad, first_moment, second_moment, iteration, self.learning_rate)
            constant, bracket_low, bracket_high = next_constant(
                constant, bracket_low, bracket_high, step_best >= threshold
            )
        return adversarial

    def _shrink(self, delta: Tensor, radius: Tensor, tiny: float) -> Tensor:
        # Differentiable projection of a perturbation onto the budget ball: clamp (l-inf) or scale down (l2).
        if self.budget.norm == "linf":
            return torch.minimum(torch.maximum(delta, -radius), radius)
        norm = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(tiny)
        return delta * (radius / norm.view(radius.shape)).clamp(max=1)


def _adam_step(w: Tensor, grad: Tensor, first: Tensor, second: Tensor, iteration: int, learning_rate: float) -> None:
    # torch.optim.Adam's update, in place; the bias corrections are Python floats (iteration is a Python int).
    first.mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
    second.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
    denominator = (second / (1 - BETAS[1] ** iteration)).sqrt_().add_(ADAM_EPS)
    w.addcdiv_(first, denominator, value=-learning_rate / (1 - BETAS[0] ** iteration))
