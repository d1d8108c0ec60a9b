"""The iterative attacks beyond the contract suite: bim, pgd's restarts and schedules, apgd and the noise baseline."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medrobust.attacks import create_attack, perturbation_norms
from medrobust.attacks.apgd import checkpoints, halve_step
from medrobust.attacks.base import AttackState
from medrobust.attacks.checks import (
    LinearModel,
    brain_batch,
    toy_inputs,
    toy_model,
)
from medrobust.errors import MedrobustError


class SmallNet(nn.Module):
    """A small nonlinear 2D regressor (ReLU then tanh), ages in tens of years."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(1000 + seed)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 1)

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        hidden = torch.tanh(self.conv2(torch.relu(self.conv(image)))).mean(dim=(2, 3))
        return 40.0 + 20.0 * self.head(hidden).squeeze(1)


def small_case(seed: int = 0) -> tuple[SmallNet, torch.Tensor]:
    """The model and 16 images [16, 1, 16, 16], neither drawn from the stream of an attack's seed 0 to 9 (a
    random start drawn from the images' own stream correlates with them)."""
    return SmallNet(seed), torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(2000 + seed))


# ---------------------------------------------------------------- bim


def test_bim_is_pgd_with_four_quarter_steps_from_the_clean_image_bit_for_bit() -> None:
    model = toy_model("cnn3d")
    images, _, _, mask = toy_inputs("cnn3d")
    budget = {"epsilon": 0.01}
    bim = create_attack("bim", model, budget=budget)(images, mask=mask)
    pgd = create_attack("pgd", model, budget=budget, steps=4, step_size=0.25, random_start=False)(images, mask=mask)
    assert torch.equal(bim.images, pgd.images)
    assert torch.equal(bim.adversarial_prediction, pgd.adversarial_prediction)
    # 4 steps and the final prediction: the clean prediction comes from the first step's pass at the clean image.
    assert (bim.forward, bim.backward, bim.steps) == (pgd.forward, pgd.backward, pgd.steps) == (5, 4, 4)


def test_bim_refuses_a_random_start_and_restarts() -> None:
    model = toy_model("conv2d")
    assert create_attack("bim", model).params()["random_start"] is False
    with pytest.raises(MedrobustError, match="bim never starts at random"):
        create_attack("bim", model, random_start=True)
    with pytest.raises(MedrobustError, match="needs random_start=True"):
        create_attack("bim", model, restarts=2)


# ---------------------------------------------------------------- pgd: restarts and schedules


def test_restarts_are_never_worse_than_one_restart_per_sample() -> None:
    model, images = small_case()
    kwargs = {"budget": {"norm": "l2", "epsilon": 1.0}, "steps": 3}
    one = create_attack("pgd", model, **kwargs)(images)
    three = create_attack("pgd", model, restarts=3, **kwargs)(images)
    assert (three.adversarial_prediction >= one.adversarial_prediction).all()
    assert (three.adversarial_prediction > one.adversarial_prediction).any(), "later restarts found nothing better"
    # 3 restarts of 3 steps, each restart's final iterate scored (the last one by the final prediction), clean.
    assert (three.forward, three.backward, three.steps) == (3 * 3 + 3 + 1, 9, 9)


