"""The attack contract as functions, as scikit-learn ships ``check_estimator``: each ``check_*`` tests one property
of an attack, and ``check_attack(attack)`` runs every check that applies to it (chosen by what the attack
declares: its norms, its scope). The package's test suite runs them on every registered attack; whoever writes
an attack (in a plugin, say) can run the same on theirs:

    from medrobust.attacks.checks import check_attack
    check_attack(MyAttack)         # or a registered name; raises AssertionError naming the failed check

The checks attack tiny models (``toy_model``: a paper CNN and a hybrid on a 32^3 grid, and a 2D model without
``meta``) on ``toy_inputs`` (images with an ellipsoid brain mask, ages, context features), with the attack's
quick settings (``quick_kwargs``: 3 steps where it has ``steps``, and what the attack declares in ``quick``).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medrobust.attacks import optima
from medrobust.attacks._registry import attack_entrypoint
from medrobust.attacks.base import Attack, AttackResult, CleanPasses
from medrobust.attacks.budget import perturbation_norms
from medrobust.attacks.objectives import objective_score
from medrobust.attacks.threats import movable_features
from medrobust.errors import MedrobustError
from medrobust.models import create_model
from medrobust.models.segmenter import Segmenter, create_segmenter
from medrobust.vocabulary import NORMS, OBJECTIVES, ROLES, SCOPES, THREAT_MODELS, VOLUME_PREFIX, is_volume

# Five pools take 32 to 1 per side: the smallest grid the paper's trunk accepts; few filters keep it fast.
GRID = (32, 32, 32)
TINY = {"input_shape": GRID, "voxel_size": (6, 6, 6), "filters": (2, 4, 4, 4, 4), "dense": (8,)}
FEATURE_NAMES = ["sex", "vol_hippocampus_l", "vol_ventricles"]
FEATURE_MEAN = [0.5, 4.0, 30.0]
FEATURE_STD = [0.5, 0.5, 12.0]
AGES = [25.0, 71.0]
TARGET_AGE = 30.0
# Budgets in the paper's unit (fraction of each image's range, here 9): big enough to move a tiny model.
BUDGETS = {"linf": {"norm": "linf", "epsilon": 0.02}, "l2": {"norm": "l2", "epsilon": 0.5},
           "l0": {"norm": "l0", "epsilon": 8}}  # l0: voxels
MODEL_CASES = ("cnn3d", "hybrid_e2e", "conv2d")


class TinyConv2d(nn.Module):
    """A 2D model with the contract's forward signature and no ``meta`` (so attacks treat it as an image
    model); it records its training flag at each forward, to show that attacks run it in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4, 1)
        self.seen_training: list[bool] = []

    def forward(self, image: Tensor, features: Tensor | None = None) -> Tensor:
        self.seen_training.append(self.training)
        hidden = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return 40.0 + 20.0 * self.head(hidden).squeeze(1)


class LinearModel(nn.Module):
    """age = 40 + sum(w * image): every attack step has a closed form."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))

    def forward(self, image: Tensor, features: Tensor | None = None) -> Tensor:
        return 40.0 + (image * self.weight).flatten(1).sum(dim=1)


def toy_model(case: str) -> nn.Module:
    """A tiny randomly initialized model (``MODEL_CASES``) with a non-trivial output scale (ages in tens of
    years)."""
    torch.manual_seed(0)
    if case == "conv2d":
        return TinyConv2d()
    kwargs = dict(TINY, feature_names=FEATURE_NAMES) if case == "hybrid_e2e" else dict(TINY)
    model = create_model(case, **kwargs)
    model.set_target_scaling(40.0, 20.0)
    if model.meta.uses_features:
        model.set_feature_scaling(FEATURE_MEAN, FEATURE_STD)
    return model


def brain_batch(spatial: tuple[int, ...], batch: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Z-scored-like images [B, 1, *spatial] from -2 (background) to 7 and an ellipsoid brain mask
    [1, 1, *spatial]."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in spatial], indexing="ij")
    mask = (sum((axis / 0.8) ** 2 for axis in axes) < 1)[None, None]
    inside = (1.0 + 1.5 * torch.randn(batch, 1, *spatial, generator=generator)).clamp(-2.0, 7.0)
    images = torch.where(mask, inside, torch.full_like(inside, -2.0))
    images.view(batch, -1)[:, images[0].numel() // 2] = 7.0  # the centre: inside the mask, the range's top
    return images, mask


def linear_set(batch: int = 4, seed: int = 0) -> tuple[LinearModel, Tensor, Tensor]:
    """A ``LinearModel`` on 6^3 images and a batch of them with its mask: every image has the same gradient w,
    so every attack step is closed form."""
    images, mask = brain_batch((6, 6, 6), batch=batch, seed=seed)
    return LinearModel(images.shape[1:], seed=seed), images, mask


def toy_inputs(case: str, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(images, features or None, ages, mask) for the model ``case`` on ``device``."""
    images, mask = brain_batch((16, 16) if case == "conv2d" else GRID)
    features = None
    if case == "hybrid_e2e":
        z = torch.randn(images.shape[0], len(FEATURE_NAMES), generator=torch.Generator().manual_seed(3))
        features = (z * torch.tensor(FEATURE_STD) + torch.tensor(FEATURE_MEAN)).to(device)
    return images.to(device), features, torch.tensor(AGES, device=device), mask.to(device)


