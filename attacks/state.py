"""The per-call state of an attack (``AttackState``): the clean batch and its budget ball, the threat model's
features, one random stream per sample, the pass counters, the clean prediction and the best iterate; and what
calls on one batch at several budgets share (``CleanPasses``)."""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from medrobust.attacks.geometry import ball_for
from medrobust.attacks.objectives import objective_score
from medrobust.attacks.result import GRADIENT_FAULTS, AttackResult, gradient_faults
from medrobust.attacks.threats import check_recomputed, feature_box, feature_radius
from medrobust.errors import MedrobustError

if TYPE_CHECKING:
    from medrobust.attacks.base import Attack


@dataclass
class Pass:
    """One iterate's forward and backward pass (``AttackState.evaluate``), all detached.

    ``grad``: the objective's gradient with respect to the image (through the extractor under ``recomputed``);
    ``feature_grad``: with respect to the context features under ``perturbed``, else None; ``prediction`` and
    ``score`` [B]: the model's prediction at the iterate and the attack's objective of it. Gradients are
    scaled per sample by the ``weights`` given to ``evaluate``.
    """

    grad: Tensor
    feature_grad: Tensor | None
    prediction: Tensor
    score: Tensor


class CleanPasses:
    """The model passes at the clean images that calls on one batch share: the clean prediction, and the gradient
    pass at the clean images of an attack that starts there (FGSM's only pass, the first step of PGD without a
    random start). Neither depends on the budget or on the attack, only on the model, the objective, the threat
    model and the inputs; so calls at several budgets (``Attack.__call__(..., shared=...)``, the runner's cells
    that differ only in their budget) make each once. The first call that makes one keeps a copy; a later call
    takes it instead of repeating the pass, its result bit for bit the same. The calls' pass counts stay the
    attacks' own; ``taken`` counts the passes taken from here instead.

    One ``CleanPasses`` serves one batch: a call with another model, objective, threat model or other input
    tensors, or one that takes its clean prediction otherwise (``Attack.starts_clean``), is refused (the tensors
    are compared by identity)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self.prediction: tuple[Tensor, Tensor | None] | None = None  # (clean prediction, features after it)
        # (the pass, the features after it, its gradient faults zero_gradient and nonfinite_gradient)
        self.gradient: tuple[Pass, Tensor | None, Tensor | None, Tensor | None] | None = None
        self.taken = 0

    def bind(self, attack: Attack, images: Tensor, features: Tensor | None, ages: object, mask: Tensor | None,
             extractor: Callable | None) -> None:
        """Check that a call shares this batch (the first call binds it): the caller's own objects."""
        objects = (attack.model, images, features, ages, mask, extractor)
        # starts_clean: whether the clean prediction comes from the gradient pass or a forward pass of its own
        values = (attack.objective, attack.target_age, attack.threat_model, attack.starts_clean)
        if self._key is None:
            self._key = objects, values
            return
        if values != self._key[1] or any(a is not b for a, b in zip(objects, self._key[0], strict=True)):
            raise MedrobustError("shared clean passes serve calls on one batch with one model, objective and "
                                 "threat model; this call differs")


