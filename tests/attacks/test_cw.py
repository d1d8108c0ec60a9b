"""The Carlini-Wagner attack (``cw``): its binary search over c, tanh box, budget, cost and strength. The shared
contract suite in tests/attacks/test_attacks.py covers it too (``pytest tests/attacks/test_attacks.py -k cw``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medrobust.attacks.cw as cw_module
from medrobust.attacks import create_attack, perturbation_norms
from medrobust.attacks.checks import (
    LinearModel,
    toy_inputs,
    toy_model,
)
from medrobust.attacks.cw import CW, next_constant
from medrobust.errors import MedrobustError

RANGE = 9.0


def two_ranges(seed: int = 0) -> torch.Tensor:
    """Two 6^3 images [2, 1, 6, 6, 6]: uniform in [0, 9] (both bounds reached), and the same divided by 10, so
    that a budget in the unit ``range`` gives the second a radius ten times smaller."""
    image = RANGE * torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(seed))
    image.view(-1)[:2] = torch.tensor([0.0, RANGE])
    return torch.cat([image, image / 10])


def weak_linear_model(images: torch.Tensor, norm: float) -> LinearModel:
    """age = 40 + w . x with ||w|| = ``norm``, small enough that C&W's optimum stays well inside the tanh box."""
    model = LinearModel(images.shape[1:])
    with torch.no_grad():
        model.weight.mul_(norm / model.weight.norm())
    return model


def spy_on_the_search(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (c, success) of every binary-search update."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(constant, lower, upper, success):
        calls.append((constant.clone(), success.clone()))
        return next_constant(constant, lower, upper, success)

    monkeypatch.setattr(cw_module, "next_constant", spy)
    return calls


def test_next_constant_lowers_c_after_a_success_and_raises_it_after_a_failure() -> None:
    constant = torch.tensor([10.0, 10.0, 4.0, 4.0])
    lower = torch.tensor([0.0, 0.0, 2.0, 2.0])
    upper = torch.tensor([math.inf, math.inf, 8.0, 8.0])
    success = torch.tensor([True, False, True, False])
    constant, lower, upper = next_constant(constant, lower, upper, success)
    # No upper bound yet: a failure multiplies c by ten; otherwise c is the bracket's midpoint.
    assert torch.equal(constant, torch.tensor([5.0, 100.0, 3.0, 6.0]))
    assert torch.equal(lower, torch.tensor([0.0, 10.0, 2.0, 4.0]))
    assert torch.equal(upper, torch.tensor([10.0, math.inf, 4.0, 8.0]))


def test_each_sample_searches_its_own_c_toward_the_known_critical_value(monkeypatch: pytest.MonkeyPatch) -> None:
    # For age = 40 + w . x, the in-ball minimizer of ||d||^2 / R^2 - c * (age - clean) is d = c R^2 w / 2: it
    # ages the image by c R^2 ||w||^2 / 2, which reaches success_years s exactly at c* = 2 s / (R ||w||)^2.
    images = two_ranges()
    weight_norm, years = 0.157, 1.0
    model = weak_linear_model(images, weight_norm)
    critical = 2 * years / (RANGE * weight_norm) ** 2
    # Budget one range: the first image can gain R ||w|| = 1.41 years >= s; the second (range R / 10) only 0.14.
    calls = spy_on_the_search(monkeypatch)
    attack = create_attack("cw", model, budget={"norm": "l2", "epsilon": 1.0}, iterations=100, search_steps=8,
                           success_years=years)
    result = attack(images)

    constants = torch.stack([constant for constant, _ in calls])
    successes = torch.stack([success for _, success in calls])
    assert len(calls) == 8 and constants[0].tolist() == [10.0, 10.0]
    # The second image never succeeds: its c is raised tenfold at every step.
    assert not successes[:, 1].any()
    assert torch.allclose(constants[:, 1], 10.0 ** torch.arange(1, 9, dtype=constants.dtype))
    # The first succeeds at c = 10, c is lowered, and the search closes in on c* from both sides.
    assert successes[0, 0]
    lowest_success = constants[successes[:, 0], 0].min()
    highest_failure = constants[~successes[:, 0], 0].max()
    assert 0.9 * critical <= highest_failure < lowest_success <= 1.1 * critical
    gain = result.adversarial_prediction - result.clean_prediction
    assert gain[0] >= years and 0 < gain[1] <= RANGE / 10 * weight_norm + 1e-4


def test_target_succeeds_within_success_years_of_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    images = two_ranges()
    model = weak_linear_model(images, 0.157)
    clean = model(images).detach()
    target = float(clean[0]) - 1.3  # within reach of the first image (1.41 years), not of the second
    assert (clean[1] - target).abs() > 0.2 + RANGE / 10 * 0.157
    calls = spy_on_the_search(monkeypatch)
    attack = create_attack("cw", model, budget={"norm": "l2", "epsilon": 1.0}, objective="target",
                           target_age=target, iterations=100, search_steps=1, success_years=0.2)
    result = attack(images)
    assert calls[0][1].tolist() == [True, False]
    assert (result.adversarial_prediction[0] - target).abs() <= 0.2


@pytest.mark.parametrize("epsilon", [0.05, 5.0])
def test_the_result_is_in_budget_and_in_the_clean_range_without_clipping(epsilon: float) -> None:
    # A steep model pushes every voxel toward a bound; with clip="none" only the tanh box keeps the images in their
    # clean range. At epsilon 0.05 the ball binds, at 5.0 (radius 5 R) the box does.
    images = two_ranges()
    model = weak_linear_model(images, 100.0)
    attack = create_attack("cw", model, budget={"norm": "l2", "epsilon": epsilon}, clip="none", iterations=30,
                           search_steps=2)
    result = attack(images)
    radius = attack.budget.radius(images)
    realized = perturbation_norms(result.images - images)["l2"]
    assert (realized <= radius * (1 + 1e-6)).all()
    flat, adversarial = images.flatten(1), result.images.flatten(1)
    assert (adversarial.amin(dim=1) >= flat.amin(dim=1)).all()
    assert (adversarial.amax(dim=1) <= flat.amax(dim=1)).all()
    if epsilon < 1:
        assert (realized >= radius * (1 - 1e-3)).all()
    else:
        assert (realized < radius / 2).all()


def test_repeats_are_identical_and_the_counters_are_one_pass_per_iteration() -> None:
    model = toy_model("conv2d")
    images, _, _, mask = toy_inputs("conv2d")
    attack = create_attack("cw", model, budget={"norm": "l2", "epsilon": 0.1}, iterations=7, search_steps=3)
    first, again = attack(images, mask=mask), attack(images, mask=mask)
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.adversarial_prediction, again.adversarial_prediction)
    assert not (first.images - images)[~mask.expand_as(images)].any()
    # 21 iterations of one forward and one backward pass each, plus the clean and the final prediction.
    assert (first.forward, first.backward, first.steps) == (23, 21, 21)