# Context models for the threat-model checks: a hybrid with sex, field strength and three regional volumes.
CONTEXT_FEATURE_NAMES = ["sex", "field_strength", "vol_hippocampus", "vol_ventricles", "vol_white_matter"]
CONTEXT_FEATURE_LABELS = [None, None, 1, 3, 2]  # the label id of each feature's region (None: not a region)


def context_model(name: str = "hybrid_e2e") -> nn.Module:
    """A tiny model ``name`` (by default the end-to-end hybrid; ``features_mlp`` for one that ignores the image)
    on ``CONTEXT_FEATURE_NAMES``, scaled to ages around 50 and features in their own units, in eval mode."""
    torch.manual_seed(0)
    model = create_model(name, feature_names=CONTEXT_FEATURE_NAMES, input_shape=GRID, voxel_size=(6.0, 6.0, 6.0))
    model.set_target_scaling(50.0, 15.0)
    model.set_feature_scaling([0.5, 2.0, 8.0, 30.0, 450.0], [0.5, 0.7, 1.0, 10.0, 50.0])
    return model.eval()


def image_blind_context_model() -> nn.Module:
    """``context_model`` with its head's weights on the conv trunk zeroed: it sees the image only through the
    features, so any move under ``recomputed`` is one that went through the extractor."""
    model = context_model()
    with torch.no_grad():
        model.head[0].weight[:, :model.conv_trunk.out_features] = 0.0
    return model


def context_batch() -> tuple[Tensor, Tensor]:
    """Images [3, 1, 32, 32, 32] and their raw context features [3, 5] (``CONTEXT_FEATURE_NAMES``)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 1, *GRID, generator=generator) * 1.5
    features = torch.tensor([[1.0, 3.0, 7.5, 25.0, 470.0], [0.0, 1.5, 8.5, 40.0, 430.0], [1.0, 3.0, 9.0, 20.0, 500.0]])
    return images, features


def labelled_batch() -> tuple[Tensor, Tensor, Tensor]:
    """``context_batch`` with a label map: two tissue regions (ids 1, 2) and a ventricle (id 3), dark as on T1."""
    images, features = context_batch()
    labels = torch.zeros(3, 1, *GRID, dtype=torch.int16)
    labels[:, :, 4:14] = 1
    labels[:, :, 14:24] = 2
    labels[:, :, 24:28, 8:24, 8:24] = 3
    images = torch.where(labels == 3, images - 3.0, images + 1.0)
    images = torch.where(labels == 0, torch.zeros_like(images), images)
    return images, features, labels


def soft_extractor(images: Tensor, features: Tensor, labels: Tensor):
    """The soft-volume extractor of a ``labelled_batch`` (``CONTEXT_FEATURE_LABELS``)."""
    from medrobust.attacks.extractors import SoftVolumes

    return SoftVolumes(labels, CONTEXT_FEATURE_LABELS, CONTEXT_FEATURE_NAMES, images, features)


def tiny_segmenter() -> Segmenter:
    """A small ``seg_unet`` (random weights, eval mode) on ``GRID`` that segments the three regions of
    ``CONTEXT_FEATURE_NAMES``: a segmenter extractor's network for the checks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        regions = [name.removeprefix(VOLUME_PREFIX) for name in CONTEXT_FEATURE_NAMES if is_volume(name)]
        segmenter = create_segmenter("seg_unet", input_shape=GRID, voxel_size=(6.0, 6.0, 6.0), region_names=regions,
                                     filters=(2, 4))
    return segmenter.requires_grad_(False).eval()


