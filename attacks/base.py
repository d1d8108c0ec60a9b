"""The attack contract: ``Attack`` owns the plumbing every attack shares, ``AttackResult`` is what it returns.

An attack subclass sets ``name`` and ``norms`` and implements ``perturb(state)``; the base validates the
arguments, freezes the model, builds the per-call ``AttackState`` (budget radius, bounds, objective, counters,
best iterate) and turns the final iterate into an ``AttackResult``.
"""

from __future__ import annotations

import hashlib
import inspect
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from medrobust.attacks.budget import NORMS, Budget, as_budget, is_finite_real
from medrobust.attacks.objectives import check_objective, objective_score
from medrobust.errors import MedrobustError

# fixed: context features keep their clean values (the paper's setting). perturbed: the attacker also moves each
# regional volume within its own relative budget, jointly with the image. recomputed: the features follow from
# the attacked image through a (differentiable) feature extractor given with the batch.
THREAT_MODELS = ("fixed", "perturbed", "recomputed")
# Under "perturbed", the features an attacker may move: regional volumes (a segmentation's output), not the
# subject's sex or the scanner's field strength.
PERTURBABLE_PREFIX = "vol_"
# image: stay inside each clean image's own [min, max]; none: no intensity bounds.
CLIPS = ("image", "none")


@dataclass
class AttackResult:
    """One attacked batch.

    ``images``: the adversarial images (detached, dtype and device of the input); ``features``: the context
    features the adversarial prediction used (the clean ones under ``fixed``); predictions [B] in years;
    ``forward``/``backward``: model passes spent, the clean and final predictions included; ``steps``:
    gradient steps taken.
    """

    images: Tensor
    features: Tensor | None
    clean_prediction: Tensor
    adversarial_prediction: Tensor
    forward: int
    backward: int
    steps: int


@dataclass
class Evaluation:
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


