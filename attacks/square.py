"""Square Attack (Andriushchenko et al. 2020) for a regressor: score-based random search over cubic windows, no
gradient; a threat model of its own (an attacker who sees only the model's output) and the gradient attacks'
masking detector."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_count, check_positive
from medrobust.attacks.base import Attack, AttackState
from medrobust.errors import MedrobustError

# The paper's schedule of the window's share p of the voxels, for a budget of 10 000 queries: p is halved at these
# queries (rescaled to the attack's own query budget).
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SCHEDULE_BUDGET = 10_000


@register_attack
class Square(Attack):
    """Square Attack, a score-based black-box attack (Andriushchenko et al. 2020, "Square Attack: a
    query-efficient black-box adversarial attack via random search"), written from the paper for our per-sample
    regression objectives and for 2D or 3D images.

    It queries the model's output only: every query is one forward pass, no backward pass. Start: stripes of
    +-r (a random sign per sample, channel and position along the last axes, constant along the first spatial
    axis), or for l2 a random sign per voxel at r / sqrt(d), norm r. Each query draws, per sample, a window (a square
    or cube) of side s at a random position, s set so that the window holds about a share p of the voxels; p
    starts at ``p_init`` and is halved at the paper's query counts (10, 50, 200, 500, 1000, 2000, 4000, 6000,
    8000 of 10 000, rescaled to ``queries``). l-inf: the window's voxels are set to +-r (a random sign per sample;
    a window already at those signs takes the other, as the paper's code does). l2: the window's voxels take a
    random sign and their magnitude grows by r / sqrt(d) (d the voxels that may move), then the whole perturbation
    is scaled back onto the ball (a simpler move than the paper's exchange of mass between two windows, with the
    same effect that mass gathers where it helps). Every candidate is projected into the
    mask, budget and range, and kept per sample where it raises the objective: the objective never falls.

    Threat models: ``fixed``; ``recomputed``, where the extractor measures the features of every queried image.

    Costs one forward pass per query plus the clean and the final prediction; ``steps`` counts the queries.
    """

    name = "square"
    role = "black-box"
    norms = ("linf", "l2")
    threat_models = ("fixed", "recomputed")
    quick = {"queries": 20}

    def __init__(self, model: nn.Module, *args, queries: int = 1000, p_init: float = 0.05, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.queries = check_count("queries", queries)
        self.p_init = check_positive("p_init", p_init, "the window's first share of the voxels")
        if self.p_init > 1:
            raise MedrobustError(f"p_init must be at most 1 (a share of the voxels), got {p_init!r}")

    def share(self, query: int) -> float:
        """The window's share p of the voxels at ``query`` (0-based): ``p_init`` halved at each of the paper's
        query counts passed, rescaled from its 10 000 queries to ``queries``."""
        scaled = query * SCHEDULE_BUDGET / self.queries
        return self.p_init / 2 ** sum(scaled > halving for halving in HALVINGS)

    def perturb(self, state: AttackState) -> Tensor:
        images = state.images
        view = state.ball.view
        radius = state.radius.view(view)
        spatial = images.shape[2:] if images.dim() > 2 else images.shape[1:]
        voxels = math.prod(spatial)
        if self.budget.norm == "linf":
            stripes = torch.where(state.draw() < 0.5, -1.0, 1.0).to(images.dtype)
            delta = state.ball.masked(stripes.narrow(-len(spatial), 0, 1).expand_as(images) * radius)
        else:
            delta = state.ball.masked(torch.where(state.draw() < 0.5, -1.0, 1.0).to(images.dtype))
            movable = state.ball.masked(torch.ones_like(images)).flatten(1).sum(dim=1).clamp_min(1).view(view)
            step = radius / movable.sqrt()  # each voxel's share of the radius, spread evenly
            delta = delta * step
        start = state.project(images + delta)
        prediction = state.predict(start)
        score = state.score(prediction)
        state.record(start, prediction, score)
        for query in range(self.queries):
            share = self.share(query)
            side = min(max(1, round((share * voxels) ** (1 / len(spatial)))), *spatial)
            window = self._window(state, spatial, side)
            signs = torch.where(state.draw(per_voxel=False) < 0.5, -1.0, 1.0).to(images.dtype).view(view)
            if self.budget.norm == "linf":
                # As the paper: a window already at the drawn signs would be a wasted query; it takes the other.
                unchanged = torch.where(window, delta == signs * radius, True).flatten(1).all(dim=1)
                signs = torch.where(unchanged.view(view), -signs, signs)
                candidate = torch.where(window, signs * radius, delta)
            else:
                candidate = torch.where(window, signs * (delta.abs() + step), delta)
                candidate = state.ball.masked(candidate)
                candidate = candidate * radius / state.ball.l2(candidate)
            trial = state.project(images + candidate)
            prediction = state.predict(trial)
            trial_score = state.score(prediction)
            state.steps += 1
            state.record(trial, prediction, trial_score)
            better = trial_score > score
            score = torch.where(better, trial_score, score)
            delta = torch.where(better.view(view), candidate, delta)
        # The last accepted image: the projection is deterministic, so it is that query's image, bit for bit (one
        # projection here instead of keeping a copy of it at every query).
        return state.project(images + delta)

    def _window(self, state: AttackState, spatial: torch.Size, side: int) -> Tensor:
        """Per sample, a window of ``side`` voxels per spatial axis at a random position (each sample's own draw),
        as a bool tensor broadcastable to the images [B, 1, *spatial]."""
        images = state.images
        window = None
        for axis, size in enumerate(spatial):
            start = (state.draw(per_voxel=False) * (size - side + 1)).floor().long().clamp(max=size - side)
            index = torch.arange(size, device=images.device)
            inside = (index >= start[:, None]) & (index < start[:, None] + side)  # [B, size]
            shape = [images.shape[0]] + [1] * len(spatial)
            shape[1 + axis] = size
            inside = inside.view(shape)
            window = inside if window is None else window & inside
        return window.unsqueeze(1) if images.dim() > 2 else window