def _refuse(*args, **kwargs):
    raise RuntimeError("host synchronisation inside the attack loop")


def test_the_attack_loop_never_synchronises_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    original = CW.perturb

    def guarded(self, state):
        # Only around perturb: the base's input checks before it may synchronise.
        with pytest.MonkeyPatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                patch.setattr(torch.Tensor, name, _refuse)
            with pytest.raises(RuntimeError, match="host synchronisation"):
                bool(torch.ones(1))
            return original(self, state)

    monkeypatch.setattr(CW, "perturb", guarded)
    model = toy_model("conv2d")
    images, _, _, mask = toy_inputs("conv2d")
    for objective in ("older", "deviation"):
        result = create_attack("cw", model, budget={"norm": "l2", "epsilon": 0.1}, objective=objective,
                               iterations=3, search_steps=2)(images, mask=mask)
        assert result.steps == 6


def test_cw_scores_at_least_as_well_as_fgm_at_the_same_budget() -> None:
    model = toy_model("cnn3d")
    images, _, _, mask = toy_inputs("cnn3d")
    budget = {"norm": "l2", "epsilon": 0.5}
    fgm = create_attack("fgsm", model, budget=budget)(images, mask=mask)
    cw = create_attack("cw", model, budget=budget, iterations=40, search_steps=2)(images, mask=mask)
    assert cw.adversarial_prediction.mean() >= fgm.adversarial_prediction.mean()
    assert (cw.adversarial_prediction > cw.clean_prediction).all()