class AttackState:
    """One call's clean batch, bounds, counters and best iterate: what ``Attack.perturb`` works with.

    Iterates are adversarial images rather than perturbations so that the image scored is, bit for bit, the
    image returned. Everything here runs without a host synchronisation: per-sample choices use torch.where.
    """

    def __init__(self, attack: Attack, images: Tensor, features: Tensor | None, ages: Tensor | None,
                 mask: Tensor | None, extractor: Callable[[Tensor], Tensor] | None = None,
                 sample_seeds: Sequence[int] | Tensor | None = None) -> None:
        if attack.threat_model == "recomputed" and (extractor is None or features is None):
            raise MedrobustError("threat_model 'recomputed' needs the clean context features and a feature "
                                 "extractor (extractor=callable(images) -> features) with the batch")
        self.extractor = extractor if attack.threat_model == "recomputed" else None
        self.attack = attack
        self.images = images
        self.clean_features = features
        self.features = features  # the current iterate's features: the clean ones unless the threat model moves them
        self.feature_radius = _feature_radius(attack, features)
        self._feature_grad: Tensor | None = None
        self.ages = ages
        self.mask = mask
        self.forward = 0
        self.backward = 0
        self.steps = 0
        # One random stream per sample, created per call from (the attack's seed, the sample's seed): two calls
        # with the same inputs give identical output, and a sample's draws do not depend on its batch.
        self.generators = sample_generators(attack.seed, sample_seeds, images)
        self._view = (-1,) + (1,) * (images.dim() - 1)
        self.radius = attack.budget.radius(images)
        self.lower = self.upper = None
        self._box: tuple[Tensor, Tensor] | None = None  # the l-inf box, built by the first projection
        self._feature_box: tuple[Tensor, Tensor] | None = None  # the features' box under perturbed, likewise
        if attack.clip == "image":
            flat = images.flatten(1)
            self.lower = flat.amin(dim=1).view(self._view)
            self.upper = flat.amax(dim=1).view(self._view)
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
            self._set_clean(self.predict(images))

    @property
    def clean_prediction(self) -> Tensor:
        """The model's prediction [B] for the clean images: from the attack's first pass where it starts at the
        clean images (``Attack.starts_clean``), else (or when asked for before that pass) a forward pass of its own."""
        if self._clean_prediction is None:
            self.release()
            self._set_clean(self.predict(self.images))
        return self._clean_prediction

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
                 weights: Tensor | None = None) -> Evaluation:
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
        grads = torch.autograd.grad(score, inputs, torch.ones_like(score) if weights is None else weights,
                                    allow_unused=True)
        # A model that ignores the image, or (under perturbed) the features: a zero gradient, not None.
        grad = torch.zeros_like(leaf) if grads[0] is None else grads[0]
        feature_grad = None
        if len(grads) > 1:
            feature_grad = torch.zeros_like(features) if grads[1] is None else grads[1]
        self.features = None if features is None else features.detach()
        self.forward += 1
        self.backward += 1
        self.steps += 1
        prediction, score = prediction.detach(), score.detach()
        self.record(adversarial, prediction, score)
        return Evaluation(grad, feature_grad, prediction, score)

    def gradient(self, adversarial: Tensor) -> Tensor:
        """Gradient of the objective with respect to the image at ``adversarial`` (``evaluate`` at the current
        features); under ``perturbed`` the next ``ascend`` moves the features along their gradient."""
        evaluation = self.evaluate(adversarial)
        self._feature_grad = evaluation.feature_grad
        return evaluation.grad

    def ascend(self, adversarial: Tensor, grad: Tensor, fraction: float) -> Tensor:
        """Step of ``fraction`` of the radius along the steepest-ascent direction of the budget's norm
        (sign of the gradient for l-inf, the normalized gradient for l2), then projected."""
        self._ascend_features(fraction)
        grad = self._masked(grad)
        if self.attack.budget.norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / self._l2(grad)
        return self.project(adversarial + fraction * self.radius.view(self._view) * direction)

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
            clean, radius = self.clean_features, self.feature_radius
            low, high = clean - radius, clean + radius
            # As for the image: an end that rounding put farther than the radius is moved one ulp back.
            low = torch.where(clean - low > radius, torch.nextafter(low, clean), low)
            high = torch.where(high - clean > radius, torch.nextafter(high, clean), high)
            self._feature_box = (torch.where(radius > 0, low, clean), torch.where(radius > 0, high, clean))
        return torch.clamp(features, *self._feature_box).detach()

    def random_start(self) -> Tensor:
        """A random point of the budget ball around the clean images (uniform for l-inf; for l2 a uniform
        direction at radius r * u^(1/d), d the number of voxels that may move), projected."""
        images = self.images
        radius = self.radius.view(self._view)
        if self.attack.budget.norm == "linf":
            return self.project(images + (2 * self.draw() - 1) * radius)
        direction = self._masked(self.draw(torch.randn))
        dims = self._masked(torch.ones_like(images)).flatten(1).sum(dim=1)
        fraction = self.draw(per_voxel=False) ** (1 / dims.clamp_min(1))
        return self.project(images + (fraction * self.radius).view(self._view) * direction / self._l2(direction))

    def project(self, adversarial: Tensor) -> Tensor:
        """The nearest allowed image: perturbation zero outside the mask, within the budget, then clipped
        into the clean image's range (clipping only shrinks each voxel's move, so the norm stays in budget)."""
        if self.attack.budget.norm == "linf":
            # The l-inf ball, the mask and the range intersect to one box per voxel, built once per call: the
            # projection is then a single clamp, which keeps a step's cost near its forward and backward pass.
            if self._box is None:
                self._box = self._linf_box()
            return torch.clamp(adversarial, *self._box)
        return self.project_delta(self._masked(adversarial - self.images))

    def project_delta(self, delta: Tensor, scale: Tensor | None = None) -> Tensor:
        """``project(images + scale * delta)`` for a ``delta`` already zero outside the mask: the same image in fewer
        passes (under l2, the perturbation is not taken back out of the sum and masked again). ``scale`` [B]: a
        factor per sample, 1 by default; under l2 it must bring scale * delta into the ball (include the
        ``l2_shrink`` of scale * delta's norm), and by default is delta's ``l2_shrink``."""
        if self.attack.budget.norm == "linf":
            if scale is None:
                return self.project(self.images + delta)
            return self.project(torch.addcmul(self.images, delta, scale.view(self._view)))
        if scale is None:
            scale = self.l2_shrink(torch.linalg.vector_norm(delta.flatten(1), ord=2, dim=1))
        delta = delta * scale.view(self._view)
        adversarial = self.images + delta
        # fl(x + delta) may land half an ulp farther from x than delta (in float32 at the paper's epsilon, a few
        # 1e-5 of the radius): stepping such voxels one ulp back toward x keeps every realized move within
        # |delta|, so the budget holds for the image returned, not only for delta.
        overshoot = torch.sub(adversarial, self.images).abs_() > delta.abs()
        adversarial = torch.where(overshoot, torch.nextafter(adversarial, self.images), adversarial)
        if self.lower is not None:
            adversarial = adversarial.clamp_(self.lower, self.upper)
        return adversarial

    def l2_shrink(self, norm: Tensor, radius: Tensor | None = None) -> Tensor:
        """Per sample [B], the factor that brings a perturbation of l2 norm ``norm`` [B] into the ball: min(1, r /
        norm) (1 for a zero perturbation); ``radius`` [B] in place of r for a perturbation measured in other
        units (r / a for a perturbation a * delta measured as ||delta||)."""
        radius = self.radius if radius is None else radius
        return (radius / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_(max=1)

    def _linf_box(self) -> tuple[Tensor, Tensor]:
        """Per voxel, the lowest and highest allowed value under an l-inf budget: x -/+ r, moved one ulp toward x
        where float rounding put it farther than r (so the budget holds for the image returned), inside the
        clean range, and x itself outside the mask."""
        images, radius = self.images, self.radius.view(self._view)
        low, high = images - radius, images + radius
        low = torch.where(images - low > radius, torch.nextafter(low, images), low)
        high = torch.where(high - images > radius, torch.nextafter(high, images), high)
        if self.lower is not None:
            low, high = torch.maximum(low, self.lower), torch.minimum(high, self.upper)
        if self.mask is not None:
            low, high = torch.where(self.mask, low, images), torch.where(self.mask, high, images)
        return low, high

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
        )

    def _l2(self, tensor: Tensor) -> Tensor:
        # Per sample over all non-batch dimensions, shaped to broadcast; tiny instead of 0 so 0 / 0 stays 0.
        norm = torch.linalg.vector_norm(tensor.flatten(1), ord=2, dim=1)
        return norm.clamp_min(torch.finfo(tensor.dtype).tiny).view(self._view)

    def _masked(self, tensor: Tensor) -> Tensor:
        if self.mask is None:
            return tensor
        return torch.where(self.mask, tensor, torch.zeros_like(tensor))


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


