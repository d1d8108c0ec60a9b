"""The attack contract: ``Attack`` owns the plumbing every attack shares, ``AttackResult`` is what it returns.

An attack subclass sets ``name`` and ``norms`` (and declares ``threat_models``, ``role`` and ``scope`` where it
differs from the defaults) and implements ``perturb(state)``; the base validates the arguments, freezes the
model, builds the per-call ``AttackState`` (``medrobust.attacks.state``: budget ball, bounds, objective,
counters, best iterate) and turns the final iterate into an ``AttackResult``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn

from medrobust.attacks.arguments import check_flag, check_non_negative, check_seed
from medrobust.attacks.budget import NORMS, Budget, as_budget
from medrobust.attacks.objectives import check_objective
from medrobust.attacks.result import AttackResult
from medrobust.attacks.state import AttackState, CleanPasses
from medrobust.attacks.threats import THREAT_MODELS
from medrobust.errors import MedrobustError

__all__ = ["CLIPS", "Attack", "AttackResult", "AttackState", "CleanPasses", "check_images", "check_mask",
           "evaluating"]

# image: stay inside each clean image's own [min, max]; none: no intensity bounds.
CLIPS = ("image", "none")


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
    # True where every image the attack returns stays inside its clean image's range whatever ``clip`` says (a
    # change of variables that cannot leave it, as C&W's tanh box).
    bounded: ClassVar[bool] = False
    # Settings that keep the attack quick in the shipped contract checks (medrobust.attacks.checks), where its
    # defaults would be slow: e.g. {"iterations": 3}. An attack with ``steps`` gets 3 steps there anyway.
    quick: ClassVar[dict] = {}

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
        check_non_negative("feature_budget", feature_budget, "a fraction of each feature's value")
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
        check_flag("keep_best", keep_best)
        check_seed("seed", seed)
        self.model = model
        self.objective = objective
        self.threat_model = threat_model
        self.clip = clip
        self.keep_best = keep_best
        self.seed = int(seed)
        self.feature_budget = float(feature_budget)

    @classmethod
    def argument_parameters(cls) -> dict[str, inspect.Parameter]:
        """Every constructor argument but the model, read from the signatures of the class and its bases (the
        base's first; a subclass's own default where it overrides one), so a new attack's own arguments are
        included without it listing them again."""
        parameters: dict[str, inspect.Parameter] = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if klass is object or init is None:
                continue
            for parameter in inspect.signature(init).parameters.values():
                variadic = parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
                if not variadic and parameter.name not in ("self", "model"):
                    parameters[parameter.name] = parameter
        return parameters

    @classmethod
    def argument_names(cls) -> list[str]:
        """The names of ``argument_parameters``, in order."""
        return list(cls.argument_parameters())

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
        shared: CleanPasses | None = None,
    ) -> AttackResult:
        """Attack a batch: ``images`` float [B, ...] (2D or 3D, any intensity range, any device), ``features``
        [B, F] or None passed to the model unchanged, ``ages`` [B] true ages (objective ``error``), ``mask``
        bool or float broadcastable to ``images``: the perturbation is zero wherever it is zero/False;
        ``extractor`` (threat model ``recomputed`` only): callable(images) -> features [B, F], differentiable,
        giving the clean features on the clean images (e.g. ``medrobust.attacks.extractors.SoftVolumes``);
        ``sample_seeds``: one integer >= 0 per image (e.g. derived from each subject's id): each image's random
        draws come from its own stream, seeded from (``seed``, its sample seed), so that they do not depend on
        how a set of images is cut into batches (None: the images' positions in the batch); ``shared``: a
        ``CleanPasses`` that calls on this same batch at other budgets share, so that the passes at the clean
        images are made once (the result is the same with or without it)."""
        if shared is not None:
            shared.bind(self, images, features, ages, mask, extractor)
        images = check_images(images)
        mask = check_mask(mask, images)
        if ages is not None:
            ages = torch.as_tensor(ages, device=images.device)
            if ages.shape != images.shape[:1]:
                raise MedrobustError(
                    f"ages must hold one true age per image, shape [{images.shape[0]}], got {list(ages.shape)}"
                )
        state = None
        try:
            with evaluating(self.model):
                state = AttackState(self, images, features, ages, mask, extractor, sample_seeds, shared)
                return state.finish(self.perturb(state))
        finally:
            if state is not None:
                state.release()

    def perturb(self, state: AttackState) -> Tensor:
        """The attack itself: return the final adversarial images [B, ...], inside the budget (build iterates
        with ``state.project``/``state.ascend``, take gradients with ``state.gradient``)."""
        raise NotImplementedError


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model as an attack uses it: in eval mode, its parameters frozen (autograd computes and accumulates no
    parameter gradient at all), gradients on even inside a caller's torch.no_grad() (an evaluation loop); its
    modes and flags restored after."""
    flags = [parameter.requires_grad for parameter in model.parameters()]
    modes = [module.training for module in model.modules()]
    try:
        model.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode


def check_images(images: Tensor) -> Tensor:
    """``images`` detached, checked to be a non-empty float batch [B, ...] of finite values."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise MedrobustError(f"images must be a float tensor [B, ...], got {getattr(images, 'dtype', images)!r}")
    if images.dim() < 2 or images.numel() == 0:
        raise MedrobustError(f"images must be a non-empty batch [B, ...], got shape {list(images.shape)}")
    # One check at the boundary: a NaN would poison the radius and every iterate silently.
    if not torch.isfinite(images).all():
        raise MedrobustError("images contain NaN or inf values; fix or drop those images before attacking")
    return images.detach()


def check_mask(mask: Tensor | None, images: Tensor) -> Tensor | None:
    """``mask`` as a bool tensor shaped like ``images`` (nonzero: may change), checked to broadcast; or None."""
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
