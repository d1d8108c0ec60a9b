"""Greedy l0 attack (Li et al. 2020): voxels ranked by their first-order gain (or, as the paper, by |gradient|),
each set to its image's min, mid or max where that raises the objective, until the voxel budget is spent or too
many tries in a row fail."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_choice, check_count
from medrobust.attacks.base import Attack, AttackState
from medrobust.attacks.budget import Budget
from medrobust.attacks.threats import THREAT_MODELS

# gain: |gradient| x the room the voxel has to its image's bound in the gradient's direction (the first-order
# rise of setting it there; optimal on a linear model); gradient: |gradient| alone (the paper's).
RANKINGS = ("gain", "gradient")


@register_attack
class GreedyL0(Attack):
    """The paper's greedy voxel attack under an ``l0`` budget (epsilon: the number of voxels that may change;
    default ``Budget("l0", 360)``, the paper's smallest).

    Voxels are ranked (inside the mask only) by ``ranking``: ``gain`` (the default), the first-order rise of moving the
    voxel to its image's bound in its gradient's direction, |gradient| x (max - x) where the gradient is positive and
    |gradient| x (x - min) where it is negative, which is the exact gain on a linear model (so the top voxels are the
    optimal ones there); or ``gradient``, the |gradient| alone, as the paper ranked them, which ignores how far a voxel
    can move (so a voxel already near its bound can rank first). The gradient is the objective's at the clean image.
    Each sample walks down its own ranking: the next voxel is set, in turn, to the image's min, mid ((min + max)/2) and
    max, one batched forward pass per value for the whole batch, and the best value is kept if it raises the sample's
    objective. A sample stops when its budget of changed voxels is spent, after ``max_failures`` tries in a row that did
    not raise its objective, or at the end of its ranking. ``rerank_every``: re-rank a sample's voxels by the gradient
    at its current image after that many accepted changes, voxels it already changed left out (None: rank once, as the
    paper).

    Costs three forwards per ranked voxel tried (for every sample, until the last one stops), one forward and
    backward per ranking, plus the clean and the final prediction. Only the top (epsilon + 1) * max_failures
    voxels are ranked: no sample can walk further without re-ranking.

    Threat models: ``fixed`` (clean features); ``recomputed``: the ranking's gradient flows through the batch's
    extractor and every trial is predicted with the features measured on the trial image; ``perturbed``: with
    every ranking the volumes take a signed step of their whole radius along the ranking's feature gradient,
    kept in their box, and accepted per sample only where it raises the objective, as a voxel change is (one
    more forward per ranking).
    """

    name = "l0"
    quick = {"max_failures": 4, "rerank_every": 4}
    norms = ("l0",)
    threat_models = THREAT_MODELS

    def __init__(
        self,
        model: nn.Module,
        budget: Budget | dict | None = None,
        *args,
        max_failures: int = 100,
        rerank_every: int | None = None,
        ranking: str = "gain",
        **kwargs,
    ) -> None:
        super().__init__(model, Budget("l0", 360) if budget is None else budget, *args, **kwargs)
        self.ranking = check_choice("ranking", ranking, RANKINGS)
        self.max_failures = check_count("max_failures", max_failures)
        self.rerank_every = None if rerank_every is None else check_count("rerank_every", rerank_every)

    def perturb(self, state: AttackState) -> Tensor:
        clean = state.images.flatten(1)
        adversarial = clean.clone()
        low, high = clean.amin(dim=1), clean.amax(dim=1)
        candidates = torch.stack([low, (low + high) / 2, high], dim=1).unbind(dim=1)
        budget = math.floor(self.budget.epsilon)
        depth = min(clean.shape[1], (budget + 1) * self.max_failures)
        counters = {key: torch.zeros(clean.shape[0], dtype=torch.long, device=clean.device)
                    for key in ("changed", "failures", "position", "since_rank")}
        ranked, order, feature_grad = self._rank(state, adversarial, depth)
        score = step_features(state, adversarial.view_as(state.images), state.score(state.clean_prediction),
                              feature_grad)
        while True:
            position = counters["position"].clamp(max=depth - 1)[:, None]
            # A sample's ranking ends at its depth or at the first voxel it may not change (ranked -1).
            active = (counters["changed"] < budget) & (counters["failures"] < self.max_failures) & (
                counters["position"] < depth) & (ranked.gather(1, position)[:, 0] >= 0)
            if not active.any():
                break
            voxel = order.gather(1, position)
            current = adversarial.gather(1, voxel)[:, 0]
            best_score, best_value = torch.full_like(score, -math.inf), current
            for candidate in candidates:
                trial = adversarial.scatter(1, voxel, candidate[:, None]).view_as(state.images)
                trial_score = state.score(state.predict(trial))
                better = (trial_score > best_score) & (candidate != current)
                best_score = torch.where(better, trial_score, best_score)
                best_value = torch.where(better, candidate, best_value)
            accept = active & (best_score > score)
            original = clean.gather(1, voxel)[:, 0]
            counters["changed"] += (accept & (best_value != original)).long() - (accept & (current != original)).long()
            adversarial.scatter_(1, voxel, torch.where(accept, best_value, current)[:, None])
            score = torch.where(accept, best_score, score)
            counters["failures"] = torch.where(accept, 0, counters["failures"] + active.long())
            counters["position"] += active.long()
            counters["since_rank"] += accept.long()
            if self.rerank_every is not None:
                stale = counters["since_rank"] >= self.rerank_every
                if stale.any():
                    fresh_ranked, fresh_order, feature_grad = self._rank(state, adversarial, depth)
                    ranked = torch.where(stale[:, None], fresh_ranked, ranked)
                    order = torch.where(stale[:, None], fresh_order, order)
                    for key in ("position", "since_rank"):
                        counters[key] = torch.where(stale, 0, counters[key])
                    score = step_features(state, adversarial.view_as(state.images), score, feature_grad)
        return adversarial.view_as(state.images)

    def _rank(self, state: AttackState, adversarial: Tensor, depth: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The ``depth`` largest ranks (``ranking``) at ``adversarial`` [B, N] and their voxels, per sample, and
        the features' gradient of the same pass (None unless ``perturbed``): one forward and backward. Voxels
        outside the mask and voxels already changed rank last, at -1: re-ranking moves on to new voxels."""
        evaluation = state.evaluate(adversarial.view_as(state.images))
        grad = evaluation.grad.flatten(1)
        magnitude = grad.abs()
        if self.ranking == "gain":
            clean = state.images.flatten(1)
            low, high = clean.amin(dim=1, keepdim=True), clean.amax(dim=1, keepdim=True)
            magnitude = magnitude * torch.where(grad > 0, high - adversarial, adversarial - low)
        excluded = adversarial != state.images.flatten(1)
        if state.mask is not None:
            excluded |= ~state.mask.flatten(1)
        ranked, order = torch.where(excluded, -1.0, magnitude).topk(depth, dim=1)
        return ranked, order, evaluation.feature_grad


def step_features(state: AttackState, adversarial: Tensor, score: Tensor, feature_grad: Tensor | None) -> Tensor:
    """Under ``perturbed``: a signed step of each volume's whole radius along ``feature_grad`` (from
    ``state.evaluate``), kept in its box, accepted per sample where it raises ``score`` (the objective [B] at
    ``adversarial`` with the current features); returns the score after. One forward; a no-op (no pass) under
    the other threat models."""
    if feature_grad is None:
        return score
    before = state.features
    state.features = state.ascend_features(before, feature_grad, 1.0)
    trial = state.score(state.predict(adversarial))
    better = trial > score
    state.features = torch.where(better[:, None], state.features, before)
    return torch.where(better, trial, score)
