"""Per-sample random streams: an image's random draws (random starts, noise) come from its own generator, seeded
from (the attack's seed, the image's sample seed), so that a result does not depend on how a set of images is cut
into batches. Also the clean pass shared with the first gradient step of attacks that start at the clean image."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import create_attack
from medrobust.attacks.base import AttackState
from medrobust.attacks.checks import (
    LinearModel,
    brain_batch,
    toy_inputs,
    toy_model,
)
from medrobust.errors import MedrobustError

SEEDS = [11, 2024, 7, 90001]


def split_run(attack, images: torch.Tensor, seeds: list[int], **kwargs):
    """The attack over the batch at once, and over its two halves with the same sample seeds."""
    whole = attack(images, sample_seeds=seeds, **kwargs)
    halves = [attack(images[rows], sample_seeds=seeds[rows], **kwargs) for rows in (slice(0, 2), slice(2, 4))]
    return whole, halves


def linear_batch() -> tuple[LinearModel, torch.Tensor]:
    """Four images and a linear model whose weights are all at least 0.5 away from 0: its gradient is the
    weight whatever the batch, so no gradient sign can flip with the batch's float rounding."""
    images, _ = brain_batch((6, 6, 6), batch=4)
    model = LinearModel(images.shape[1:])
    with torch.no_grad():
        model.weight.copy_(model.weight.sign() * (0.5 + model.weight.abs()))
    return model, images


def test_a_random_start_does_not_depend_on_the_batch() -> None:
    model, images = linear_batch()
    # One quarter step from the random start: the result is the start moved by a known step, so the start
    # itself is compared, not a point every start converges to.
    attack = create_attack("pgd", model, budget={"epsilon": 0.05}, steps=1, keep_best=False, clip="none")
    whole, halves = split_run(attack, images, SEEDS)
    assert torch.equal(whole.images, torch.cat([half.images for half in halves]))
    assert not torch.equal(whole.images[0], whole.images[1] - images[1] + images[0]), "samples share a start"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_restarts_do_not_depend_on_the_batch(norm: str) -> None:
    model, images = linear_batch()
    budget = {"norm": norm, "epsilon": 0.05 if norm == "linf" else 0.5}
    attack = create_attack("pgd", model, budget=budget, steps=1, restarts=3, clip="none")
    whole, halves = split_run(attack, images, SEEDS)
    assert torch.allclose(whole.images, torch.cat([half.images for half in halves]), rtol=0, atol=1e-6)


def test_a_nonlinear_model_gives_the_same_images_in_any_batch(one_cpu_thread) -> None:  # noqa: F811
    # Under l2 each step follows the normalized gradient, which moves continuously with float rounding (a sign
    # would flip where a gradient is ~0), so the batches agree to float tolerance and the comparison means
    # something: with other seeds the images differ by far more.
    model = toy_model("cnn3d")
    images = torch.cat([toy_inputs("cnn3d")[0], toy_inputs("cnn3d")[0].flip(-1)])
    attack = create_attack("pgd", model, budget={"norm": "l2", "epsilon": 0.5}, steps=3)
    whole, halves = split_run(attack, images, SEEDS)
    joined = torch.cat([half.images for half in halves])
    assert torch.allclose(whole.images, joined, rtol=0, atol=1e-5)
    other = attack(images, sample_seeds=[seed + 1 for seed in SEEDS])
    assert (other.images - whole.images).abs().amax() > 100 * (joined - whole.images).abs().amax()


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_noise_does_not_depend_on_the_batch(norm: str, distribution: str) -> None:
    model, images = linear_batch()
    budget = {"norm": norm, "epsilon": 0.05 if norm == "linf" else 0.5}
    attack = create_attack("noise", model, budget=budget, distribution=distribution, draws=2, keep_best=False)
    whole, halves = split_run(attack, images, SEEDS)
    assert torch.allclose(whole.images, torch.cat([half.images for half in halves]), rtol=0, atol=1e-6)


