"""The geometry of a budget, one small object per norm (Foolbox's shape): the set of images an attack may reach
around a batch of clean images, and how to step and project in it.

A ball holds the clean images [B, ...], each image's radius [B], the mask (the perturbation is zero outside it)
and the clip range (each clean image's [min, max], or none). ``project`` returns the nearest allowed image,
``step`` a steepest-ascent step of a fraction of the radius followed by the projection, ``random_start`` a
random point of the ball. Float rounding is handled where it matters: every image returned moves each voxel by
at most what the budget allows, measured in the images' own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from medrobust.errors import MedrobustError


class Ball:
    """The budget ball around ``images``: radius [B], mask (bool, shaped like the images) or None, and
    ``lower``/``upper`` [B, 1, ...] (each clean image's range) or None for no clipping."""

    norm: ClassVar[str] = ""

    def __init__(self, images: Tensor, radius: Tensor, mask: Tensor | None, lower: Tensor | None,
                 upper: Tensor | None) -> None:
        self.images, self.radius, self.mask, self.lower, self.upper = images, radius, mask, lower, upper
        self.view = (-1,) + (1,) * (images.dim() - 1)

    def masked(self, tensor: Tensor) -> Tensor:
        """``tensor`` with zeros outside the mask."""
        if self.mask is None:
            return tensor
        return torch.where(self.mask, tensor, torch.zeros_like(tensor))

    def l2(self, tensor: Tensor) -> Tensor:
        """Per sample over all non-batch dimensions, shaped to broadcast; tiny instead of 0 so 0 / 0 stays 0."""
        norm = torch.linalg.vector_norm(tensor.flatten(1), ord=2, dim=1)
        return norm.clamp_min(torch.finfo(tensor.dtype).tiny).view(self.view)

    def shrink(self, norm: Tensor, radius: Tensor | None = None) -> Tensor:
        """Per sample [B], the factor that brings a perturbation of l2 norm ``norm`` [B] into an l2 ball of
        ``radius`` (by default this ball's): min(1, r / norm) (1 for a zero perturbation); ``radius`` in other
        units (r / a) for a perturbation a * delta measured as ||delta||."""
        radius = self.radius if radius is None else radius
        return (radius / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_(max=1)

    def project(self, adversarial: Tensor) -> Tensor:
        """The nearest allowed image: perturbation zero outside the mask, within the budget, then clipped into
        the clean image's range (clipping only shrinks each voxel's move, so the norm stays in budget)."""
        raise NotImplementedError

    def project_delta(self, delta: Tensor, scale: Tensor | None = None) -> Tensor:
        """``project(images + scale * delta)`` for a ``delta`` already zero outside the mask, in fewer passes
        where the norm allows; ``scale`` [B]: a factor per sample, 1 by default."""
        raise NotImplementedError

    def direction(self, grad: Tensor) -> Tensor:
        """The steepest-ascent direction of ``grad`` under this norm, zero outside the mask."""
        raise NotImplementedError

    def step(self, adversarial: Tensor, grad: Tensor, fraction: float | Tensor, consume: bool = False) -> Tensor:
        """``adversarial`` moved ``fraction`` of the radius (a number, or one per sample shaped to broadcast) along
        ``direction(grad)``, then projected. ``consume``: ``grad`` is not needed afterwards, and its memory may
        be reused."""
        return self.project(adversarial + fraction * self.radius.view(self.view) * self.direction(grad))

    def random_start(self, draw: Callable[..., Tensor]) -> Tensor:
        """A random point of the ball, from ``draw`` (``AttackState.draw``: each sample's own random stream)."""
        raise NotImplementedError


class LinfBall(Ball):
    """|x' - x| <= r per voxel. The ball, the mask and the clip range intersect to one box per voxel, built once:
    a projection is then a single clamp, which keeps a step's cost near its forward and backward pass."""

    norm = "linf"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._box: tuple[Tensor, Tensor] | None = None

    def box(self) -> tuple[Tensor, Tensor]:
        """Per voxel, the lowest and highest allowed value: x -/+ r, moved one ulp toward x where float rounding
        put it farther than r (so the budget holds for the image returned), inside the clean range, and x itself
        outside the mask."""
        if self._box is None:
            images, radius = self.images, self.radius.view(self.view)
            low, high = images - radius, images + radius
            low = torch.where(images - low > radius, torch.nextafter(low, images), low)
            high = torch.where(high - images > radius, torch.nextafter(high, images), high)
            if self.lower is not None:
                low, high = torch.maximum(low, self.lower), torch.minimum(high, self.upper)
            if self.mask is not None:
                low, high = torch.where(self.mask, low, images), torch.where(self.mask, high, images)
            self._box = (low, high)
        return self._box

    def project(self, adversarial: Tensor) -> Tensor:
        return torch.clamp(adversarial, *self.box())

    def project_delta(self, delta: Tensor, scale: Tensor | None = None) -> Tensor:
        if scale is None:
            return self.project(self.images + delta)
        return self.project(torch.addcmul(self.images, delta, scale.view(self.view)))

    def direction(self, grad: Tensor) -> Tensor:
        return self.masked(grad).sign()

    def step(self, adversarial: Tensor, grad: Tensor, fraction: float | Tensor, consume: bool = False) -> Tensor:
        # Fewer passes over the volume: the step is added in one fused pass and the mask is left to the box,
        # which pins every voxel outside it; with ``consume`` the sign is taken in the gradient's own memory. The
        # same image, bit for bit, as the plain step: sign times step is exact, so the fused add rounds alike.
        sign = grad.sign_() if consume else grad.sign()
        return self.project(torch.addcmul(adversarial, sign, fraction * self.radius.view(self.view)))

    def random_start(self, draw: Callable[..., Tensor]) -> Tensor:
        """Uniform in the box, projected."""
        return self.project(self.images + (2 * draw() - 1) * self.radius.view(self.view))


class L2Ball(Ball):
    """||x' - x||_2 <= r per image."""

    norm = "l2"

    def project(self, adversarial: Tensor) -> Tensor:
        return self.project_delta(self.masked(adversarial - self.images))

    def project_delta(self, delta: Tensor, scale: Tensor | None = None) -> Tensor:
        """Under l2 the perturbation is not taken back out of the sum and masked again. ``scale`` must bring
        scale * delta into the ball (include the ``shrink`` of scale * delta's norm); by default it is delta's
        ``shrink``."""
        if scale is None:
            scale = self.shrink(torch.linalg.vector_norm(delta.flatten(1), ord=2, dim=1))
        delta = delta * scale.view(self.view)
        adversarial = self.images + delta
        # fl(x + delta) may land half an ulp farther from x than delta (in float32 at the paper's epsilon, a few
        # 1e-5 of the radius): stepping such voxels one ulp back toward x keeps every realized move within
        # |delta|, so the budget holds for the image returned, not only for delta.
        overshoot = torch.sub(adversarial, self.images).abs_() > delta.abs()
        adversarial = torch.where(overshoot, torch.nextafter(adversarial, self.images), adversarial)
        if self.lower is not None:
            adversarial = adversarial.clamp_(self.lower, self.upper)
        return adversarial

    def direction(self, grad: Tensor) -> Tensor:
        grad = self.masked(grad)
        return grad / self.l2(grad)

    def random_start(self, draw: Callable[..., Tensor]) -> Tensor:
        """A uniform direction at radius r * u^(1/d), d the number of voxels that may move, projected."""
        direction = self.masked(draw(torch.randn))
        dims = self.masked(torch.ones_like(self.images)).flatten(1).sum(dim=1)
        fraction = draw(per_voxel=False) ** (1 / dims.clamp_min(1))
        return self.project(self.images + (fraction * self.radius).view(self.view) * direction / self.l2(direction))


class L0Ball(Ball):
    """At most r voxels change. The greedy l0 attack keeps this budget itself, voxel by voxel; no gradient step
    or projection is defined here."""

    norm = "l0"

    def _refuse(self, *args, **kwargs) -> Tensor:
        raise MedrobustError("an l0 budget has no projection or gradient step; an l0 attack chooses which voxels "
                             "to change itself (see greedy_l0)")

    project = project_delta = direction = step = random_start = _refuse


BALLS = {ball.norm: ball for ball in (LinfBall, L2Ball, L0Ball)}


def ball_for(norm: str, images: Tensor, radius: Tensor, mask: Tensor | None, lower: Tensor | None,
             upper: Tensor | None) -> Ball:
    """The ball of the budget norm ``norm`` around ``images``."""
    return BALLS[norm](images, radius, mask, lower, upper)