def test_restarts_draw_new_starts_from_the_seeded_generator() -> None:
    model, images = small_case()
    attack = create_attack("pgd", model, steps=1, restarts=2, seed=5)
    assert torch.equal(attack(images).images, attack(images).images)
    assert not torch.equal(attack(images).images, create_attack("pgd", model, steps=1, restarts=2)(images).images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"restarts": 0}, "restarts must be an integer >= 1"),
        ({"restarts": 2, "random_start": False}, "needs random_start=True"),
        ({"restarts": 2, "keep_best": False}, "needs keep_best=True"),
        ({"schedule": "exponential"}, "schedule must be one of constant, cosine, linear"),
        ({"steps": 0}, "steps must be an integer >= 1"),
    ],
)
def test_pgd_refuses_bad_restarts_and_schedules(kwargs: dict, message: str) -> None:
    with pytest.raises(MedrobustError, match=message):
        create_attack("pgd", toy_model("conv2d"), **kwargs)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.2, 0.2, 0.2, 0.2]),
        ("linear", [0.2, 0.15, 0.1, 0.05]),
        ("cosine", [0.2 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]),
    ],
)
def test_schedules_give_the_expected_step_sizes(schedule: str, expected: list[float]) -> None:
    model, images = LinearModel((1, 6, 6, 6)), brain_batch((6, 6, 6))[0]
    attack = create_attack("pgd", model, budget={"epsilon": 0.1, "unit": "abs"}, steps=4, step_size=0.2,
                           random_start=False, schedule=schedule, clip="none")
    assert attack.step_fractions() == pytest.approx(expected, rel=1e-12)
    # A linear model: every step moves each voxel along sign(w) by its fraction of the radius, never clamped
    # (the fractions sum to less than 1), so the result is the schedule's sum.
    result = attack(images)
    moved = 0.1 * sum(expected) * model.weight.detach().sign().expand_as(images)
    assert torch.allclose(result.images - images, moved, atol=1e-6)


def test_decaying_schedules_end_with_a_small_positive_step() -> None:
    model = toy_model("conv2d")
    for schedule in ("linear", "cosine"):
        fractions = create_attack("pgd", model, steps=10, schedule=schedule).step_fractions()
        assert fractions[0] == 0.25 and 0 < fractions[-1] < 0.25 / 10 + 1e-12
        assert all(a > b for a, b in zip(fractions, fractions[1:], strict=False))


# ---------------------------------------------------------------- apgd


def test_apgd_checkpoints_are_the_papers() -> None:
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [] and checkpoints(3) == [1, 2]
    for steps in range(1, 60):
        points = checkpoints(steps)
        assert points == sorted(set(points)) and all(0 < point < steps for point in points)


def test_apgd_halving_rule() -> None:
    # Window of 4 iterations: halve below 3 rises; or, not halved last time, with no new best since.
    increases = torch.tensor([2.0, 3.0, 3.0, 3.0])
    best = torch.tensor([1.0, 1.0, 1.0, 2.0])
    best_at_last_check = torch.tensor([0.0, 0.0, 1.0, 1.0])
    halved = torch.tensor([False, False, False, False])
    assert halve_step(increases, 4, best, best_at_last_check, halved).tolist() == [True, False, True, False]
    halved = torch.tensor([True, True, True, True])
    assert halve_step(increases, 4, best, best_at_last_check, halved).tolist() == [True, False, False, False]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_halves_its_step_size_and_leaves_no_hook_on_the_model(norm: str) -> None:
    model, images = small_case()
    attack = create_attack("apgd", model, budget={"norm": norm, "epsilon": 0.05 if norm == "linf" else 1.0},
                           steps=20)
    with torch.enable_grad():
        _, step = attack.search(AttackState(attack, images, None, None, None))
    halvings = torch.log2(2.0 / step)
    assert torch.equal(halvings, halvings.round()) and (halvings >= 0).all()
    assert (halvings > 0).any(), "no sample ever halved its step size"
    assert int(halvings.max()) <= len(checkpoints(20))
    assert not model._forward_hooks


@pytest.mark.parametrize(("norm", "epsilon"), [("linf", 0.1), ("l2", 1.0)])
def test_apgd_is_at_least_as_strong_as_pgd_with_equal_steps_on_average(norm: str, epsilon: float) -> None:
    # 30 steps: at 10 the checkpoints come every step or two and l-inf apgd trails pgd slightly on this model.
    budget = {"norm": norm, "epsilon": epsilon}
    apgd_gain = pgd_gain = 0.0
    for seed in range(3):
        model, images = small_case(seed)
        apgd = create_attack("apgd", model, budget=budget, steps=30)(images)
        pgd = create_attack("pgd", model, budget=budget, steps=30)(images)
        assert apgd.backward == pgd.backward == 30
        apgd_gain += float((apgd.adversarial_prediction - apgd.clean_prediction).mean())
        pgd_gain += float((pgd.adversarial_prediction - pgd.clean_prediction).mean())
    assert apgd_gain >= pgd_gain