def test_a_samples_draws_depend_on_its_own_seed_and_the_attacks_seed_only() -> None:
    model, images = linear_batch()
    attack = create_attack("pgd", model, budget={"epsilon": 0.05}, steps=1, keep_best=False, clip="none")
    reference = attack(images, sample_seeds=SEEDS).images
    changed = attack(images, sample_seeds=SEEDS[:3] + [SEEDS[3] + 1]).images
    assert torch.equal(changed[:3], reference[:3])
    assert not torch.equal(changed[3], reference[3])
    # Permuting the images with their seeds permutes the results.
    order = [2, 0, 3, 1]
    permuted = attack(images[order], sample_seeds=[SEEDS[i] for i in order]).images
    assert torch.equal(permuted, reference[order])
    # Another attack seed: other draws for every sample.
    reseeded = create_attack("pgd", model, budget={"epsilon": 0.05}, steps=1, keep_best=False, clip="none",
                             seed=1)(images, sample_seeds=SEEDS).images
    assert all(not torch.equal(reseeded[i], reference[i]) for i in range(4))


def test_without_sample_seeds_the_positions_in_the_batch_seed_the_draws() -> None:
    model, images = linear_batch()
    attack = create_attack("noise", model, budget={"epsilon": 0.05}, keep_best=False, clip="none")
    default = attack(images).images
    assert torch.equal(default, attack(images).images)
    assert torch.equal(default, attack(images, sample_seeds=torch.arange(4)).images)
    # Without seeds, the second half of a split batch draws as the first half did (the same signs: each image
    # has its own radius): the default is per position.
    assert torch.equal((attack(images[2:]).images - images[2:]).sign(), (default - images)[:2].sign())


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ([1, 2, 3], r"one integer >= 0 per image \(4 here\)"),
        ([1, 2, 3, -4], r"one integer >= 0 per image"),
        ([1, 2, 3, 4.5], r"one integer >= 0 per image"),
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), "one integer per image, got a tensor of dtype torch.float32"),
        (torch.ones(4, 1, dtype=torch.long), r"and shape \[4, 1\]"),
    ],
)
def test_bad_sample_seeds_are_refused(seeds, message: str) -> None:
    model, images = linear_batch()
    with pytest.raises(MedrobustError, match=message):
        create_attack("pgd", model)(images, sample_seeds=seeds)


def test_draws_of_one_sample_come_in_the_images_dtype_and_device() -> None:
    model, images = linear_batch()
    state = AttackState(create_attack("pgd", model), images.double(), None, None, None, sample_seeds=SEEDS)
    assert state.draw().dtype == torch.float64 and state.draw().shape == images.shape
    assert state.draw(torch.randn, per_voxel=False).shape == (4,)


# ---------------------------------------------------------------- the clean pass shared with the first step


@pytest.mark.parametrize("objective", ["older", "deviation", "error"])
@pytest.mark.parametrize("name", ["fgsm", "bim"])
def test_an_attack_from_the_clean_image_takes_its_clean_prediction_from_its_first_pass(name: str,
                                                                                        objective: str) -> None:
    model = toy_model("cnn3d")
    images, _, ages, mask = toy_inputs("cnn3d")
    attack = create_attack(name, model, objective=objective)
    assert attack.starts_clean
    result = attack(images, ages=ages, mask=mask)
    with torch.no_grad():
        clean = model(images)
    assert torch.equal(result.clean_prediction, clean)
    # One forward and backward pass per step, and the final prediction: no forward pass of its own.
    assert result.forward == result.backward + 1 == result.steps + 1
    assert not model._forward_hooks, "the attack left its hook on the model"
    # Bit for bit what the same attack gives when it spends a forward pass on the clean prediction.
    eager = type("Eager", (type(attack),), {"starts_clean": False})(model, objective=objective)
    reference = eager(images, ages=ages, mask=mask)
    assert torch.equal(result.images, reference.images)
    assert torch.equal(result.adversarial_prediction, reference.adversarial_prediction)
    assert reference.forward == result.forward + 1


def test_only_attacks_that_start_at_the_clean_image_share_its_pass() -> None:
    model = toy_model("cnn3d")
    assert not create_attack("pgd", model).starts_clean  # a random start
    assert create_attack("pgd", model, random_start=False).starts_clean
    assert not create_attack("noise", model).starts_clean


def test_the_hook_is_removed_when_an_attack_fails() -> None:
    model = toy_model("cnn3d")
    images, _, _, _ = toy_inputs("cnn3d")
    attack = create_attack("bim", model)

    def failing(state):
        raise RuntimeError("boom")

    attack.perturb = failing
    with pytest.raises(RuntimeError, match="boom"):
        attack(images)
    assert not model._forward_hooks
