"""Shared attack contract suite (every registered attack), budgets, objectives, registry and the attacks' maths."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math

import pytest
import torch
from torch import nn

from medrobust.attacks import (
    NORMS,
    OBJECTIVES,
    THREAT_MODELS,
    UNITS,
    Attack,
    AttackResult,
    Budget,
    attack_entrypoint,
    create_attack,
    list_attacks,
    perturbation_norms,
    register_attack,
)
from medrobust.attacks.objectives import objective_score
from medrobust.attacks.pgd import PGD
from medrobust.errors import MedrobustError
from medrobust.models import create_model

# Five pools take 32 to 1 per side: the smallest grid the paper's trunk accepts; few filters keep it fast.
GRID = (32, 32, 32)
TINY = {"input_shape": GRID, "voxel_size": (6, 6, 6), "filters": (2, 4, 4, 4, 4), "dense": (8,)}
FEATURE_NAMES = ["sex", "vol_hippocampus_l", "vol_ventricles"]
FEATURE_MEAN = [0.5, 4.0, 30.0]
FEATURE_STD = [0.5, 0.5, 12.0]
AGES = [25.0, 71.0]
TARGET_AGE = 30.0
# Budgets in the paper's unit (fraction of each image's range, here 9): big enough to move a tiny model.
BUDGETS = {"linf": {"norm": "linf", "epsilon": 0.02}, "l2": {"norm": "l2", "epsilon": 0.5}}
BUDGETS["l0"] = {"norm": "l0", "epsilon": 8}  # voxels
MODEL_CASES = ["cnn3d", "hybrid_e2e", "conv2d"]
def _available(name: str):
    """The attack's name, skipped with its install line where it needs an optional package that is missing."""
    entry = attack_entrypoint(name)
    package = getattr(entry, "package", "")
    missing = bool(package) and importlib.util.find_spec(package) is None
    reason = f"needs {package}: {getattr(entry, 'install', '')}"
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=reason))


