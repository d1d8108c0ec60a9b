"""The closed-form optima of linear models (medrobust.attacks.optima) and the shipped check that holds every
attack to them."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import PGD, create_attack
from medrobust.attacks.checks import check_reaches_linear_optimum, optimum_fraction, optimum_settings
from medrobust.attacks.optima import image_optimum, l2_optimum, room


def small_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(1, 4, 5, generator=generator, dtype=torch.float64)
    images = torch.rand(2, 1, 4, 5, generator=generator, dtype=torch.float64) * 3
    lower, upper = images.flatten(1).amin(dim=1), images.flatten(1).amax(dim=1)
    return weight, images, lower, upper


def test_without_a_box_the_optima_are_the_dual_norms() -> None:
    weight, images, _, _ = small_problem()
    radius = torch.tensor([0.5, 2.0], dtype=torch.float64)
    w = weight.flatten()
    assert torch.allclose(image_optimum("linf", weight, images, radius), radius * w.abs().sum())
    assert torch.allclose(image_optimum("l2", weight, images, radius), radius * w.norm())


def test_the_l2_water_filling_beats_every_feasible_move_and_is_reached() -> None:
    weight, images, lower, upper = small_problem(1)
    radius = torch.tensor([0.7, 1.5], dtype=torch.float64)
    moves = room(weight, images, lower, upper)
    optimum = l2_optimum(weight, radius, moves)
    generator = torch.Generator().manual_seed(2)
    # 20 000 random moves along sign(w), each within its room and scaled into the ball: none beats the optimum.
    fractions = torch.rand(20000, *moves.shape, generator=generator, dtype=torch.float64)
    candidate = fractions * moves
    candidate = candidate * (radius.view(1, -1) / candidate.norm(dim=2)).clamp(max=1).unsqueeze(2)
    values = (candidate * weight.flatten().abs()).sum(dim=2)
    assert (values <= optimum + 1e-9).all()
    assert (values.amax(dim=0) > 0.8 * optimum).all(), "the random moves are not a meaningful comparison"
    # A ball so large that every voxel reaches its bound: the optimum is the box's.
    assert torch.allclose(l2_optimum(weight, radius * 100, moves), (weight.flatten().abs() * moves).sum(dim=1))


def test_the_l0_optimum_takes_the_largest_gains_not_the_largest_gradients() -> None:
    weight = torch.tensor([[[3.0, 1.0, 1.0]]], dtype=torch.float64)
    images = torch.tensor([[[[9.0, 0.0, 1.0]]]], dtype=torch.float64)  # the big weight's voxel is at its max
    gain = image_optimum("l0", weight, images, torch.tensor([1.0]), images.amin().view(1), images.amax().view(1))
    assert gain.item() == pytest.approx(9.0)  # the second voxel, moved 0 -> 9


def test_gain_ranking_reaches_the_l0_optimum_where_the_papers_gradient_ranking_does_not() -> None:
    from medrobust.attacks.checks import LinearModel

    model = LinearModel((1, 1, 3))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[[3.0, 1.0, 1.0]]]))
    images = torch.tensor([[[[9.0, 0.0, 1.0]]]])
    budget = {"norm": "l0", "epsilon": 1}
    gain = create_attack("l0", model, budget=budget)(images)
    paper = create_attack("l0", model, budget=budget, ranking="gradient", max_failures=1)(images)
    assert (gain.adversarial_prediction - gain.clean_prediction).item() == pytest.approx(9.0)
    assert (paper.adversarial_prediction - paper.clean_prediction).item() < 9.0


def test_a_weak_attack_fails_the_closed_form_check_and_says_where() -> None:
    class TwoStepPGD(PGD):
        def __init__(self, model, *args, steps: int = 2, **kwargs) -> None:
            super().__init__(model, *args, steps=steps, **kwargs)

    with pytest.raises(AssertionError, match=r"reaches 0\.\d+ of the linear model's optimum \(linf epsilon 0.3"):
        check_reaches_linear_optimum(TwoStepPGD)


def test_the_cases_follow_what_an_attack_declares() -> None:
    assert list(optimum_settings("noise")) == []  # a baseline is held to nothing
    fgsm = set(optimum_settings("fgsm"))
    assert ("l2", 2.0, "none", "fixed") in fgsm and not any(n == "l2" and c == "image" for n, _, c, _ in fgsm)
    assert not any(clip == "none" for _, _, clip, _ in optimum_settings("cw"))  # its tanh box keeps the range
    assert {threat for *_, threat in optimum_settings("apgd")} == {"fixed", "perturbed", "recomputed"}


def test_universal_is_measured_on_held_out_images() -> None:
    fraction = optimum_fraction("universal", "linf", 0.3, "image", "perturbed")
    assert fraction.shape == (3,) and (fraction > 0.99).all()