def segmenter_extractor(images: Tensor, features: Tensor):
    """The segmenter extractor (``tiny_segmenter``'s soft volumes) of a ``context_batch``."""
    from medrobust.attacks.extractors import SegmenterVolumes

    return SegmenterVolumes(tiny_segmenter(), CONTEXT_FEATURE_NAMES, images, features)


def attack_class(attack: str | type[Attack]) -> type[Attack]:
    """The attack class of a registered name, or the class itself."""
    return attack_entrypoint(attack) if isinstance(attack, str) else attack


def quick_kwargs(attack: str | type[Attack], steps: int = 3) -> dict:
    """Settings that keep an attack quick in the checks: ``steps`` where it takes ``steps``, then what the
    attack declares in its ``quick`` (a slow attack's own short settings)."""
    cls = attack_class(attack)
    kwargs = {"steps": steps} if "steps" in cls.argument_names() else {}
    return {**kwargs, **cls.quick}


@dataclass
class ContractCall:
    """One call of an attack in the contract's setting, with what the checks compare it with."""

    attack: Attack
    model: nn.Module
    norm: str
    objective: str
    images: Tensor
    features: Tensor | None
    ages: Tensor
    mask: Tensor
    clean_images: Tensor
    clean_features: Tensor | None
    parameters: list[nn.Parameter]
    flags: list[bool]
    result: AttackResult

    @functools.cached_property
    def predictions(self) -> tuple[Tensor, Tensor]:
        """The model's own predictions (eval mode) for the clean and the returned images, computed once."""
        self.model.eval()
        with torch.no_grad():
            return self.model(self.images, self.features), self.model(self.result.images, self.features)


def contract_call(attack: str | type[Attack], case: str, norm: str, objective: str,
                  device: str | torch.device = "cpu") -> ContractCall:
    """Attack the toy model ``case`` with the contract's budget of ``norm`` and ``objective``, in quick settings,
    the model in training mode with a mixed set of trainable flags (to see each restored)."""
    model = toy_model(case).to(device)
    images, features, ages, mask = toy_inputs(case, device)
    kwargs = {"budget": BUDGETS[norm], "objective": objective, **quick_kwargs(attack)}
    if objective == "target":
        kwargs["target_age"] = TARGET_AGE
    built = attack_class(attack)(model, **kwargs)
    parameters = list(model.parameters())
    parameters[0].requires_grad_(False)
    flags = [p.requires_grad for p in parameters]
    model.train()
    if isinstance(model, TinyConv2d):
        model.seen_training.clear()
    clean_images, clean_features = images.clone(), None if features is None else features.clone()
    result = built(images, features, ages, mask)
    return ContractCall(built, model, norm, objective, images, features, ages, mask, clean_images, clean_features,
                        parameters, flags, result)


def per_image(images: Tensor, reduce: str) -> Tensor:
    """``reduce`` (amin, amax, sum, ...) of each image of a batch over all its voxels, [B]."""
    return getattr(images.flatten(1), reduce)(dim=1)


def check_result_type(call: ContractCall) -> None:
    """An AttackResult whose images have the input's shape, dtype and device, detached."""
    result, images = call.result, call.images
    assert isinstance(result, AttackResult), f"returned {type(result).__name__}, not an AttackResult"
    assert result.images.shape == images.shape, f"images of shape {list(result.images.shape)}"
    assert result.images.dtype == images.dtype and result.images.device == images.device, "dtype or device changed"
    assert not result.images.requires_grad, "the adversarial images are not detached"


def check_inputs_untouched(call: ContractCall) -> None:
    """The caller's images and features are not modified."""
    assert torch.equal(call.images, call.clean_images), "the input images were modified"
    if call.features is not None:
        assert torch.equal(call.features, call.clean_features), "the input features were modified"


def check_model_left_as_it_was(call: ContractCall) -> None:
    """Parameters frozen during the attack (no parameter gradient), trainable flags and training mode restored
    after it, the model run in eval mode."""
    assert all(p.grad is None for p in call.parameters), "a parameter gradient was computed"
    assert [p.requires_grad for p in call.parameters] == call.flags, "trainable flags not restored"
    assert all(module.training for module in call.model.modules()), "training mode not restored"
    if isinstance(call.model, TinyConv2d):
        assert call.model.seen_training and not any(call.model.seen_training), "the model ran in training mode"