ALL_ATTACKS = [_available(name) for name in list_attacks()]
ATTACK_NORMS = [pytest.param(p.values[0], norm, marks=p.marks) for p in ALL_ATTACKS
                for norm in attack_entrypoint(p.values[0]).norms]


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tensors here are tiny: a second thread saves nothing, and when another process loads the CPU, OpenMP's
    spin-waiting made this file 25 times slower (130 s instead of 5 s on the 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyConv2d(nn.Module):
    """A 2D model with the contract's forward signature and no ``meta`` (so attacks treat it as an image
    model); it records its training flag at each forward, to show that attacks run it in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4, 1)
        self.seen_training: list[bool] = []

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        self.seen_training.append(self.training)
        hidden = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return 40.0 + 20.0 * self.head(hidden).squeeze(1)


class LinearModel(nn.Module):
    """age = 40 + sum(w * image): every attack step has a closed form."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return 40.0 + (image * self.weight).flatten(1).sum(dim=1)


def build(case: str) -> nn.Module:
    """A tiny randomly initialized model with a non-trivial output scale (ages in tens of years)."""
    torch.manual_seed(0)
    if case == "conv2d":
        return TinyConv2d()
    kwargs = dict(TINY, feature_names=FEATURE_NAMES) if case == "hybrid_e2e" else dict(TINY)
    model = create_model(case, **kwargs)
    model.set_target_scaling(40.0, 20.0)
    if model.meta.uses_features:
        model.set_feature_scaling(FEATURE_MEAN, FEATURE_STD)
    return model


def brain_batch(spatial: tuple[int, ...], batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-scored-like images [B, 1, *spatial] from -2 (background) to 7 and an ellipsoid brain mask
    [1, 1, *spatial]."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in spatial], indexing="ij")
    mask = (sum((axis / 0.8) ** 2 for axis in axes) < 1)[None, None]
    inside = (1.0 + 1.5 * torch.randn(batch, 1, *spatial, generator=generator)).clamp(-2.0, 7.0)
    images = torch.where(mask, inside, torch.full_like(inside, -2.0))
    images.view(batch, -1)[:, images[0].numel() // 2] = 7.0  # the centre: inside the mask, the range's top
    return images, mask


def inputs(case: str, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    images, mask = brain_batch((16, 16) if case == "conv2d" else GRID)
    features = None
    if case == "hybrid_e2e":
        z = torch.randn(images.shape[0], len(FEATURE_NAMES), generator=torch.Generator().manual_seed(3))
        features = (z * torch.tensor(FEATURE_STD) + torch.tensor(FEATURE_MEAN)).to(device)
    return images.to(device), features, torch.tensor(AGES, device=device), mask.to(device)


# Quick settings of an attack for the contract suite, where its defaults would make the suite slow (an attack
# with a ``steps`` argument gets 3 steps unless listed here).
CONTRACT_SETTINGS: dict[str, dict] = {
    "cw": {"iterations": 3, "search_steps": 2},
    "l0": {"max_failures": 4, "rerank_every": 4},
}


def contract_attack(name: str, model: nn.Module, norm: str, objective: str) -> Attack:
    """The attack with the contract's budget and objective, and its quick settings."""
    kwargs = {"budget": BUDGETS[norm], "objective": objective}
    if objective == "target":
        kwargs["target_age"] = TARGET_AGE
    if "steps" in create_attack(name, model).params():
        kwargs["steps"] = 3
    kwargs.update(CONTRACT_SETTINGS.get(name, {}))
    return create_attack(name, model, **kwargs)


def per_image(images: torch.Tensor, reduce: str) -> torch.Tensor:
    return getattr(images.flatten(1), reduce)(dim=1)


def check_contract(name: str, case: str, norm: str, objective: str, device: str) -> None:
    """What every attack must do for every model kind, budget norm and objective."""
    model = build(case).to(device)
    images, features, ages, mask = inputs(case, device)
    attack = contract_attack(name, model, norm, objective)
    parameters = list(model.parameters())
    parameters[0].requires_grad_(False)  # a mixed set of flags, to see each one restored
    flags = [p.requires_grad for p in parameters]
    model.train()
    clean_images = images.clone()
    clean_features = None if features is None else features.clone()
    if isinstance(model, TinyConv2d):
        model.seen_training.clear()

    result = attack(images, features, ages, mask)

    assert isinstance(result, AttackResult)
    assert result.images.shape == images.shape
    assert result.images.dtype == images.dtype and result.images.device == images.device
    assert not result.images.requires_grad
    assert torch.equal(images, clean_images)
    # Parameters frozen: no parameter gradient computed, flags and train mode restored.
    assert all(p.grad is None for p in parameters)
    assert [p.requires_grad for p in parameters] == flags
    assert all(module.training for module in model.modules())
    if isinstance(model, TinyConv2d):
        assert model.seen_training and not any(model.seen_training)
    # Budget, intensity range and mask.
    delta = result.images - images
    radius = attack.budget.radius(images)
    assert (perturbation_norms(delta)[norm] <= radius * (1 + 1e-6)).all()
    assert (per_image(result.images, "amin") >= per_image(images, "amin")).all()
    assert (per_image(result.images, "amax") <= per_image(images, "amax")).all()
    assert not delta[~mask.expand_as(delta)].any()
    assert delta.any(), "the attack did not move any voxel"
    # Features untouched and reported.
    if features is None:
        assert result.features is None
    else:
        assert torch.equal(features, clean_features) and torch.equal(result.features, clean_features)
    # Predictions are the model's, and the objective is never worse than the clean input's.
    model.eval()
    with torch.no_grad():
        clean = model(images, features)
        adversarial = model(result.images, features)
    assert torch.allclose(result.clean_prediction, clean, rtol=0, atol=1e-4)
    assert torch.allclose(result.adversarial_prediction, adversarial, rtol=0, atol=1e-4)
    score = objective_score(objective, adversarial, clean, ages, TARGET_AGE)
    clean_score = objective_score(objective, clean, clean, ages, TARGET_AGE)
    assert (score >= clean_score - 1e-4).all()
    # Counters are python ints.
    for count in (result.forward, result.backward, result.steps):
        assert type(count) is int and count > 0
    # Deterministic under the seed, also when the caller has switched gradients off.
    with torch.no_grad():
        again = attack(images, features, ages, mask)
    assert torch.equal(again.images, result.images)
    assert torch.equal(again.adversarial_prediction, result.adversarial_prediction)
    assert (again.forward, again.backward, again.steps) == (result.forward, result.backward, result.steps)


def test_builtins_are_registered() -> None:
    assert {"fgsm", "pgd"} <= set(list_attacks())
    assert list_attacks("pg*") == ["pgd"]
    assert attack_entrypoint("pgd") is PGD
    assert NORMS == ("linf", "l2", "l0") and UNITS == ("abs", "range", "std")
    assert OBJECTIVES == ("older", "younger", "deviation", "target", "error")
    assert THREAT_MODELS == ("fixed", "perturbed", "recomputed")


# ---------------------------------------------------------------- contract suite: every registered attack


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize(("name", "norm"), ATTACK_NORMS)
def test_contract(name: str, norm: str, case: str, objective: str) -> None:
    check_contract(name, case, norm, objective, "cpu")


@pytest.fixture
def deterministic_cudnn():
    """Bit-identical repeats on CUDA also need deterministic kernels: cuDNN's default conv3d backward is not
    (seen on an H100: l2 steps, which use the gradient's values and not only its sign, differed)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("objective", ["older", "deviation"])
@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize(("name", "norm"), ATTACK_NORMS)
def test_contract_on_cuda(name: str, norm: str, case: str, objective: str, deterministic_cudnn) -> None:
    check_contract(name, case, norm, objective, "cuda")


# Float rounding of x + delta concerns the norms with a real-valued radius; an l0 budget counts voxels (and at
# epsilon 1e-3 it would be zero voxels, a case that passes whatever the attack does).
@pytest.mark.parametrize(("name", "norm"), [p for p in ATTACK_NORMS if p.values[1] != "l0"])
def test_the_realized_perturbation_stays_in_budget_at_the_papers_epsilon(name: str, norm: str) -> None:
    # At 1e-3 of the range, float32 rounding of x + delta alone is ~1e-5 of the radius: the budget must hold
    # for the perturbation actually returned, not just for the delta before it was added.
    model = build("cnn3d")
    images, _, _, mask = inputs("cnn3d")
    attack = create_attack(name, model, budget={"norm": norm, "epsilon": 1e-3}, clip="none",
                           **CONTRACT_SETTINGS.get(name, {}))
    result = attack(images, mask=mask)
    realized = perturbation_norms(result.images - images)[norm]
    radius = attack.budget.radius(images)
    assert (realized <= radius * (1 + 1e-6)).all()
    assert (realized >= radius * (1 - 1e-3)).all()


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_params_are_complete_json_and_rebuild_the_attack(name: str) -> None:
    model = build("cnn3d")
    attack = create_attack(name, model)
    params = attack.params()
    assert json.loads(json.dumps(params)) == params
    expected = set()
    for cls in type(attack).__mro__[:-1]:
        for parameter in inspect.signature(cls.__init__).parameters.values():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                # Every argument but the model is defaulted.
                assert parameter.name in ("self", "model") or parameter.default is not parameter.empty
                expected.add(parameter.name)
    assert set(params) == expected - {"self", "model"}
    # The base's default budget, or an l0 attack's own (the paper's smallest voxel count).
    default = {"linf": {"norm": "linf", "epsilon": 1e-3, "unit": "range"}, "l0": {"norm": "l0", "epsilon": 360.0,
                                                                                 "unit": "abs"}}
    assert params["budget"] == default[attack.norms[0]]
    assert create_attack(name, model, **params).params() == params


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_a_model_that_ignores_the_image_cannot_be_attacked_under_fixed(name: str) -> None:
    model = create_model("features_mlp", feature_names=FEATURE_NAMES)
    with pytest.raises(MedrobustError, match="does not use the image"):
        create_attack(name, model)


# ---------------------------------------------------------------- registry and validation


def test_unknown_attack_lists_the_known_names() -> None:
    with pytest.raises(MedrobustError, match="carlini_nonexistent") as info:
        create_attack("carlini_nonexistent", build("conv2d"))
    for name in list_attacks():
        assert name in str(info.value)


def test_registering_a_taken_name_is_refused() -> None:
    class Impostor(Attack):
        name = "pgd"

    with pytest.raises(MedrobustError, match="'pgd' is already registered"):
        register_attack(Impostor)
    assert attack_entrypoint("pgd") is PGD


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"norm": "l1"}, "norm"),
        ({"norm": "l0", "unit": "range"}, "unit"),
        ({"norm": "L2"}, "norm"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": True}, "epsilon"),
        ({"epsilon": "0.1"}, "epsilon"),
        ({"unit": "percent"}, "unit"),
    ],
)
def test_bad_budgets_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(MedrobustError, match=f"budget {field}") as info:
        Budget(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_budget_round_trips_through_a_dict_and_attacks_take_either() -> None:
    budget = Budget("l2", 0.5, "std")
    assert budget.as_dict() == {"norm": "l2", "epsilon": 0.5, "unit": "std"}
    assert Budget(**budget.as_dict()) == budget
    model = build("conv2d")
    assert create_attack("fgsm", model, budget=budget.as_dict()).budget == budget
    assert create_attack("fgsm", model, budget=budget).budget == budget
    assert create_attack("fgsm", model).budget == Budget()
    with pytest.raises(MedrobustError, match="budget has unknown keys"):
        create_attack("fgsm", model, budget={"norm": "linf", "eps": 0.1})
    with pytest.raises(MedrobustError, match="budget must be"):
        create_attack("fgsm", model, budget=0.1)


def test_radius_in_each_unit() -> None:
    images = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-2.0, 0.0, 0.0, 6.0]]).view(2, 1, 2, 2)
    assert torch.allclose(Budget("linf", 0.5, "abs").radius(images), torch.tensor([0.5, 0.5]))
    assert torch.allclose(Budget("linf", 0.5, "range").radius(images), torch.tensor([1.5, 4.0]))
    # Population std: sqrt(1.25) and sqrt((9 + 1 + 1 + 25) / 4) = 3.
    assert torch.allclose(Budget("linf", 0.5, "std").radius(images), torch.tensor([0.5 * math.sqrt(1.25), 1.5]))


def test_perturbation_norms_by_hand() -> None:
    delta = torch.tensor([[3.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 7 + [-0.5]]).view(2, 1, 2, 2, 2)
    norms = perturbation_norms(delta)
    assert set(norms) == {"linf", "l2", "l0"}
    assert torch.equal(norms["linf"], torch.tensor([4.0, 0.5]))
    assert torch.equal(norms["l2"], torch.tensor([5.0, 0.5]))
    assert torch.equal(norms["l0"], torch.tensor([2.0, 1.0]))
    assert torch.equal(perturbation_norms(delta.view(2, 1, 2, 4))["l2"], norms["l2"])  # 2D alike


class LinfOnly(Attack):
    name = "linf_only_test"
    norms = ("linf",)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"threat_model": "omniscient"}, ["threat_model", "'omniscient'"]),
        ({"objective": "sideways"}, ["objective", "'sideways'"]),
        ({"objective": "target"}, ["target_age"]),
        ({"objective": "target", "target_age": math.nan}, ["target_age", "nan"]),
        ({"objective": "older", "target_age": 30.0}, ["target_age"]),
        ({"clip": "range"}, ["clip", "'range'"]),
        ({"keep_best": "yes"}, ["keep_best"]),
        ({"seed": -1}, ["seed"]),
        ({"seed": 1.5}, ["seed"]),
        ({"steps": 0}, ["steps"]),
        ({"steps": 2.5}, ["steps"]),
        ({"steps": True}, ["steps"]),
        ({"step_size": 0.0}, ["step_size"]),
        ({"step_size": math.inf}, ["step_size"]),
        ({"random_start": 1}, ["random_start"]),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict, names: list[str]) -> None:
    with pytest.raises(MedrobustError) as info:
        PGD(build("conv2d"), **kwargs)
    for name in names:
        assert name in str(info.value)


def test_an_unsupported_norm_names_it() -> None:
    with pytest.raises(MedrobustError, match="supports budget norms linf, got 'l2'"):
        LinfOnly(build("conv2d"), budget={"norm": "l2"})
    with pytest.raises(MedrobustError, match="a torch.nn.Module model"):
        create_attack("fgsm", lambda image, features: image.sum())


def test_bad_call_inputs_name_what_is_wrong() -> None:
    model = build("conv2d")
    images, _, ages, mask = inputs("conv2d")
    attack = create_attack("fgsm", model, objective="error")
    with pytest.raises(MedrobustError, match="float tensor"):
        attack(images.long(), ages=ages)
    with pytest.raises(MedrobustError, match="NaN"):
        attack(torch.where(mask, images, torch.full_like(images, math.nan)), ages=ages)
    with pytest.raises(MedrobustError, match="mask of shape"):
        attack(images, ages=ages, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(MedrobustError, match=r"ages must hold one true age per image, shape \[2\]"):
        attack(images, ages=ages[:1])
    with pytest.raises(MedrobustError, match="needs ages"):
        attack(images)


# ---------------------------------------------------------------- objectives


# p = [30, 50], clean [30, 60], true ages [35, 50], target 45: each objective's value and gradient sign.
@pytest.mark.parametrize(
    ("objective", "value", "gradient"),
    [
        ("older", [30.0, 50.0], [1.0, 1.0]),
        ("younger", [-30.0, -50.0], [-1.0, -1.0]),
        ("deviation", [0.0, 10.0], [1.0, -1.0]),  # d == 0: gradient +1, so a first step moves
        ("target", [-15.0, -5.0], [1.0, -1.0]),
        ("error", [5.0, 0.0], [-1.0, 1.0]),  # d == 0: gradient +1
    ],
)
def test_objective_value_and_gradient(objective: str, value: list[float], gradient: list[float]) -> None:
    prediction = torch.tensor([30.0, 50.0], requires_grad=True)
    score = objective_score(objective, prediction, torch.tensor([30.0, 60.0]), torch.tensor([35.0, 50.0]), 45.0)
    assert torch.equal(score.detach(), torch.tensor(value))
    (grad,) = torch.autograd.grad(score.sum(), prediction)
    assert torch.equal(grad, torch.tensor(gradient))


def test_objectives_missing_their_input_raise() -> None:
    prediction = torch.tensor([30.0])
    with pytest.raises(MedrobustError, match="needs ages"):
        objective_score("error", prediction, prediction)
    with pytest.raises(MedrobustError, match="needs target_age"):
        objective_score("target", prediction, prediction)
    with pytest.raises(MedrobustError, match="objective must be one of"):
        objective_score("sideways", prediction, prediction)


# ---------------------------------------------------------------- the attacks' maths on closed forms


def linear_case(seed: int = 0) -> tuple[LinearModel, torch.Tensor]:
    images, _ = brain_batch((6, 6, 6), seed=seed)
    return LinearModel(images.shape[1:], seed=seed), images


def test_fgsm_linf_moves_every_voxel_by_the_radius_along_the_gradient_sign() -> None:
    model, images = linear_case()
    result = create_attack("fgsm", model, budget={"epsilon": 0.01}, clip="none")(images)
    radius = 0.01 * 9.0
    assert torch.allclose(result.images - images, radius * model.weight.detach().sign().expand_as(images), atol=1e-6)
    # One gradient pass at the clean image (which also gives the clean prediction) and the final prediction.
    assert (result.forward, result.backward, result.steps) == (2, 1, 1)


def test_fgm_l2_moves_along_the_normalized_gradient() -> None:
    model, images = linear_case()
    result = create_attack("fgsm", model, budget={"norm": "l2", "epsilon": 0.5, "unit": "abs"}, clip="none")(images)
    weight = model.weight.detach()
    assert torch.allclose(result.images - images, (0.5 * weight / weight.norm()).expand_as(images), atol=1e-6)


def test_pgd_paper_configuration_is_iterative_fgsm() -> None:
    model, images = linear_case()
    epsilon = 0.05
    attack = create_attack("pgd", model, budget={"epsilon": epsilon}, steps=4, step_size=0.25, random_start=False)
    result = attack(images)
    # Li et al. 2020: four steps of epsilon * R / 4 along the gradient sign, each clipped to the ball and range.
    low, high = per_image(images, "amin"), per_image(images, "amax")
    radius = (epsilon * (high - low)).view(-1, 1, 1, 1, 1)
    low, high = low.view(-1, 1, 1, 1, 1), high.view(-1, 1, 1, 1, 1)
    expected = images
    for _ in range(4):
        step = expected + radius / 4 * model.weight.detach().sign()
        expected = torch.minimum(torch.maximum(step, images - radius), images + radius).clamp(low, high)
    assert torch.allclose(result.images, expected, atol=1e-6)
    assert (result.images == high).any(), "the range clip should bind on some voxels of this case"
    assert (result.forward, result.backward, result.steps) == (5, 4, 4)  # the clean prediction from step 1


def test_pgd_keeps_the_best_iterate_when_the_target_is_overshot() -> None:
    model, images = linear_case()
    radius = 0.1
    weight = model.weight.detach()
    step = radius / 4 * weight.abs().sum()  # each iterative-FGSM step moves the prediction by this much
    clean = model(images).detach()
    # Target 1.4 steps above the first image: predictions 0, 1, 2, 1, 2 steps up; the best is 1 step up.
    target = float(clean[0] + 1.4 * step)
    kwargs = {"budget": {"epsilon": radius, "unit": "abs"}, "objective": "target", "target_age": target,
              "steps": 4, "random_start": False, "clip": "none"}
    last = create_attack("pgd", model, keep_best=False, **kwargs)(images[:1])
    best = create_attack("pgd", model, **kwargs)(images[:1])
    assert torch.allclose(last.images - images[:1], 2 * radius / 4 * weight.sign(), atol=1e-6)
    assert torch.allclose(best.images - images[:1], radius / 4 * weight.sign(), atol=1e-6)
    assert torch.allclose(best.adversarial_prediction, clean[:1] + step, atol=1e-3)
    assert last.forward == best.forward == 5


def test_pgd_scores_at_least_as_well_as_fgsm_on_a_nonlinear_model() -> None:
    model = build("cnn3d")
    images, _, _, mask = inputs("cnn3d")
    budget = {"epsilon": 0.01}
    fgsm = create_attack("fgsm", model, budget=budget)(images, mask=mask)
    pgd = create_attack("pgd", model, budget=budget, steps=8, random_start=False)(images, mask=mask)
    assert (pgd.adversarial_prediction >= fgsm.adversarial_prediction - 1e-4).all()
    assert (pgd.adversarial_prediction > pgd.clean_prediction).all()


def test_the_random_start_follows_the_seed_and_a_float_mask_acts_like_a_bool_one() -> None:
    model = build("conv2d")
    images, _, _, mask = inputs("conv2d")
    first = create_attack("pgd", model, steps=1, seed=0)(images, mask=mask)
    other = create_attack("pgd", model, steps=1, seed=1)(images, mask=mask)
    assert not torch.equal(first.images, other.images)
    as_float = create_attack("pgd", model, steps=1, seed=0)(images, mask=mask.float())
    assert torch.equal(as_float.images, first.images)
