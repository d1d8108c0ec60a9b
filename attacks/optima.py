"""Closed-form optimal attacks on linear models: what an attack must reach, computed exactly.

For age = b + w . x (+ v . f with context features f) the largest rise of the prediction over a budget has a
closed form, which makes linear models the exact yardstick of an attack's strength (the shipped check
``check_reaches_linear_optimum`` in ``medrobust.attacks.checks`` holds every attack to it). Per image, with
``room`` the distance each voxel may move in the direction of its weight's sign (its intensity bound, or
unbounded without clipping, zero outside the mask):

- l-inf, radius r: each voxel moves min(r, room) along sign(w): sum |w| min(r, room) (r ||w||_1 without a box);
- l2, radius r: water-filling: voxel i moves min(room_i, lambda |w_i|), lambda set so that the moves' l2 norm is
  r, or every voxel at its room where that fits (r ||w||_2 without a box);
- l0, k voxels: the k largest gains |w_i| room_i (each voxel may go anywhere in its image's range);
- ``perturbed``: each movable feature moves its whole radius along sign(v): rho sum_j |v_j| |f_j|, added;
- ``recomputed`` with a linear extractor f = f0 + A (x - x0): the image's weight becomes w + A^T v.

Everything is computed in float64.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor, nn

# Bisection steps of the l2 water-filling: lambda's bracket shrinks by 2^-200, far below float64's resolution.
WATER_FILLING_STEPS = 200


def room(weight: Tensor, images: Tensor, lower: Tensor | None, upper: Tensor | None,
         mask: Tensor | None = None) -> Tensor:
    """Per voxel [B, N], how far it may move along sign(``weight``) before its image's bound (``lower``/``upper``
    [B], or inf without a box); 0 where the weight or the mask is 0."""
    flat = images.flatten(1).double()
    w = weight.flatten().double().expand_as(flat)
    if lower is None:
        distance = torch.full_like(flat, math.inf)
    else:
        distance = torch.where(w > 0, upper.double().view(-1, 1) - flat, flat - lower.double().view(-1, 1))
    distance = torch.where(w != 0, distance.clamp_min(0), torch.zeros_like(distance))
    if mask is not None:
        distance = torch.where(mask.expand_as(images).flatten(1), distance, torch.zeros_like(distance))
    return distance


def linf_optimum(weight: Tensor, radius: Tensor, moves: Tensor) -> Tensor:
    """Per image [B], the largest w . delta with |delta_i| <= r and each voxel within its ``room``."""
    w = weight.flatten().double().abs()
    return (w * torch.minimum(moves, radius.double().view(-1, 1))).sum(dim=1)


def l2_optimum(weight: Tensor, radius: Tensor, moves: Tensor) -> Tensor:
    """Per image [B], the largest w . delta with ||delta||_2 <= r and each voxel within its ``room``: the
    water-filling solution delta_i = min(room_i, lambda |w_i|), lambda found by bisection."""
    w = weight.flatten().double().abs().expand_as(moves)
    r = radius.double()
    gains = []
    for image in range(moves.shape[0]):
        a, c = w[image], moves[image]
        capped = torch.where(a > 0, c, torch.zeros_like(c))
        finite = torch.where(torch.isfinite(capped), capped, torch.zeros_like(capped))
        if torch.isfinite(capped).all() and torch.linalg.vector_norm(finite) <= r[image]:
            gains.append((a * finite).sum())  # every voxel at its bound fits in the ball
            continue
        # ||min(c, lambda a)|| grows with lambda: at r / ||a|| it is at most r, and it passes r after doubling.
        def norm(scale: float, a: Tensor = a, c: Tensor = c) -> Tensor:
            return torch.linalg.vector_norm(torch.minimum(c, scale * a))

        low = float(r[image] / torch.linalg.vector_norm(a).clamp_min(1e-300))
        high = 2 * low
        while norm(high) <= r[image]:
            low, high = high, 2 * high
        for _ in range(WATER_FILLING_STEPS):
            middle = (low + high) / 2
            if norm(middle) > r[image]:
                high = middle
            else:
                low = middle
        gains.append((a * torch.minimum(c, low * a)).sum())
    return torch.stack(gains)


def l0_optimum(weight: Tensor, voxels: int, moves: Tensor) -> Tensor:
    """Per image [B], the largest w . delta changing at most ``voxels`` voxels, each within its ``room``."""
    gains = weight.flatten().double().abs() * moves
    gains = torch.where(torch.isfinite(gains), gains, torch.zeros_like(gains))
    return gains.topk(min(int(voxels), gains.shape[1]), dim=1).values.sum(dim=1)


def image_optimum(norm: str, weight: Tensor, images: Tensor, radius: Tensor, lower: Tensor | None = None,
                  upper: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """Per image [B], the largest rise of w . x under the budget ``norm`` of ``radius`` [B] (l0: a voxel count),
    in the box [``lower``, ``upper``] per image (None: no box)."""
    moves = room(weight, images, lower, upper, mask)
    if norm == "linf":
        return linf_optimum(weight, radius, moves)
    if norm == "l2":
        return l2_optimum(weight, radius, moves)
    return l0_optimum(weight, int(radius.reshape(-1)[0]), moves)


def feature_optimum(feature_weight: Tensor, features: Tensor, feature_budget: float, movable: Tensor) -> Tensor:
    """Per image [B], the largest rise of v . f when each movable feature may move ``feature_budget`` x |f_j|."""
    gains = feature_weight.double().abs() * feature_budget * features.double().abs()
    return torch.where(movable.view(1, -1), gains, torch.zeros_like(gains)).sum(dim=1)


class LinearContextModel(nn.Module):
    """age = 40 + w . x + v . f on images [B, 1, ...] and context features [B, F] (``feature_names``, of which
    the ``vol_`` ones are regional volumes): the attack's optimum is closed form under every threat model."""

    def __init__(self, shape: tuple[int, ...], feature_names: list[str], seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(shape, generator=generator))
        self.feature_weight = nn.Parameter(torch.randn(len(feature_names), generator=generator))
        self.meta = SimpleNamespace(name="linear_context", uses_image=True, uses_features=True,
                                    feature_names=list(feature_names))

    def forward(self, image: Tensor, features: Tensor | None = None) -> Tensor:
        return 40.0 + (image * self.weight).flatten(1).sum(dim=1) + features @ self.feature_weight


class LinearExtractor:
    """Features measured linearly on an image: f = f0 + A (x - x0), A [F, N] (a differentiable extractor for
    threat model ``recomputed`` whose effect on the optimum is the image weight w + A^T v)."""

    def __init__(self, images: Tensor, features: Tensor, seed: int = 0, scale: float = 0.05) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images, self.features = images, features
        self.matrix = scale * torch.randn(features.shape[1], images[0].numel(), generator=generator)

    def __call__(self, images: Tensor) -> Tensor:
        return self.features + (images - self.images).flatten(1) @ self.matrix.T

    def effective_weight(self, weight: Tensor, feature_weight: Tensor) -> Tensor:
        """The image weight once the features follow the image: w + A^T v."""
        return weight + (self.matrix.T @ feature_weight).view_as(weight)