def check_budget_holds(call: ContractCall) -> None:
    """The perturbation returned, as realized in the images' dtype, is within the budget."""
    delta = call.result.images - call.images
    radius = call.attack.budget.radius(call.images)
    assert (perturbation_norms(delta)[call.norm] <= radius * (1 + 1e-6)).all(), f"{call.norm} budget exceeded"


def check_range_holds(call: ContractCall) -> None:
    """Each adversarial image stays inside its clean image's intensity range."""
    result, images = call.result.images, call.images
    assert (per_image(result, "amin") >= per_image(images, "amin")).all(), "below the clean image's minimum"
    assert (per_image(result, "amax") <= per_image(images, "amax")).all(), "above the clean image's maximum"


def check_mask_holds(call: ContractCall) -> None:
    """No voxel outside the mask changes."""
    delta = call.result.images - call.images
    assert not delta[~call.mask.expand_as(delta)].any(), "a voxel outside the mask changed"


def check_moves(call: ContractCall) -> None:
    """The attack changes the image."""
    assert (call.result.images - call.images).any(), "the attack did not move any voxel"


def check_features_reported(call: ContractCall) -> None:
    """Under ``fixed`` the features the adversarial prediction used are the clean ones (None without features)."""
    if call.features is None:
        assert call.result.features is None, "features reported for a model without features"
    else:
        assert torch.equal(call.result.features, call.clean_features), "features moved under threat model fixed"


def check_predictions_are_the_models(call: ContractCall) -> None:
    """The clean and adversarial predictions reported are the model's for the clean and returned images."""
    clean, adversarial = call.predictions
    assert torch.allclose(call.result.clean_prediction, clean, rtol=0, atol=1e-4), "clean prediction is not the model's"
    assert torch.allclose(call.result.adversarial_prediction, adversarial, rtol=0, atol=1e-4), \
        "adversarial prediction is not the model's for the images returned"


def check_never_worse(call: ContractCall) -> None:
    """The objective at the returned images is never below the clean images' (per sample)."""
    clean, adversarial = call.predictions
    score = objective_score(call.objective, adversarial, clean, call.ages, TARGET_AGE)
    clean_score = objective_score(call.objective, clean, clean, call.ages, TARGET_AGE)
    assert (score >= clean_score - 1e-4).all(), f"worse than the clean image for objective {call.objective!r}"


def check_counters(call: ContractCall) -> None:
    """Forward and backward passes and steps are counted as python ints > 0 (backward passes >= 0 for a black-box
    attack, which takes none)."""
    for label in ("forward", "backward", "steps"):
        count = getattr(call.result, label)
        least = 0 if label == "backward" and call.attack.role == "black-box" else 1
        assert type(count) is int and count >= least, f"{label} counter is {count!r}"
    if call.attack.role == "black-box":
        assert call.result.backward == 0, f"a black-box attack took {call.result.backward} backward passes"


def check_repeatable(call: ContractCall) -> None:
    """The same call gives the same images, predictions and counters (under the seed), also when the caller has
    switched gradients off."""
    with torch.no_grad():
        again = call.attack(call.images, call.features, call.ages, call.mask)
    result = call.result
    assert torch.equal(again.images, result.images), "a repeated call gives other images"
    assert torch.equal(again.adversarial_prediction, result.adversarial_prediction), "a repeat predicts otherwise"
    assert (again.forward, again.backward, again.steps) == (result.forward, result.backward, result.steps), \
        "a repeated call counts other passes"


def check_shares_clean_passes(call: ContractCall) -> None:
    """A call that shares its passes at the clean images (``shared``, a ``CleanPasses``) with a call on the same
    batch at another budget gives, bit for bit, what it gives alone, and takes at least one pass from the other
    (the clean prediction, or the gradient pass at the clean images). An attack whose call takes no ``shared``
    (a universal perturbation's) is not held to it."""
    attack = call.attack
    if "shared" not in inspect.signature(attack.__call__).parameters:
        return
    wider = type(attack)(call.model, **{**attack.params(), "budget": {**attack.budget.as_dict(),
                                                                        "epsilon": 2 * attack.budget.epsilon}})
    inputs = (call.images, call.features, call.ages, call.mask)
    shared = CleanPasses()
    wider(*inputs, shared=shared)
    result, alone = attack(*inputs, shared=shared), call.result
    for key in ("images", "features", "clean_prediction", "adversarial_prediction", "zero_gradient",
                "nonfinite_gradient"):
        mine, theirs = getattr(result, key), getattr(alone, key)
        assert (mine is None and theirs is None) or torch.equal(mine, theirs), \
            f"a call sharing clean passes with one at another budget differs from its call alone in {key}"
    assert (result.forward, result.backward, result.steps) == (alone.forward, alone.backward, alone.steps), \
        "a call sharing clean passes with one at another budget counts other passes than its call alone"
    assert shared.taken >= 1, "a call at another budget on the same batch took no pass from the first"