def _feature_radius(attack: Attack, features: Tensor | None) -> Tensor | None:
    """Per sample and feature, how far ``perturbed`` may move a feature: ``feature_budget`` x |clean value| for
    the regional volumes, 0 for the rest (and for missing values); None when the features stay fixed."""
    if attack.threat_model != "perturbed" or features is None:
        return None
    names = getattr(getattr(attack.model, "meta", None), "feature_names", None)
    movable = torch.ones(features.shape[1], dtype=torch.bool, device=features.device)
    if names is not None:
        if len(names) != features.shape[1]:
            raise MedrobustError(f"the model names {len(names)} context features but the batch has "
                                 f"{features.shape[1]} per image: give it the features it was trained on")
        movable = torch.tensor([str(n).startswith(PERTURBABLE_PREFIX) for n in names], device=features.device)
    radius = attack.feature_budget * features.abs()
    return torch.where(movable & torch.isfinite(features), radius, torch.zeros_like(radius))


class Attack:
    """Base of every attack: ``attack(images, features, ages, mask) -> AttackResult``.

    ``budget``: a Budget, a dict of its fields or None (l-inf, 1e-3 of each image's range). ``objective``: what
    to maximize per sample (see ``OBJECTIVES``); ``target_age`` is required by, and only by, ``target``.
    ``threat_model``: ``fixed`` (context features keep their clean values) or, for the attacks that list it in
    ``threat_models``, ``perturbed`` (the regional volumes move too, each within ``feature_budget`` x its clean
    value, by a signed step at every image step, optimized jointly) and ``recomputed`` (the features are
    measured again on each iterate by the ``extractor`` given with the call). ``clip``: ``image`` keeps each
    adversarial image inside its clean image's [min, max], ``none`` does not clip. ``keep_best``: return, per
    sample, the best image seen (the clean one included) rather than the last iterate. ``seed``: of the
    random draws, for bit-identical repeats.

    Subclasses set ``name`` (the registry name), ``norms`` (the budget norms they support) and, where they step
    through ``AttackState.ascend``, ``threat_models`` (the threat models they support), add their own
    keyword arguments (all defaulted, stored as attributes of the same name so that ``params()`` finds them)
    and implement ``perturb``.
    """

    name: ClassVar[str] = ""
    norms: ClassVar[tuple[str, ...]] = NORMS
    threat_models: ClassVar[tuple[str, ...]] = ("fixed",)
    # What the reliability checks hold the attack to (medrobust.vocabulary.ROLES): a baseline is the floor no real
    # attack may fall to, a one-step attack the least an iterative one must reach. Iterative unless declared.
    role: ClassVar[str] = "iterative"
    # batch: attacks each batch on its own; set: fits one perturbation on a set of subjects (``fit``) and applies
    # it to others (``apply``).
    scope: ClassVar[str] = "batch"
    # True where the attack's first model pass is a gradient step at the clean images: that pass then also gives
    # the clean prediction (one forward pass fewer). An attack sets it only where that holds for every call.
    starts_clean: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        budget: Budget | dict | None = None,
        objective: str = "older",
        target_age: float | None = None,
        threat_model: str = "fixed",
        clip: str = "image",
        keep_best: bool = True,
        seed: int = 0,
        feature_budget: float = 0.05,
    ) -> None:
        label = self.name or type(self).__name__
        if not isinstance(model, nn.Module):
            raise MedrobustError(f"attack '{label}' needs a torch.nn.Module model, got {type(model).__name__}")
        if threat_model not in THREAT_MODELS:
            raise MedrobustError(
                f"threat_model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}"
            )
        if threat_model not in self.threat_models:
            raise MedrobustError(f"attack '{label}' supports threat models {', '.join(self.threat_models)}, "
                                 f"got threat_model {threat_model!r}")
        if not is_finite_real(feature_budget) or feature_budget < 0:
            raise MedrobustError(f"feature_budget must be a finite number >= 0 (a fraction of each feature's value), "
                                 f"got {feature_budget!r}")
        meta = getattr(model, "meta", None)
        if meta is not None and not getattr(meta, "uses_image", True) and threat_model == "fixed":
            model_name = getattr(meta, "name", type(model).__name__)
            raise MedrobustError(
                f"model '{model_name}' does not use the image, so under threat_model '{threat_model}' (clean "
                f"context features) an image attack cannot change its prediction; attack an image model"
            )
        self.budget = as_budget(budget)
        if self.budget.norm not in self.norms:
            raise MedrobustError(
                f"attack '{label}' supports budget norms {', '.join(self.norms)}, got {self.budget.norm!r}"
            )
        self.target_age = check_objective(objective, target_age)
        if clip not in CLIPS:
            raise MedrobustError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
        if not isinstance(keep_best, bool):
            raise MedrobustError(f"keep_best must be True or False, got {keep_best!r}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
            raise MedrobustError(f"seed must be an integer >= 0, got {seed!r}")
        self.model = model
        self.objective = objective
        self.threat_model = threat_model
        self.clip = clip
        self.keep_best = keep_best
        self.seed = int(seed)
        self.feature_budget = float(feature_budget)

    @classmethod
    def argument_names(cls) -> list[str]:
        """Every constructor argument but the model, read from the signatures of the class and its bases, so a
        new attack's own arguments are included without it listing them again."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if klass is object or init is None:
                continue
            for parameter in inspect.signature(init).parameters.values():
                variadic = parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
                if not variadic and parameter.name not in ("self", "model") and parameter.name not in names:
                    names.append(parameter.name)
        return names

    def params(self) -> dict:
        """Every constructor argument but the model, defaults filled in, JSON-native (budget as a dict); results
        derive their content ids from this."""
        params = {name: getattr(self, name) for name in self.argument_names()}
        params["budget"] = self.budget.as_dict()
        return params

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params().items())
        return f"{type(self).__name__}({args})"

    def __call__(
        self,
        images: Tensor,
        features: Tensor | None = None,
        ages: Tensor | None = None,
        mask: Tensor | None = None,
        extractor: Callable[[Tensor], Tensor] | None = None,
        sample_seeds: Sequence[int] | Tensor | None = None,
    ) -> AttackResult:
        """Attack a batch: ``images`` float [B, ...] (2D or 3D, any intensity range, any device), ``features``
        [B, F] or None passed to the model unchanged, ``ages`` [B] true ages (objective ``error``), ``mask``
        bool or float broadcastable to ``images``: the perturbation is zero wherever it is zero/False;
        ``extractor`` (threat model ``recomputed`` only): callable(images) -> features [B, F], differentiable,
        giving the clean features on the clean images (e.g. ``medrobust.attacks.extractors.SoftVolumes``);
        ``sample_seeds``: one integer >= 0 per image (e.g. derived from each subject's id): each image's random
        draws come from its own stream, seeded from (``seed``, its sample seed), so that they do not depend on
        how a set of images is cut into batches (None: the images' positions in the batch)."""
        images = _check_images(images)
        mask = _check_mask(mask, images)
        if ages is not None:
            ages = torch.as_tensor(ages, device=images.device)
            if ages.shape != images.shape[:1]:
                raise MedrobustError(
                    f"ages must hold one true age per image, shape [{images.shape[0]}], got {list(ages.shape)}"
                )
        model = self.model
        flags = [parameter.requires_grad for parameter in model.parameters()]
        modes = [module.training for module in model.modules()]
        state = None
        try:
            # Frozen parameters: autograd computes and accumulates no parameter gradient at all.
            model.requires_grad_(False)
            model.eval()
            # A caller's torch.no_grad() (an evaluation loop) must not switch the attack's gradients off.
            with torch.enable_grad():
                state = AttackState(self, images, features, ages, mask, extractor, sample_seeds)
                return state.finish(self.perturb(state))
        finally:
            if state is not None:
                state.release()
            for parameter, flag in zip(model.parameters(), flags, strict=True):
                parameter.requires_grad_(flag)
            for module, mode in zip(model.modules(), modes, strict=True):
                module.training = mode

    def perturb(self, state: AttackState) -> Tensor:
        """The attack itself: return the final adversarial images [B, ...], inside the budget (build iterates
        with ``state.project``/``state.ascend``, take gradients with ``state.gradient``)."""
        raise NotImplementedError


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise MedrobustError(f"images must be a float tensor [B, ...], got {getattr(images, 'dtype', images)!r}")
    if images.dim() < 2 or images.numel() == 0:
        raise MedrobustError(f"images must be a non-empty batch [B, ...], got shape {list(images.shape)}")
    # One check at the boundary: a NaN would poison the radius and every iterate silently.
    if not torch.isfinite(images).all():
        raise MedrobustError("images contain NaN or inf values; fix or drop those images before attacking")
    return images.detach()


def _check_mask(mask: Tensor | None, images: Tensor) -> Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=images.device)
    try:
        fits = torch.broadcast_shapes(mask.shape, images.shape) == images.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise MedrobustError(
            f"mask of shape {list(mask.shape)} does not broadcast to the images' shape {list(images.shape)}"
        )
    return (mask != 0).expand(images.shape)
