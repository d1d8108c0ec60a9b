"""Universal perturbation (Li et al. 2020): one perturbation shared by a whole set of images, fitted over
mini-batches and applied to any batch, held-out subjects included."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from medrobust.attacks import threats
from medrobust.attacks._registry import register_attack
from medrobust.attacks.arguments import check_count, check_step_size
from medrobust.attacks.base import Attack, AttackResult, AttackState, check_images, check_mask, evaluating
from medrobust.attacks.objectives import objective_score
from medrobust.attacks.result import gradient_faults
from medrobust.errors import MedrobustError

# sign: the paper's vote, each image's gradient sign summed over the set; pgd: the gradient of the set's summed
# objective. Either way one step per epoch over the set, along the sign (l-inf) or the l2-normalized direction.
ALGORITHMS = ("sign", "pgd")


@register_attack
class Universal(Attack):
    """One perturbation for a whole set of images: ``fit(batches)`` fits it over mini-batches, ``apply(...)``
    attacks any batch with it; calling the attack on a batch fits on that batch and applies to it.

    Each of ``steps`` steps is one epoch over the set: per mini-batch a forward and a backward pass at the
    current perturbation, summing ``pgd`` (the gradient; the default) or ``sign`` (each image's gradient sign:
    the paper's algorithm, kept as an option; under l2 it reaches only about 0.8 of a linear model's optimum,
    sign(w) pointing far from w); then the shared perturbation moves ``step_size`` times the radius along the
    sign (l-inf) or the normalized sum (l2) and is projected into the ball. The radius is the smallest over the
    fitting set (unit ``range`` or ``std`` give each image its own), so every fitting image's budget holds; at ``apply``
    each image gets the shared perturbation masked, projected into its own ball (a no-op unless its radius is
    smaller than the fitted one) and, under ``clip="image"``, clipped to its range (``clip="none"`` is the
    paper's unclipped perturbation).

    ``keep_best``: ``fit`` returns the iterate with the highest objective summed over the set (the final one
    costs a forward-only epoch), and ``apply`` returns per sample the better of the clean and the perturbed
    image. ``keep_best=False`` is the strict universal evaluation.

    Threat models: ``fixed`` (the clean context features). ``perturbed``: one relative change per regional volume
    (``feature_perturbation`` [1, F], each within +-``feature_budget``), shared by every subject like the image
    perturbation and fitted jointly with it (per step a signed step of ``step_size`` x ``feature_budget`` along
    the summed vote or gradient, under either norm); a subject's volume v becomes v + rho x |v|. ``recomputed``:
    every mini-batch comes with its own extractor (``(images, features, ages, mask, extractor)``), the gradient
    flows through it while fitting, and at ``apply`` the features are measured again on the perturbed images.
    """

    name = "universal"
    scope = "set"
    norms = ("linf", "l2")
    threat_models = threats.THREAT_MODELS

    def __init__(
        self,
        model: nn.Module,
        *args,
        algorithm: str = "pgd",
        steps: int = 8,
        step_size: float = 0.25,
        **kwargs,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        if algorithm not in ALGORITHMS:
            raise MedrobustError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        check_step_size(step_size)
        self.algorithm = algorithm
        self.steps = check_count("steps", steps)
        self.step_size = float(step_size)
        self.perturbation: Tensor | None = None
        # Under "perturbed": the fitted relative change of each feature [1, F] (zero where it may not move).
        self.feature_perturbation: Tensor | None = None
        self.fit_radius: Tensor | None = None
        # Passes of the last fit (forward, backward, steps): a call on a batch adds them to its result.
        self.fit_counters = (0, 0, 0)
        # Fitting subjects of the last fit whose first-epoch gradient was zero or non-finite (``gradient_faults``).
        self.fit_gradient_faults: dict[str, int] = {}

    def __call__(self, images: Tensor, features: Tensor | None = None, ages: Tensor | None = None,
                 mask: Tensor | None = None, extractor: Callable[[Tensor], Tensor] | None = None,
                 sample_seeds: Sequence[int] | Tensor | None = None) -> AttackResult:
        """Fit the perturbation on this batch and apply it to the same batch; the counters include the fit."""
        self.fit([(images, features, ages, mask, extractor)])
        result = self.apply(images, features, ages, mask, extractor, sample_seeds)
        forward, backward, steps = self.fit_counters
        return dataclasses.replace(result, forward=result.forward + forward, backward=result.backward + backward,
                                   steps=result.steps + steps)

    def apply(self, images: Tensor, features: Tensor | None = None, ages: Tensor | None = None,
              mask: Tensor | None = None, extractor: Callable[[Tensor], Tensor] | None = None,
              sample_seeds: Sequence[int] | Tensor | None = None) -> AttackResult:
        """Attack a batch with the fitted perturbation (two forward passes: clean and adversarial). Under
        ``perturbed`` the fitted feature change moves the batch's volumes too; under ``recomputed`` the batch's
        ``extractor`` measures the features of the perturbed images. ``sample_seeds`` are validated as by every
        attack; the universal perturbation draws nothing from them."""
        if self.perturbation is None:
            raise MedrobustError("the universal perturbation is not fitted yet: call fit(batches) first")
        if tuple(images.shape[1:]) != tuple(self.perturbation.shape[1:]):
            raise MedrobustError(f"images of shape {list(images.shape[1:])} per sample do not match the fitted "
                                 f"perturbation's {list(self.perturbation.shape[1:])}")
        shift = self.feature_perturbation
        if shift is not None and features is not None and features.shape[1:] != shift.shape[1:]:
            raise MedrobustError(f"features of {features.shape[1]} columns do not match the fitted feature "
                                 f"perturbation's {shift.shape[1]}")
        return super().__call__(images, features, ages, mask, extractor, sample_seeds)

    def perturb(self, state: AttackState) -> Tensor:
        delta = self.perturbation.to(dtype=state.images.dtype, device=state.images.device)
        if state.feature_radius is not None and self.feature_perturbation is not None:
            shift = self.feature_perturbation.to(dtype=state.features.dtype, device=state.features.device)
            state.features = _shifted(state.clean_features, shift, state.feature_radius)
        return state.project(state.images + delta)

    def fit(self, batches: Iterable) -> Tensor:
        """Fit the shared perturbation over ``batches``, a re-iterable (a list, a DataLoader) of ``(images,
        features, ages, mask)`` or ``(images, features, ages, mask, extractor)`` mini-batches read once per step;
        each is moved to the model's device, where the perturbation lives (an extractor with a ``to`` method,
        as those of ``medrobust.attacks.extractors``, too). ``recomputed`` needs every mini-batch's features and
        extractor.
        Returns the perturbation [1, ...] (also kept as ``self.perturbation``; under ``perturbed`` the feature
        change as ``self.feature_perturbation``)."""
        if iter(batches) is batches:
            raise MedrobustError("batches must be re-iterable (a list or a DataLoader), not an iterator or "
                                 "generator: the universal attack reads the set once per step")
        with evaluating(self.model):
            self.perturbation, self.feature_perturbation = self._fit(batches)
        return self.perturbation

    def _fit(self, batches: Iterable) -> tuple[Tensor, Tensor | None]:
        # Where the model's parameters are (a model without any takes the batches where they are).
        device = next((parameter.device for parameter in self.model.parameters()), None)
        delta = best = radius = best_total = shift = best_shift = None
        forward = backward = 0
        faults: dict[str, Tensor] = {}  # per fault, the fitting subjects that showed it (a device tensor)
        # keep_best scores the final iterate too: one more, forward-only, epoch.
        for step in range(self.steps + int(self.keep_best)):
            ascend = step < self.steps
            direction = feature_direction = total = None
            # Each mini-batch is validated once, in the first epoch.
            for images, features, ages, mask, extractor in _mini_batches(batches, device, check=step == 0):
                if delta is None:
                    delta = best = torch.zeros_like(images[:1])
                    best_total = torch.tensor(-math.inf, dtype=images.dtype, device=images.device)
                if images.shape[1:] != delta.shape[1:]:
                    raise MedrobustError(f"every mini-batch must have the same image shape, got "
                                         f"{list(images.shape[1:])} after {list(delta.shape[1:])}")
                if self.threat_model == "recomputed" and (extractor is None or features is None):
                    raise MedrobustError("threat_model 'recomputed' needs the clean context features and a feature "
                                         "extractor with every mini-batch: (images, features, ages, mask, "
                                         "extractor), extractor a callable(images) -> features")
                feature_radius = threats.feature_radius(self.threat_model, self.feature_budget, self.model, features)
                if feature_radius is not None and shift is None:
                    shift = best_shift = torch.zeros_like(features[:1])
                if step == 0:
                    smallest = self.budget.radius(images).amin()
                    radius = smallest if radius is None else torch.minimum(radius, smallest)
                clean = None
                if self.objective == "deviation":
                    forward += 1
                    with torch.no_grad():
                        clean = self.model(images, features)
                # Masking the shared [1, ...] perturbation (or per image, for per-image masks) before adding.
                adversarial = images + (delta if mask is None else torch.where(mask, delta, 0.0))
                if self.clip == "image":
                    low, high = torch.aminmax(images.flatten(1), dim=1)
                    view = (-1,) + (1,) * (images.dim() - 1)
                    adversarial.clamp_(low.view(view), high.view(view))
                leaf = adversarial.requires_grad_(ascend)
                shift_leaf = None
                if extractor is not None and self.threat_model == "recomputed":
                    features = extractor(leaf)  # the gradient flows through the re-measured features
                elif feature_radius is not None:  # one leaf per subject, for the per-subject vote
                    shift_leaf = shift.expand_as(features).clone().requires_grad_(ascend)
                    features = _shifted(features, shift_leaf, feature_radius)
                score = objective_score(self.objective, self.model(leaf, features), clean, ages, self.target_age)
                forward += 1
                total = score.detach().sum() if total is None else total + score.detach().sum()
                if ascend:
                    leaves = (leaf,) if shift_leaf is None else (leaf, shift_leaf)
                    # No graph at all where the model sees the image only through a detached extractor.
                    grads = (torch.autograd.grad(score.sum(), leaves, allow_unused=True) if score.requires_grad
                             else [None] * len(leaves))
                    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]
                    if step == 0:  # the first epoch's gradients, as AttackState records a call's first pass
                        for key, fault in gradient_faults(grads[0], mask).items():
                            faults[key] = fault.sum() if key not in faults else faults[key] + fault.sum()
                    grads = [torch.where(torch.isfinite(g), g, 0) for g in grads]
                    backward += 1
                    vote = _summed(self._vote(grads[0]), mask)
                    direction = vote if direction is None else direction + vote
                    if shift_leaf is not None:
                        vote = self._vote(grads[1]).sum(dim=0, keepdim=True)
                        feature_direction = vote if feature_direction is None else feature_direction + vote
            if delta is None:
                raise MedrobustError("batches is empty: the universal attack needs at least one mini-batch")
            if self.keep_best:
                # On the device, no host synchronisation: the iterate whose summed objective is the highest.
                better = total > best_total
                best_total = torch.where(better, total, best_total)
                best = torch.where(better, delta, best)
                if shift is not None:
                    best_shift = torch.where(better, shift, best_shift)
            if ascend:
                delta = self._ascend(delta, direction, radius)
                if feature_direction is not None:
                    step_size = self.step_size * self.feature_budget
                    shift = torch.clamp(shift + step_size * feature_direction.sign(), -self.feature_budget,
                                        self.feature_budget)
        self.fit_radius = radius
        self.fit_counters = (forward, backward, self.steps)
        self.fit_gradient_faults = {key: int(count) for key, count in faults.items()}  # one sync, after the fit
        if self.keep_best:
            delta, shift = best, best_shift
        return delta.detach(), None if shift is None else shift.detach()

    def _vote(self, grad: Tensor) -> Tensor:
        """Each subject's contribution to a step: its gradient's sign (``sign``) or its gradient (``pgd``)."""
        return grad.sign() if self.algorithm == "sign" else grad

    def _ascend(self, delta: Tensor, direction: Tensor, radius: Tensor) -> Tensor:
        step = self.step_size * radius
        if self.budget.norm == "linf":
            return torch.clamp(delta + step * direction.sign(), -radius, radius)
        delta = delta + step * direction / _l2(direction)
        return delta * (radius / _l2(delta)).clamp(max=1)


def _l2(tensor: Tensor) -> Tensor:
    # tiny instead of 0, so that a zero direction stays zero.
    return torch.linalg.vector_norm(tensor).clamp_min(torch.finfo(tensor.dtype).tiny)


def _summed(tensor: Tensor, mask: Tensor | None) -> Tensor:
    """``tensor`` [B, ...] summed over the batch, zero outside the mask; a mask shared by the batch is applied
    to the sum, a pass over [1, ...] instead of [B, ...]."""
    if mask is not None and mask.shape[0] > 1:
        tensor = torch.where(mask, tensor, 0.0)
    total = tensor.sum(dim=0, keepdim=True)
    return total if mask is None or mask.shape[0] > 1 else torch.where(mask, total, 0.0)


def _shifted(features: Tensor, shift: Tensor, radius: Tensor) -> Tensor:
    """``features`` [B, F] moved by the relative change ``shift`` ([1, F] or [B, F]), v + shift x |v|, where
    ``radius`` (``threats.feature_radius``) lets them move, and kept within it (float rounding included)."""
    moved = torch.clamp(features + shift * features.abs(), features - radius, features + radius)
    return torch.where(radius > 0, moved, features)


def _mini_batches(batches: Iterable, device: torch.device | None, check: bool) -> Iterator[tuple]:
    """Each mini-batch as (images, features, ages, mask, extractor) moved to ``device``, its mask as a bool
    tensor with the images' number of dimensions (not expanded), its extractor None where it has none;
    ``check`` validates it as ``Attack.__call__`` validates a batch."""
    for batch in batches:
        if check and (not isinstance(batch, (tuple, list)) or len(batch) not in (4, 5)):
            raise MedrobustError("each mini-batch must be a tuple (images, features, ages, mask) or (images, "
                                 "features, ages, mask, extractor); pass None for features, ages, mask or "
                                 "extractor where there are none")
        images, features, ages, mask, extractor = (*batch, None) if len(batch) == 4 else batch
        images = (check_images(images) if check else images.detach())
        device = images.device if device is None else device
        images = images.to(device)
        if mask is not None:
            if check:
                check_mask(mask, images)
            mask = torch.as_tensor(mask, device=device) != 0
            mask = mask.view((1,) * (images.dim() - mask.dim()) + tuple(mask.shape))
        if features is not None:
            features = features.to(device)
        ages = None if ages is None else torch.as_tensor(ages, device=device)
        if check and ages is not None and ages.shape != images.shape[:1]:
            raise MedrobustError(f"ages must hold one true age per image, {images.shape[0]} here, got shape "
                                 f"{list(ages.shape)}")
        if extractor is not None and hasattr(extractor, "to"):
            extractor = extractor.to(device)
        yield images, features, ages, mask, extractor
