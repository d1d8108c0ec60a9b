"""Carlini-Wagner l2 (Carlini & Wagner 2017) adapted to regression as Li et al. (2020) did: tanh box, Adam, and a
binary search over the constant c, per sample."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.base import Attack, AttackState
from medrobust.attacks.budget import is_finite_real
from medrobust.attacks.pgd import check_count
from medrobust.errors import MedrobustError

# paper: Li et al. 2020's settings; fast: a few seconds instead of minutes, for smoke runs and demos.
PRESETS = {"paper": {"iterations": 400, "search_steps": 10}, "fast": {"iterations": 50, "search_steps": 4}}
# Devices with torch.optim.Adam's fused kernel (one kernel per update, no host synchronisation).
FUSED_ADAM_DEVICES = ("cpu", "cuda")


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
            counts[key] = PRESETS[preset][key] if value is None else check_count(key, value)
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
        # the start so that the perturbation is exactly zero there (and outside the mask, where w never moves
        # because its gradient is zero there).
        position = ((images - lower) / span.clamp_min(info.tiny) * 2 - 1).clamp(-1 + info.eps, 1 - info.eps)
        start = torch.atanh(position)
        tanh_start = torch.tanh(start)
        half_span = span / 2
        # d(||x' - x||^2 / R^2) / dx' = 2 (x' - x) / R^2, per sample.
        distance_slope = 2 / (span * span).clamp_min(info.tiny).flatten()
        radius = state.radius

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
            # Each search step restarts from the clean image with fresh Adam moments.
            w = start.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=self.learning_rate, fused=fused)
            step_best = torch.full_like(clean_score, -math.inf)
            for _ in range(self.iterations):
                with torch.no_grad():
                    tanh = torch.tanh(w)
                    delta = half_span * (tanh - tanh_start)
                    # The model sees the iterate projected into the budget: every forward scores an allowed image.
                    adversarial = torch.clamp(state.project(images + delta), lower, upper)
                scaled_grad, score = self._scaled_gradient(state, adversarial, constant)
                step_best = torch.maximum(step_best, score)
                with torch.no_grad():
                    w.grad = self._loss_gradient(delta, scaled_grad, tanh, radius, distance_slope, half_span, mask)
                optimizer.step()
            constant, bracket_low, bracket_high = next_constant(
                constant, bracket_low, bracket_high, step_best >= threshold
            )
        return adversarial

    def _scaled_gradient(self, state: AttackState, adversarial: Tensor, constant: Tensor) -> tuple[Tensor, Tensor]:
        """c times the objective's gradient at ``adversarial``, and its score [B], recorded for ``keep_best``: one
        forward and one backward pass. (``state.gradient`` does not return the score, which the search needs.)"""
        leaf = adversarial.detach().requires_grad_(True)
        prediction = self.model(leaf, state.features)
        score = state.score(prediction)
        # Samples are independent, so weighting the backward pass by c [B] scales each sample's gradient by its c.
        (scaled_grad,) = torch.autograd.grad(score, leaf, grad_outputs=constant)
        state.forward += 1
        state.backward += 1
        state.steps += 1
        score = score.detach()
        state.record(adversarial, prediction.detach(), score)
        return scaled_grad, score

    def _loss_gradient(self, delta: Tensor, scaled_grad: Tensor, tanh: Tensor, radius: Tensor,
                       distance_slope: Tensor, half_span: Tensor, mask: Tensor | None) -> Tensor:
        """Gradient with respect to w of ||x' - x||^2 / R^2 - c * objective(P(x')), P the projection into the
        budget ball, from c * (gradient of the objective at P(x')): the chain rule through P and the tanh box."""
        view = half_span.shape
        if self.budget.norm == "linf":
            # P clamps each voxel: where it binds, the objective does not move with that voxel.
            inside = delta.abs() <= radius.view(view)
            grad = distance_slope.view(view) * delta - torch.where(inside, scaled_grad, torch.zeros_like(scaled_grad))
        else:
            # Outside the ball P(d) = r d / n (n = ||d||), whose Jacobian is (r / n) (I - d d^T / n^2).
            tiny = torch.finfo(delta.dtype).tiny
            norm = torch.linalg.vector_norm(delta.flatten(1), dim=1)
            outside = norm > radius
            shrink = torch.where(outside, radius / norm.clamp_min(tiny), 1)
            radial = torch.linalg.vecdot(delta.flatten(1), scaled_grad.flatten(1)) / norm.square().clamp_min(tiny)
            along_delta = distance_slope + torch.where(outside, shrink * radial, 0)
            grad = torch.addcmul(along_delta.view(view) * delta, scaled_grad, -shrink.view(view))
        # dx'/dw = (R / 2) (1 - tanh(w)^2).
        grad = grad * (half_span * (1 - tanh * tanh))
        if mask is not None:
            grad = torch.where(mask, grad, torch.zeros_like(grad))
        return grad