def test_presets_give_the_counts_and_explicit_counts_win() -> None:
    model = toy_model("conv2d")
    paper = create_attack("cw", model, budget={"norm": "l2"})
    assert (paper.iterations, paper.search_steps, paper.learning_rate, paper.initial_constant) == (400, 10, 0.01, 10.0)
    fast = create_attack("cw", model, budget={"norm": "l2"}, preset="fast")
    assert (fast.iterations, fast.search_steps) == (50, 4)
    mixed = create_attack("cw", model, budget={"norm": "l2"}, preset="fast", iterations=20)
    assert (mixed.iterations, mixed.search_steps) == (20, 4)
    assert create_attack("cw", model, **mixed.params()).params() == mixed.params()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"preset": "slow"}, "preset"),
        ({"iterations": 0}, "iterations"),
        ({"search_steps": 2.5}, "search_steps"),
        ({"learning_rate": -0.01}, "learning_rate"),
        ({"initial_constant": math.inf}, "initial_constant"),
        ({"success_years": math.nan}, "success_years"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict, field: str) -> None:
    with pytest.raises(MedrobustError, match=field):
        create_attack("cw", toy_model("conv2d"), **kwargs)


@pytest.mark.parametrize("threat_model", ["perturbed", "recomputed"])
def test_moving_features_costs_no_extra_model_pass(threat_model: str) -> None:
    from medrobust.attacks.extractors import SoftVolumes

    model = toy_model("hybrid_e2e")
    images, features, _, mask = toy_inputs("hybrid_e2e")
    labels = torch.zeros(images.shape, dtype=torch.int16)
    labels[:, :, 8:16], labels[:, :, 16:24] = 1, 2
    # sex stays; the hippocampus is region 1, the ventricles region 2.
    extractor = SoftVolumes(labels, [None, 1, 2], ["sex", "vol_hippocampus_l", "vol_ventricles"], images, features)
    attack = create_attack("cw", model, budget={"norm": "l2", "epsilon": 0.5}, threat_model=threat_model,
                           iterations=4, search_steps=2)
    result = attack(images, features, mask=mask, extractor=extractor if threat_model == "recomputed" else None)
    assert (result.forward, result.backward, result.steps) == (10, 8, 8)
    assert not torch.equal(result.features, features)
    assert torch.equal(result.features[:, 0], features[:, 0])


class _KernelCount(TorchDispatchMode):
    """Counts the ATen operators that compute (views and aliases left out), each one kernel on a GPU."""

    VIEWS = ("view", "detach", "unsqueeze", "expand", "alias", "profiler", "scalar_tensor")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not any(word in str(func) for word in self.VIEWS)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("norm", "most"), [("l2", 35), ("linf", 16)])
def test_an_iteration_adds_few_kernels_to_its_forward_and_backward_pass(norm: str, most: int) -> None:
    # On a GPU at the demo grid each elementwise kernel is a visible share of a 2 ms forward and backward pass,
    # so the iteration's bookkeeping (projection, chain rule, search, best iterate, Adam) is counted in kernels:
    # 33 (l2) and 15 (l-inf) today (19 and 12 of them on whole images), against 43 and 20 (26 and 17) before the
    # iteration was made lean.
    model = toy_model("cnn3d")
    images, _, _, _ = toy_inputs("cnn3d")

    def kernels(call) -> int:
        with _KernelCount() as counter:
            call()
        return counter.count

    def floor() -> None:
        leaf = images.clone().requires_grad_(True)
        torch.autograd.grad(model(leaf, None).sum(), leaf)

    model.requires_grad_(False)
    budget = {"norm": norm, "epsilon": 0.5 if norm == "l2" else 0.002}
    one, three = (create_attack("cw", model, budget=budget, iterations=n, search_steps=1) for n in (1, 3))
    per_iteration = (kernels(lambda: three(images)) - kernels(lambda: one(images))) / 2
    assert per_iteration - kernels(floor) <= most


@pytest.mark.parametrize("unit", ["range", "abs"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_an_image_of_one_intensity_stays_as_it_is(norm: str, unit: str) -> None:
    # Its range is 0: the tanh box has no room, and no factor of it may turn into 0 / 0.
    model = toy_model("conv2d")
    images, _, _, _ = toy_inputs("conv2d")
    images[1] = 3.0
    result = create_attack("cw", model, budget={"norm": norm, "epsilon": 0.1, "unit": unit}, iterations=3,
                           search_steps=2)(images)
    assert torch.isfinite(result.images).all() and torch.equal(result.images[1], images[1])
    assert not torch.equal(result.images[0], images[0])
