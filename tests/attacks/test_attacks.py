"""Shared attack contract suite (every registered attack), budgets, objectives, registry and the attacks' maths."""

from __future__ import annotations

import math

import pytest
import torch

from medrobust.attacks import (
    NORMS,
    OBJECTIVES,
    THREAT_MODELS,
    UNITS,
    Attack,
    Budget,
    attack_entrypoint,
    create_attack,
    list_attacks,
    perturbation_norms,
    register_attack,
)
from medrobust.attacks.checks import (
    CALL_CHECKS,
    CLASS_CHECKS,
    MODEL_CASES,
    LinearModel,
    contract_call,
    linear_set,
    missing_package,
    per_image,
    toy_inputs,
    toy_model,
)
from medrobust.attacks.objectives import objective_score
from medrobust.attacks.pgd import PGD
from medrobust.errors import MedrobustError


def _registered(name: str):
    """The attack's name, skipped with its install line where it needs an optional package that is missing."""
    reason = missing_package(name)
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


ATTACK_NORMS = [pytest.param(p.values[0], norm, marks=p.marks) for p in map(_registered, list_attacks())
                for norm in attack_entrypoint(p.values[0]).norms]


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
    # The shipped checks of medrobust.attacks.checks, which anyone writing an attack can run too.
    call = contract_call(name, case, norm, objective, "cpu")
    for check in CALL_CHECKS:
        check(call)


@pytest.mark.parametrize("check", CLASS_CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_class_contract(attack_name: str, check) -> None:
    check(attack_name)


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
    call = contract_call(name, case, norm, objective, "cuda")
    for check in CALL_CHECKS:
        check(call)


# Float rounding of x + delta concerns the norms with a real-valued radius; an l0 budget counts voxels (and at
# epsilon 1e-3 it would be zero voxels, a case that passes whatever the attack does).
@pytest.mark.parametrize(("name", "norm"), [p for p in ATTACK_NORMS if p.values[1] != "l0"])
def test_the_realized_perturbation_stays_in_budget_at_the_papers_epsilon(name: str, norm: str) -> None:
    # At 1e-3 of the range, float32 rounding of x + delta alone is ~1e-5 of the radius: the budget must hold
    # for the perturbation actually returned, not just for the delta before it was added.
    model = toy_model("cnn3d")
    images, _, _, mask = toy_inputs("cnn3d")
    attack = create_attack(name, model, budget={"norm": norm, "epsilon": 1e-3}, clip="none",
                           **attack_entrypoint(name).quick)
    result = attack(images, mask=mask)
    realized = perturbation_norms(result.images - images)[norm]
    radius = attack.budget.radius(images)
    assert (realized <= radius * (1 + 1e-6)).all()
    # A black-box search keeps the clean image where no query beat it (its quick settings are 20 queries).
    full = realized >= radius * (1 - 1e-3)
    assert (full | (realized == 0) if attack.role == "black-box" else full).all()


def test_the_default_budget_is_the_bases_or_an_l0_attacks_own(attack_name: str) -> None:
    # The base's default budget, or an l0 attack's own (the paper's smallest voxel count); that params()
    # rebuilds the attack is the shipped check_params_rebuild.
    attack = create_attack(attack_name, toy_model("cnn3d"))
    default = {"linf": {"norm": "linf", "epsilon": 1e-3, "unit": "range"}, "l0": {"norm": "l0", "epsilon": 360.0,
                                                                                 "unit": "abs"}}
    assert attack.params()["budget"] == default[attack.norms[0]]


# ---------------------------------------------------------------- registry and validation


def test_unknown_attack_lists_the_known_names() -> None:
    with pytest.raises(MedrobustError, match="carlini_nonexistent") as info:
        create_attack("carlini_nonexistent", toy_model("conv2d"))
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
    model = toy_model("conv2d")
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
        PGD(toy_model("conv2d"), **kwargs)
    for name in names:
        assert name in str(info.value)


def test_an_unsupported_norm_names_it() -> None:
    with pytest.raises(MedrobustError, match="supports budget norms linf, got 'l2'"):
        LinfOnly(toy_model("conv2d"), budget={"norm": "l2"})
    with pytest.raises(MedrobustError, match="a torch.nn.Module model"):
        create_attack("fgsm", lambda image, features: image.sum())


def test_bad_call_inputs_name_what_is_wrong() -> None:
    model = toy_model("conv2d")
    images, _, ages, mask = toy_inputs("conv2d")
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
    model, images, _ = linear_set(batch=2, seed=seed)
    return model, images


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
    model = toy_model("cnn3d")
    images, _, _, mask = toy_inputs("cnn3d")
    budget = {"epsilon": 0.01}
    fgsm = create_attack("fgsm", model, budget=budget)(images, mask=mask)
    pgd = create_attack("pgd", model, budget=budget, steps=8, random_start=False)(images, mask=mask)
    assert (pgd.adversarial_prediction >= fgsm.adversarial_prediction - 1e-4).all()
    assert (pgd.adversarial_prediction > pgd.clean_prediction).all()


def test_the_random_start_follows_the_seed_and_a_float_mask_acts_like_a_bool_one() -> None:
    model = toy_model("conv2d")
    images, _, _, mask = toy_inputs("conv2d")
    first = create_attack("pgd", model, steps=1, seed=0)(images, mask=mask)
    other = create_attack("pgd", model, steps=1, seed=1)(images, mask=mask)
    assert not torch.equal(first.images, other.images)
    as_float = create_attack("pgd", model, steps=1, seed=0)(images, mask=mask.float())
    assert torch.equal(as_float.images, first.images)


def test_an_attack_declaring_facts_outside_the_vocabulary_fails_the_shipped_checks() -> None:
    from medrobust.attacks.checks import check_declared_facts

    class Boasting(PGD):
        role = "strongest"

    class Misquick(PGD):
        quick = {"iterations": 3}

    with pytest.raises(AssertionError, match="role 'strongest' not among"):
        check_declared_facts(Boasting)
    with pytest.raises(AssertionError, match="quick names arguments the attack does not take"):
        check_declared_facts(Misquick)
    check_declared_facts(PGD)