CALL_CHECKS: tuple[Callable[[ContractCall], None], ...] = (
    check_result_type, check_inputs_untouched, check_model_left_as_it_was, check_budget_holds, check_range_holds,
    check_mask_holds, check_moves, check_features_reported, check_predictions_are_the_models, check_never_worse,
    check_counters, check_repeatable, check_shares_clean_passes,
)


def check_params_rebuild(attack: str | type[Attack]) -> None:
    """``params()`` lists every constructor argument but the model (each defaulted), is JSON-native, and rebuilds
    the same attack: cell ids derive from it."""
    cls = attack_class(attack)
    built = cls(toy_model("cnn3d"))
    params = built.params()
    assert json.loads(json.dumps(params)) == params, "params() is not JSON-native"
    expected = set()
    for klass in cls.__mro__[:-1]:
        for parameter in inspect.signature(klass.__init__).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                assert parameter.name in ("self", "model") or parameter.default is not parameter.empty, \
                    f"argument {parameter.name!r} has no default"
                expected.add(parameter.name)
    assert set(params) == expected - {"self", "model"}, "params() does not list every argument"
    assert cls(toy_model("cnn3d"), **params).params() == params, "params() does not rebuild the attack"


def check_refuses_an_image_blind_model_under_fixed(attack: str | type[Attack]) -> None:
    """A model that ignores the image cannot be attacked through it while its features stay fixed: refused."""
    model = create_model("features_mlp", feature_names=FEATURE_NAMES)
    try:
        attack_class(attack)(model)
    except MedrobustError as error:
        assert "does not use the image" in str(error), str(error)
    else:
        raise AssertionError("an image attack on a model that ignores the image was accepted")


def assert_prediction_is_the_models(model: nn.Module, result: AttackResult) -> None:
    """The prediction an attack reports is the model's on the images AND features it returns."""
    with torch.no_grad():
        predicted = model(result.images, result.features)
    assert torch.allclose(result.adversarial_prediction, predicted, rtol=0, atol=1e-4), \
        "the prediction reported is not the model's on the images and features returned"


def assert_volumes_moved_within_budget(result: AttackResult, features: Tensor, feature_budget: float) -> None:
    """Under ``perturbed`` (``CONTEXT_FEATURE_NAMES``): sex and field strength stay, some volume moved, and none
    beyond ``feature_budget`` of its clean value."""
    change = result.features - features
    assert not change[:, :2].any(), "perturbed moved sex or field strength"
    assert change[:, 2:].abs().gt(0).any(), "perturbed moved no volume"
    assert (change.abs() <= feature_budget * features.abs() * (1 + 1e-6)).all(), "a volume moved beyond its budget"


def _context_attack(attack: str | type[Attack], threat_model: str) -> Attack:
    return attack_class(attack)(context_model(), budget=BUDGETS[attack_class(attack).norms[0]],
                                threat_model=threat_model, feature_budget=0.05, **quick_kwargs(attack))


def check_perturbed_moves_only_the_volumes_within_their_budget(attack: str | type[Attack]) -> None:
    """Under ``perturbed`` (for an attack that declares it): sex and field strength stay, the regional volumes
    move at most ``feature_budget`` of their value, and the prediction reported is the model's on the images and
    features returned."""
    if "perturbed" not in attack_class(attack).threat_models:
        return
    built = _context_attack(attack, "perturbed")
    images, features = context_batch()
    result = built(images, features)
    assert_volumes_moved_within_budget(result, features, 0.05)
    assert_prediction_is_the_models(built.model, result)


