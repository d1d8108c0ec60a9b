"""Random noise of exactly the budget's norm: the baseline every real attack must beat."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_count
from medrobust.attacks.base import Attack, AttackState
from medrobust.attacks.budget import perturbation_norms
from medrobust.errors import MedrobustError

# uniform: a random sign per voxel; gaussian: a standard normal draw per voxel. Either is then scaled.
DISTRIBUTIONS = ("uniform", "gaussian")


@register_attack
class Noise(Attack):
    """Random noise scaled to exactly the budget's norm r: each of ``draws`` draws is a random sign per voxel
    (``distribution="uniform"``) or a standard normal value per voxel (``"gaussian"``), zero outside the mask,
    scaled per image so that its l-inf or l2 norm is r. Uniform under l-inf moves every voxel of the mask by
    +-r (a random corner of the ball); Gaussian under l2 is a uniformly random direction on the l2 sphere.
    The noisy image is then clipped into the clean image's range like every attack's, which shrinks the
    moves of voxels near the range's ends, so with ``clip="image"`` the realized norm can be below r.

    Each draw d is tried with both signs, x + d and x - d (antithetic pairs: as likely as any draw, and where
    the model is locally linear one of the two never lowers the objective); with ``keep_best`` the best of
    the 2 x ``draws`` noisy images, or the clean image where all are worse, is returned. Each image's draws come
    from its own seeded stream (``sample_seeds``), so they do not depend on the batch it is in.

    Each noisy image is scored through ``state.evaluate`` (one forward and one backward pass, the gradient
    unused) because the attack contract counts at least one backward pass; so ``steps`` counts noisy images.

    Threat models, so that every attack has a baseline of its own setting: ``recomputed`` measures the features
    again on each noisy image; ``perturbed`` also moves every regional volume to a random end of its box (clean
    +- ``feature_budget`` x |value|, a random sign per volume, drawn with the image's noise and negated with it).
    """

    name = "noise"
    role = "baseline"
    norms = ("linf", "l2")
    threat_models = ("fixed", "perturbed", "recomputed")

    def __init__(self, model: nn.Module, *args, distribution: str = "uniform", draws: int = 1, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        if distribution not in DISTRIBUTIONS:
            raise MedrobustError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        self.distribution = distribution
        self.draws = check_count("draws", draws)

    def draw(self, state: AttackState) -> Tensor:
        """One noise draw [B, ...] of exactly the budget's norm per image, zero outside the mask, before
        projection and clipping."""
        images = state.images
        if self.distribution == "uniform":
            noise = torch.where(state.draw() < 0.5, 1.0, -1.0).to(images.dtype)
        else:
            noise = state.draw(torch.randn)
        if state.mask is not None:
            noise = noise * state.mask
        norm = perturbation_norms(noise)[self.budget.norm]
        # An image whose mask is empty draws no noise (0, not 0 * r / tiny, which can overflow to inf * 0).
        scale = torch.where(norm > 0, state.radius / norm, torch.zeros_like(norm))
        return noise * scale.view((-1,) + (1,) * (noise.dim() - 1))

    def feature_draw(self, state: AttackState) -> Tensor | None:
        """Under ``perturbed``: a random corner of the features' box, as a move from the clean features [B, F]
        (0 for the features that may not move); else None."""
        if state.feature_radius is None:
            return None
        count = state.clean_features.shape[1]
        uniform = torch.stack([torch.rand(count, generator=generator, dtype=state.feature_radius.dtype,
                                          device=state.feature_radius.device) for generator in state.generators])
        return torch.where(uniform < 0.5, 1.0, -1.0) * state.feature_radius

    def perturb(self, state: AttackState) -> Tensor:
        for _ in range(self.draws):
            noise, feature_noise = self.draw(state), self.feature_draw(state)
            for sign in (1.0, -1.0):
                adversarial = state.project(state.images + sign * noise)
                features = None if feature_noise is None else state.project_features(
                    state.clean_features + sign * feature_noise)
                state.evaluate(adversarial, features=features)
        return adversarial