def test_apgd_from_the_clean_image_on_a_linear_model_reaches_the_corner_at_once() -> None:
    model, images = LinearModel((1, 6, 6, 6)), brain_batch((6, 6, 6))[0]
    result = create_attack("apgd", model, budget={"epsilon": 0.1, "unit": "abs"}, steps=5, random_start=False,
                           clip="none")(images)
    assert torch.allclose(result.images - images, 0.1 * model.weight.detach().sign().expand_as(images), atol=1e-6)
    # 5 steps and the final prediction: the clean prediction comes from the first step's pass at the clean image.
    assert (result.forward, result.backward, result.steps) == (6, 5, 5)


# ---------------------------------------------------------------- noise


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_noise_has_exactly_the_budgets_norm_inside_the_mask(norm: str, distribution: str) -> None:
    images, mask = brain_batch((8, 8, 8))
    model = LinearModel(images.shape[1:])
    attack = create_attack("noise", model, budget={"norm": norm, "epsilon": 0.05}, distribution=distribution,
                           clip="none")
    result = attack(images, mask=mask)
    delta = result.images - images
    radius = attack.budget.radius(images)
    assert torch.allclose(perturbation_norms(delta)[norm], radius, rtol=1e-5, atol=0)
    assert not delta[~mask.expand_as(delta)].any()
    if (norm, distribution) == ("linf", "uniform"):
        # Every voxel of the mask moved by +-r.
        moved = delta.abs()[mask.expand_as(delta)].view(2, -1)
        assert torch.allclose(moved, radius[:, None].expand_as(moved), rtol=1e-5, atol=0)
    # One of each antithetic pair raises a linear model's prediction.
    assert (result.adversarial_prediction > result.clean_prediction).all()


def test_noise_is_seeded_and_clipping_can_shrink_it() -> None:
    images, mask = brain_batch((8, 8, 8))
    model = LinearModel(images.shape[1:])
    budget = {"epsilon": 0.05}
    first = create_attack("noise", model, budget=budget, seed=3)(images, mask=mask)
    assert torch.equal(first.images, create_attack("noise", model, budget=budget, seed=3)(images, mask=mask).images)
    assert not torch.equal(first.images, create_attack("noise", model, budget=budget, seed=4)(images, mask=mask).images)
    # The centre voxel sits at the range's top: clipping cancels a move up there.
    delta = (first.images - images).flatten(1)
    assert (delta[:, images[0].numel() // 2] <= 0).all()
    assert (perturbation_norms(delta)["l0"] < mask.sum()).any()


def test_noise_draws_keep_the_best_and_count_their_passes() -> None:
    model, images = small_case()
    one = create_attack("noise", model, budget={"epsilon": 0.05})(images)
    four = create_attack("noise", model, budget={"epsilon": 0.05}, draws=4)(images)
    assert (one.forward, one.backward, one.steps) == (4, 2, 2)
    assert (four.forward, four.backward, four.steps) == (10, 8, 8)
    # The first draw is the same in both, so the best of four is at least as good.
    assert (four.adversarial_prediction >= one.adversarial_prediction).all()


def test_noise_refuses_bad_arguments() -> None:
    model = toy_model("conv2d")
    with pytest.raises(MedrobustError, match="distribution must be one of uniform, gaussian"):
        create_attack("noise", model, distribution="laplace")
    with pytest.raises(MedrobustError, match="draws must be an integer >= 1"):
        create_attack("noise", model, draws=0)


def test_noise_leaves_an_image_with_an_empty_mask_alone_at_a_large_radius() -> None:
    images, mask = brain_batch((8, 8, 8))
    mask = mask.expand_as(images).clone()
    mask[1] = False
    result = create_attack("noise", LinearModel(images.shape[1:]), budget={"epsilon": 10.0, "unit": "abs"},
                           clip="none")(images, mask=mask)
    assert torch.isfinite(result.images).all()
    assert torch.equal(result.images[1], images[1]) and not torch.equal(result.images[0], images[0])