def check_recomputed_reports_the_features_measured_on_the_images(attack: str | type[Attack]) -> None:
    """Under ``recomputed`` (for an attack that declares it), with the soft volumes over the label maps and with a
    segmenter: the features returned are the extractor's on the images returned, and the prediction reported is
    the model's on both."""
    if "recomputed" not in attack_class(attack).threat_models:
        return
    images, features, labels = labelled_batch()
    for extractor in (soft_extractor(images, features, labels), segmenter_extractor(images, features)):
        built = _context_attack(attack, "recomputed")
        result = built(images, features, extractor=extractor)
        with torch.no_grad():
            measured = extractor(result.images)
        assert torch.allclose(result.features, measured, rtol=1e-5, atol=1e-5), \
            f"features not measured on the images ({type(extractor).__name__})"
        assert_prediction_is_the_models(built.model, result)


def check_declared_facts(attack: str | type[Attack]) -> None:
    """What the attack declares is of the vocabulary: its norms, threat models, role and scope, and its quick
    settings name arguments it takes."""
    cls = attack_class(attack)
    assert cls.norms and set(cls.norms) <= set(NORMS), f"norms {cls.norms!r} not among {NORMS}"
    assert "fixed" in cls.threat_models and set(cls.threat_models) <= set(THREAT_MODELS), \
        f"threat_models {cls.threat_models!r} must hold fixed and be among {THREAT_MODELS}"
    assert cls.role in ROLES, f"role {cls.role!r} not among {ROLES}"
    assert cls.scope in SCOPES, f"scope {cls.scope!r} not among {SCOPES}"
    unknown = set(cls.quick) - set(cls.argument_names())
    assert not unknown, f"quick names arguments the attack does not take: {sorted(unknown)}"


# The closed-form check (``check_reaches_linear_optimum``): per norm, a small and a large budget (the large one
# makes the intensity box bind on many voxels), and the fraction of the optimum every attack must reach.
OPTIMUM_BUDGETS = {"linf": (0.02, 0.3), "l2": (0.1, 2.0), "l0": (8, 40)}
OPTIMUM_FRACTION = {"linf": 0.99, "l2": 0.98, "l0": 0.95}
# A black-box attack searches at random without a gradient: at its default queries (square: 1000, for 216 voxels)
# it is held to less. Measured 2026-12-02: square reaches 0.99-1.0 under l-inf and 0.76-0.90 under l2.
BLACK_BOX_OPTIMUM_FRACTION = {"linf": 0.95, "l2": 0.7, "l0": 0.9}
OPTIMUM_FEATURES = ["sex", "vol_hippocampus", "vol_ventricles"]


def optimum_settings(attack: str | type[Attack]) -> Iterator[tuple[str, float, str, str]]:
    """(norm, epsilon, clip, threat model) of every closed-form case the attack is held to, per norm it declares:
    under ``fixed`` the large budget without and with the intensity box and the small one with it; under each
    other threat model it declares, the large budget with the box (the case where the box binds most). Without
    the box only where the attack can leave the clean range (not l0, whose voxels go to their image's range, nor
    an attack that declares itself ``bounded``). A baseline is held to none; a one-step attack, and one
    perturbation shared by a set, only where one step (one shared perturbation) can be optimal: l-inf, and l2
    without the box."""
    cls = attack_class(attack)
    if cls.role == "baseline":
        return
    for norm in cls.norms:
        small, large = OPTIMUM_BUDGETS[norm]
        cases = [(large, "image", threat_model) for threat_model in cls.threat_models] + [(small, "image", "fixed")]
        if norm != "l0" and not cls.bounded:
            cases.insert(0, (large, "none", "fixed"))
        for epsilon, clip, threat_model in cases:
            if norm == "l2" and clip == "image" and (cls.role == "one-step" or cls.scope == "set"):
                continue
            yield norm, epsilon, clip, threat_model