class AttackState:
    """One call's clean batch, bounds, counters and best iterate: what ``Attack.perturb`` works with.

    Iterates are adversarial images rather than perturbations so that the image scored is, bit for bit, the
    image returned. Everything here runs without a host synchronisation: per-sample choices use torch.where.
    The budget's geometry (projection, steps, random starts) is ``self.ball``; the threat model's feature radius
    and box come from ``medrobust.attacks.threats``.
    """

    def __init__(self, attack: Attack, images: Tensor, features: Tensor | None, ages: Tensor | None,
                 mask: Tensor | None, extractor: Callable[[Tensor], Tensor] | None = None,
                 sample_seeds: Sequence[int] | Tensor | None = None, shared: CleanPasses | None = None) -> None:
        check_recomputed(attack.threat_model, extractor, features)
        self.shared = shared  # bound to the call's inputs by Attack.__call__
        self.extractor = extractor if attack.threat_model == "recomputed" else None
        self.attack = attack
        self.images = images
        self.clean_features = features
        self.features = features  # the current iterate's features: the clean ones unless the threat model moves them
        self.feature_radius = feature_radius(attack.threat_model, attack.feature_budget, attack.model, features)
        self._feature_grad: Tensor | None = None
        self.ages = ages
        self.mask = mask
        self.forward = 0
        self.backward = 0
        self.steps = 0
        # Per sample [B] (bool), set by the first gradient pass: see ``_checked``. None while no gradient was taken.
        self.zero_gradient: Tensor | None = None
        self.nonfinite_gradient: Tensor | None = None
        # One random stream per sample, created per call from (the attack's seed, the sample's seed): two calls
        # with the same inputs give identical output, and a sample's draws do not depend on its batch.
        self.generators = sample_generators(attack.seed, sample_seeds, images)
        self.sample_seeds = sample_seeds  # as given: an attack that calls others (ensemble) passes them on
        # Per-sample values [B] an attack reports beside its result (AttackResult.diagnostics).
        self.diagnostics: dict[str, Tensor] = {}
        self._view = (-1,) + (1,) * (images.dim() - 1)
        self.radius = attack.budget.radius(images)
        self.lower = self.upper = None
        self._feature_box: tuple[Tensor, Tensor] | None = None  # the features' box under perturbed, built once
        if attack.clip == "image":
            flat = images.flatten(1)
            self.lower = flat.amin(dim=1).view(self._view)
            self.upper = flat.amax(dim=1).view(self._view)
        # The budget's geometry: projections, steps and random starts (medrobust.attacks.geometry).
        self.ball = ball_for(attack.budget.norm, images, self.radius, mask, self.lower, self.upper)
        self.best_images = images
        self.best_features = features
        self._clean_prediction: Tensor | None = None
        self._clean_hook = None
        if attack.starts_clean:
            # The attack's first model pass is at the clean images (its first gradient step): that pass's
            # prediction is the clean prediction, taken by a one-shot forward hook before the pass is scored,
            # instead of a forward pass of its own.
            self._clean_hook = attack.model.register_forward_hook(self._take_clean)
        else:
            self._set_clean(self._predict_clean())

    @property
    def clean_prediction(self) -> Tensor:
        """The model's prediction [B] for the clean images: from the attack's first pass where it starts at the
        clean images (``Attack.starts_clean``), else (or when asked for before that pass) a forward pass of its own."""
        if self._clean_prediction is None:
            self.release()
            self._set_clean(self._predict_clean())
        return self._clean_prediction

    def _predict_clean(self) -> Tensor:
        """``predict(images)``, or the clean prediction another call on this batch made (``shared``)."""
        shared = self.shared
        if shared is not None and shared.prediction is not None:
            self.forward += 1
            shared.taken += 1
            prediction, self.features = shared.prediction
            return prediction
        prediction = self.predict(self.images)
        if shared is not None:
            shared.prediction = prediction, self.features
        return prediction

    def _set_clean(self, prediction: Tensor) -> None:
        self._clean_prediction = prediction
        self.best_prediction = prediction
        self.best_score = self.score(prediction)

    def _take_clean(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.release()
        self._set_clean(output.detach())

    def release(self) -> None:
        """Remove the clean-prediction hook from the model, if it is still there (the call ends or failed)."""
        if self._clean_hook is not None:
            self._clean_hook.remove()
            self._clean_hook = None

    def draw(self, sampler: Callable[..., Tensor] = torch.rand, per_voxel: bool = True) -> Tensor:
        """Random draws from ``sampler`` (``torch.rand``, ``torch.randn``), each sample's from its own stream:
        shaped like the images with ``per_voxel``, else one value per sample [B]; in the images' dtype."""
        images = self.images
        shape = images.shape[1:] if per_voxel else ()
        return torch.stack([sampler(shape, generator=generator, dtype=images.dtype, device=images.device)
                            for generator in self.generators])

    def predict(self, images: Tensor) -> Tensor:
        """The model's prediction [B] for ``images`` (features as the threat model says), without gradient."""
        self.forward += 1
        with torch.no_grad():
            if self.extractor is not None:  # the features the attacked image would be measured to have
                self.features = self.extractor(images)
            return self.attack.model(images, self.features)

    def score(self, prediction: Tensor) -> Tensor:
        """The attack's objective [B] for a prediction: higher is better for the attacker."""
        attack = self.attack
        return objective_score(attack.objective, prediction, self.clean_prediction, self.ages, attack.target_age)

    def evaluate(self, adversarial: Tensor, features: Tensor | None = None,
                 weights: Tensor | None = None) -> Pass:
        """One step's forward and backward pass at ``adversarial``: its gradients, prediction and score, counted and
        recorded for ``keep_best``; ``state.features`` becomes the features the model was given.

        The features are the clean ones under ``fixed``; under ``recomputed`` the extractor measures them on
        ``adversarial`` and the image gradient flows through it; under ``perturbed`` they are ``features`` (an
        iterate the attack carries, [B, F]), by default ``state.features``, and their gradient comes from the
        same backward pass. ``weights`` [B] scales each sample's gradients (samples are independent, so one
        backward pass weighted by w gives w times each sample's gradient); by default 1.
        """
        if features is not None and self.feature_radius is None:
            raise MedrobustError(f"features can be given to evaluate only under threat_model 'perturbed', not "
                                 f"{self.attack.threat_model!r}")
        # The call's first pass, at the clean images and features, unweighted: the same for every budget.
        clean_pass = (self.shared is not None and self.steps == 0 and adversarial is self.images and weights is None
                      and (features is None or features is self.clean_features))
        if clean_pass and self.shared.gradient is not None:
            return self._replay(*self.shared.gradient)
        # The gradient w.r.t. the adversarial image equals that w.r.t. the perturbation; parameters are frozen,
        # so autograd computes nothing else.
        leaf = adversarial.detach().requires_grad_(True)
        inputs = (leaf,)
        if self.extractor is not None:  # the features the attacked image would be measured to have
            features = self.extractor(leaf)
        elif self.feature_radius is not None:
            features = (self.features if features is None else features).detach().requires_grad_(True)
            inputs = (leaf, features)
        else:
            features = self.features
        prediction = self.attack.model(leaf, features)
        score = self.score(prediction)
        if score.requires_grad:
            grads = torch.autograd.grad(score, inputs, torch.ones_like(score) if weights is None else weights,
                                        allow_unused=True)
        else:  # no autograd graph from the inputs to the output (a detach inside): no gradient at all
            grads = (None,) * len(inputs)
        # A model that ignores the image, or (under perturbed) the features: a zero gradient, not None.
        grad = self._checked(torch.zeros_like(leaf) if grads[0] is None else grads[0])
        feature_grad = None
        if len(grads) > 1:
            feature_grad = torch.zeros_like(features) if grads[1] is None else grads[1]
            feature_grad = torch.nan_to_num(feature_grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.features = None if features is None else features.detach()
        self.forward += 1
        self.backward += 1
        self.steps += 1
        prediction, score = prediction.detach(), score.detach()
        self.record(adversarial, prediction, score)
        evaluation = Pass(grad, feature_grad, prediction, score)
        if clean_pass:  # a copy: the attack may step in place on its gradient
            self.shared.gradient = (_copy(evaluation), self.features, self.zero_gradient, self.nonfinite_gradient)
        return evaluation

    def _replay(self, evaluation: Pass, features: Tensor | None, zero_gradient: Tensor | None,
                nonfinite_gradient: Tensor | None) -> Pass:
        """``evaluate`` at the clean images from the pass another call on this batch made (``shared``): the same
        clean prediction, features, gradient faults, counts and best iterate as making it."""
        if self._clean_hook is not None:
            self._take_clean(self.attack.model, (), evaluation.prediction)
        self.zero_gradient, self.nonfinite_gradient = zero_gradient, nonfinite_gradient
        self.features = features
        self.forward += 1
        self.backward += 1
        self.steps += 1
        self.shared.taken += 1
        evaluation = _copy(evaluation)
        evaluation.score = self.score(evaluation.prediction)
        self.record(self.images, evaluation.prediction, evaluation.score)
        return evaluation

    def _checked(self, grad: Tensor) -> Tensor:
        """``grad`` with its non-finite values set to 0 (a NaN would poison every later iterate: one kernel
        per pass). At the call's first pass it also records, per sample, whether the gradient held a NaN or inf
        (``nonfinite_gradient``) and whether it was zero everywhere the perturbation may go (``zero_gradient``):
        the reliability checks flag both, as signs of masked or broken gradients."""
        if self.zero_gradient is None:
            for key, fault in gradient_faults(grad, self.mask).items():
                setattr(self, key, fault)
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def merge_gradient_faults(self, result: AttackResult) -> None:
        """Take in the gradient faults another attack's ``result`` recorded on this batch (an ensemble's member)."""
        for key in GRADIENT_FAULTS:
            theirs, ours = getattr(result, key), getattr(self, key)
            if theirs is not None:
                setattr(self, key, theirs if ours is None else ours | theirs)

    def gradient(self, adversarial: Tensor) -> Tensor:
        """Gradient of the objective with respect to the image at ``adversarial`` (``evaluate`` at the current
        features); under ``perturbed`` the next ``ascend`` moves the features along their gradient."""
        evaluation = self.evaluate(adversarial)
        self._feature_grad = evaluation.feature_grad
        return evaluation.grad

    def ascend(self, adversarial: Tensor, grad: Tensor, fraction: float | Tensor, consume: bool = False) -> Tensor:
        """Step of ``fraction`` of the radius along the steepest-ascent direction of the budget's norm (sign of the
        gradient for l-inf, the normalized gradient for l2), then projected; under ``perturbed`` the features take
        their signed step along the gradient of the last ``gradient`` call. ``consume``: ``grad`` is not used
        afterwards (a fresh gradient), so the step may reuse its memory."""
        self._ascend_features(fraction)
        return self.ball.step(adversarial, grad, fraction, consume)

    def _ascend_features(self, fraction: float) -> None:
        """Under ``perturbed``: ``state.features`` take the signed step of ``ascend_features`` along the
        gradient of the last ``gradient`` call."""
        if self.feature_radius is None or self._feature_grad is None:
            return
        self.features = self.ascend_features(self.features, self._feature_grad, fraction)
        self._feature_grad = None

    def ascend_features(self, features: Tensor, feature_grad: Tensor, fraction: float | Tensor) -> Tensor:
        """Under ``perturbed``: ``features`` moved by a signed step of ``fraction`` of each feature's radius along
        ``feature_grad`` (the steepest ascent in the features' box, an l-inf ball), kept in the box.
        ``fraction``: a number, or a tensor with one value per sample ([B] or shaped like the images)."""
        if isinstance(fraction, Tensor):
            fraction = fraction.reshape(fraction.shape[0], -1)[:, :1]
        return self.project_features(features + fraction * self.feature_radius * feature_grad.sign())

    def project_features(self, features: Tensor) -> Tensor:
        """Under ``perturbed``: the nearest features in the box of each feature's radius around its clean value
        (the clean value itself where the radius is 0: sex, field strength, missing values)."""
        if self._feature_box is None:  # built once per call: each projection is then one clamp
            self._feature_box = feature_box(self.clean_features, self.feature_radius)
        return torch.clamp(features, *self._feature_box).detach()

    def random_start(self) -> Tensor:
        """A random point of the budget ball around the clean images (uniform for l-inf; for l2 a uniform
        direction at radius r * u^(1/d), d the number of voxels that may move), projected; each sample's from
        its own stream."""
        return self.ball.random_start(self.draw)

    def project(self, adversarial: Tensor) -> Tensor:
        """The nearest allowed image: perturbation zero outside the mask, within the budget, then clipped
        into the clean image's range (clipping only shrinks each voxel's move, so the norm stays in budget)."""
        return self.ball.project(adversarial)

    def project_delta(self, delta: Tensor, scale: Tensor | None = None) -> Tensor:
        """``project(images + scale * delta)`` for a ``delta`` already zero outside the mask: the same image in fewer
        passes (under l2, the perturbation is not taken back out of the sum and masked again). ``scale`` [B]: a
        factor per sample, 1 by default; under l2 it must bring scale * delta into the ball (include the
        ``l2_shrink`` of scale * delta's norm), and by default is delta's ``l2_shrink``."""
        return self.ball.project_delta(delta, scale)

    def l2_shrink(self, norm: Tensor, radius: Tensor | None = None) -> Tensor:
        """Per sample [B], the factor that brings a perturbation of l2 norm ``norm`` [B] into the ball: min(1, r /
        norm) (1 for a zero perturbation); ``radius`` [B] in place of r for a perturbation measured in other
        units (r / a for a perturbation a * delta measured as ||delta||)."""
        return self.ball.shrink(norm, radius)

    def record(self, adversarial: Tensor, prediction: Tensor, score: Tensor) -> None:
        """Keep, per sample, the iterate with the highest score so far (when the attack keeps the best)."""
        if not self.attack.keep_best:
            return
        better = score > self.best_score
        self.best_score = torch.where(better, score, self.best_score)
        self.best_prediction = torch.where(better, prediction, self.best_prediction)
        self.best_images = torch.where(better.view(self._view), adversarial.detach(), self.best_images)
        if self.feature_radius is not None or self.extractor is not None:  # the features that went with the image
            self.best_features = torch.where(better.view(-1, 1), self.features, self.best_features)

    def finish(self, adversarial: Tensor) -> AttackResult:
        """The result for the final iterate, or for the best iterate per sample under ``keep_best``; one
        forward pass predicts (and scores) the final iterate."""
        clean_prediction = self.clean_prediction  # before the final pass, which must not be taken for the clean one
        prediction = self.predict(adversarial)
        features = self.features
        if self.attack.keep_best:
            self.record(adversarial, prediction, self.score(prediction))
            adversarial, prediction, features = self.best_images, self.best_prediction, self.best_features
        return AttackResult(
            images=adversarial.detach(),
            features=features,
            clean_prediction=clean_prediction,
            adversarial_prediction=prediction,
            forward=self.forward,
            backward=self.backward,
            steps=self.steps,
            zero_gradient=self.zero_gradient,
            nonfinite_gradient=self.nonfinite_gradient,
            diagnostics=dict(self.diagnostics),
        )


def _copy(evaluation: Pass) -> Pass:
    """A pass whose gradients are copies (an attack may step in place on them); predictions are never changed."""
    return Pass(evaluation.grad.clone(), None if evaluation.feature_grad is None else evaluation.feature_grad.clone(),
                evaluation.prediction, evaluation.score)


def sample_generators(seed: int, sample_seeds: Sequence[int] | Tensor | None, images: Tensor) -> list[torch.Generator]:
    """One generator per sample on the images' device, seeded from (``seed``, that sample's seed); without
    ``sample_seeds`` the samples' positions in the batch (0, 1, ...) serve as their seeds."""
    count = images.shape[0]
    if sample_seeds is None:
        sample_seeds = range(count)
    else:
        if isinstance(sample_seeds, Tensor):
            if sample_seeds.is_floating_point() or sample_seeds.is_complex() or sample_seeds.dim() != 1:
                raise MedrobustError(f"sample_seeds must hold one integer per image, got a tensor of dtype "
                                     f"{sample_seeds.dtype} and shape {list(sample_seeds.shape)}")
            sample_seeds = sample_seeds.tolist()  # once per call, before any model pass
        sample_seeds = list(sample_seeds)
        if len(sample_seeds) != count or not all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in sample_seeds):
            raise MedrobustError(f"sample_seeds must hold one integer >= 0 per image ({count} here), got "
                                 f"{sample_seeds!r}")
    # A hash mixes the two seeds, so that nearby seeds give unrelated streams.
    return [torch.Generator(device=images.device).manual_seed(
        int(hashlib.sha256(f"{seed}:{int(sample)}".encode()).hexdigest()[:16], 16)) for sample in sample_seeds]