def optimum_fraction(attack: str | type[Attack], norm: str, epsilon: float, clip: str,
                     threat_model: str) -> Tensor:
    """Per image [B], the rise of the prediction the attack reached (objective ``older``, at its defaults) over
    the closed-form optimum (``medrobust.attacks.optima``), in float64 from the images and features returned. A
    linear image model under ``fixed``; a linear model of the image and ``OPTIMUM_FEATURES`` under ``perturbed``
    (the two volumes movable) and ``recomputed`` (through a linear extractor). An attack on a set is fitted on
    one batch and measured on another."""
    cls = attack_class(attack)
    images, _ = brain_batch((6, 6, 6), batch=3, seed=5)
    held_out, _ = brain_batch((6, 6, 6), batch=3, seed=6)
    features = torch.tensor([[1.0, 4.0, 30.0], [0.0, 3.5, 45.0], [1.0, 4.5, 20.0]], dtype=images.dtype)
    if threat_model == "fixed":
        model, features = LinearModel(images.shape[1:], seed=1), None
    else:
        model = optima.LinearContextModel(images.shape[1:], OPTIMUM_FEATURES, seed=1)
    budget = {"norm": norm, "epsilon": epsilon}
    built = cls(model, budget=budget, clip=clip, threat_model=threat_model)

    def extractor_for(batch: Tensor):
        return optima.LinearExtractor(batch, features, seed=2) if threat_model == "recomputed" else None

    if cls.scope == "set":
        built.fit([(images, features, None, None, extractor_for(images))])
        images = held_out
        result = built.apply(images, features, extractor=extractor_for(images))
    else:
        result = built(images, features, extractor=extractor_for(images))
    weight = model.weight.detach()
    if threat_model == "recomputed":
        weight = extractor_for(images).effective_weight(weight, model.feature_weight.detach())
    lower = upper = None
    if clip == "image":
        lower, upper = per_image(images, "amin"), per_image(images, "amax")
    radius = built.budget.radius(images)
    optimum = optima.image_optimum(norm, weight, images, radius, lower, upper)
    reached = ((result.images.double() - images.double()).flatten(1) * weight.double().flatten()).sum(dim=1)
    if threat_model == "perturbed":
        feature_weight = model.feature_weight.detach()
        movable = movable_features(model, features)
        optimum = optimum + optima.feature_optimum(feature_weight, features, built.feature_budget, movable)
        reached = reached + (result.features.double() - features.double()) @ feature_weight.double()
    return reached / optimum


def check_reaches_linear_optimum(attack: str | type[Attack]) -> None:
    """At its defaults, the attack reaches ``OPTIMUM_FRACTION`` of the closed-form optimum on linear models in
    every case of ``optimum_settings`` (l-inf 0.99, l2 0.98, l0 0.95; a black-box attack
    ``BLACK_BOX_OPTIMUM_FRACTION``), for every image."""
    required = BLACK_BOX_OPTIMUM_FRACTION if attack_class(attack).role == "black-box" else OPTIMUM_FRACTION
    for norm, epsilon, clip, threat_model in optimum_settings(attack):
        fraction = optimum_fraction(attack, norm, epsilon, clip, threat_model)
        assert (fraction >= required[norm]).all(), (
            f"reaches {fraction.min().item():.3f} of the linear model's optimum ({norm} epsilon {epsilon:g}, clip "
            f"{clip}, threat model {threat_model}); at least {required[norm]} is required")


CLASS_CHECKS: tuple[Callable[[str | type[Attack]], None], ...] = (
    check_declared_facts, check_params_rebuild, check_refuses_an_image_blind_model_under_fixed,
    check_perturbed_moves_only_the_volumes_within_their_budget,
    check_recomputed_reports_the_features_measured_on_the_images, check_reaches_linear_optimum,
)


def missing_package(attack: str | type[Attack]) -> str | None:
    """How to install the optional package an attack needs (a library backend), when it cannot be imported;
    None when the attack can run here."""
    import importlib.util

    cls = attack_class(attack)
    package = getattr(cls, "package", "")
    if package and importlib.util.find_spec(package) is None:
        return f"needs {package}: {getattr(cls, 'install', '')}"
    return None


def contract_settings(attack: str | type[Attack], cases=MODEL_CASES, objectives=OBJECTIVES) -> Iterator[tuple]:
    """(norm, model case, objective) of every contract call that applies to the attack: each norm it declares."""
    for norm in attack_class(attack).norms:
        for case in cases:
            for objective in objectives:
                yield norm, case, objective


def check_attack(attack: str | type[Attack], device: str | torch.device = "cpu", cases=MODEL_CASES,
                 objectives=OBJECTIVES) -> None:
    """Every check on ``attack`` (a registered name or an Attack class); the first failure raises AssertionError
    saying which check and setting failed."""
    for check in CLASS_CHECKS:
        check(attack)
    for norm, case, objective in contract_settings(attack, cases, objectives):
        call = contract_call(attack, case, norm, objective, device)
        for check in CALL_CHECKS:
            try:
                check(call)
            except AssertionError as error:
                raise AssertionError(f"{check.__name__} ({norm}, {case}, {objective}): {error}") from None
