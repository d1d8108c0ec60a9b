"""The universal attack (one perturbation shared by a set, fitted over mini-batches) and the greedy l0 attack."""

from __future__ import annotations

import pytest
import torch
from test_attacks import GRID, LinearModel, brain_batch, build, one_cpu_thread, per_image  # noqa: F401

from medrobust.attacks import Budget, create_attack, perturbation_norms
from medrobust.errors import MedrobustError

# ---------------------------------------------------------------- universal


def linear_set(batch: int = 4, seed: int = 0) -> tuple[LinearModel, torch.Tensor, torch.Tensor]:
    """age = 40 + sum(w * image): every image has the same gradient w, so the universal step is closed form."""
    images, mask = brain_batch((6, 6, 6), batch=batch, seed=seed)
    return LinearModel(images.shape[1:], seed=seed), images, mask


def test_one_perturbation_is_shared_by_every_image() -> None:
    model = build("cnn3d")
    images, mask = brain_batch(GRID, batch=3)
    attack = create_attack("universal", model, budget={"epsilon": 0.02}, steps=3)
    result = attack(images, mask=mask)
    delta = result.images - images
    shared = attack.perturbation
    assert shared.shape == (1, *images.shape[1:])
    # Wherever the range clip did not bind, every image moved by the same shared perturbation.
    low, high = per_image(images, "amin").view(-1, 1, 1, 1, 1), per_image(images, "amax").view(-1, 1, 1, 1, 1)
    free = (result.images > low) & (result.images < high)
    moved = (result.images != images) & free
    assert moved.any()
    assert torch.allclose(delta[moved], shared.expand_as(delta)[moved], rtol=0, atol=1e-6)
    assert not shared[~mask].any(), "the shared perturbation is zero outside the mask"
    radius = attack.fit_radius
    assert torch.isclose(radius, (0.02 * 9.0 * torch.ones(())), atol=1e-6)
    assert shared.abs().max() <= radius * (1 + 1e-6)


def test_the_paper_algorithm_moves_along_the_sign_of_the_summed_signs() -> None:
    model, images, _ = linear_set()
    attack = create_attack("universal", model, budget={"epsilon": 0.05, "unit": "abs"}, clip="none",
                           keep_best=False, steps=8)
    result = attack(images)
    sign = model.weight.detach().sign()
    # 8 steps of r/4 along sign(w), clamped to the ball: r * sign(w).
    assert torch.allclose(attack.perturbation, 0.05 * sign[None], atol=1e-7)
    shift = 0.05 * model.weight.detach().abs().sum()
    assert torch.allclose(result.adversarial_prediction - result.clean_prediction, shift.expand(4), atol=1e-3)
    # 8 epochs of one forward and backward per mini-batch, plus the clean and the final prediction.
    assert (result.forward, result.backward, result.steps) == (8 + 2, 8, 8)


def test_the_pgd_algorithm_under_l2_fills_the_ball_along_the_summed_gradient() -> None:
    model, images, _ = linear_set()
    attack = create_attack("universal", model, algorithm="pgd", budget={"norm": "l2", "epsilon": 0.5, "unit": "abs"},
                           clip="none", steps=4, step_size=0.5)
    attack(images)
    weight = model.weight.detach()
    assert torch.allclose(attack.perturbation, 0.5 * weight[None] / weight.norm(), atol=1e-6)


@pytest.mark.parametrize("algorithm", ["sign", "pgd"])
def test_fitting_over_mini_batches_equals_fitting_over_the_whole_set(algorithm: str) -> None:
    model = build("cnn3d")
    images, mask = brain_batch(GRID, batch=4, seed=1)
    ages = torch.tensor([20.0, 30.0, 60.0, 80.0])
    kwargs = {"algorithm": algorithm, "objective": "error", "budget": {"epsilon": 0.02}, "steps": 3,
              "keep_best": False}
    whole = create_attack("universal", model, **kwargs).fit([(images, None, ages, mask)])
    split = create_attack("universal", model, **kwargs)
    parts = split.fit([(images[i:i + 2], None, ages[i:i + 2], mask) for i in (0, 2)])
    if algorithm == "sign":
        # A sum of signs is a sum of small integers: exact in any grouping.
        assert torch.equal(parts, whole)
    else:
        assert torch.allclose(parts, whole, rtol=0, atol=1e-6)
    assert split.fit_counters == (2 * 3, 2 * 3, 3)


def test_a_perturbation_fitted_on_one_set_applies_to_held_out_images() -> None:
    model, images, _ = linear_set(batch=6)
    fitting, held_out = images[:4], images[4:]
    attack = create_attack("universal", model, budget={"epsilon": 0.01}, keep_best=False)
    shared = attack.fit([(fitting[:2], None, None, None), (fitting[2:], None, None, None)])
    result = attack.apply(held_out)
    clean = model(held_out).detach()
    assert torch.allclose(result.clean_prediction, clean, atol=1e-4)
    assert (result.adversarial_prediction > clean).all()
    assert (result.forward, result.backward, result.steps) == (2, 0, 0)
    delta = result.images - held_out
    inside = (result.images > per_image(held_out, "amin").view(-1, 1, 1, 1, 1)) & (
        result.images < per_image(held_out, "amax").view(-1, 1, 1, 1, 1))
    assert torch.allclose(delta[inside], shared.expand_as(delta)[inside], atol=1e-6)


def test_a_range_budget_takes_the_smallest_radius_of_the_set_and_each_image_keeps_its_own() -> None:
    model, images, _ = linear_set()
    images = images * torch.tensor([1.0, 0.5, 1.0, 1.0]).view(-1, 1, 1, 1, 1)  # ranges 9, 4.5, 9, 9
    attack = create_attack("universal", model, budget={"epsilon": 0.02}, keep_best=False, clip="none")
    result = attack(images)
    assert torch.isclose(attack.fit_radius, torch.tensor(0.02 * 4.5))
    linf = perturbation_norms(result.images - images)["linf"]
    assert torch.allclose(linf, torch.full((4,), 0.02 * 4.5), atol=1e-6)
    # A held-out image with a smaller range gets the shared perturbation projected into its own ball.
    small = images[:1] * 0.1
    applied = attack.apply(small)
    assert torch.allclose(perturbation_norms(applied.images - small)["linf"], torch.tensor([0.02 * 0.9]),
                          atol=1e-6)


def test_unclipped_reproduces_the_paper_and_keep_best_falls_back_to_the_clean_image() -> None:
    model, images, _ = linear_set()
    unclipped = create_attack("universal", model, budget={"epsilon": 0.05}, clip="none", keep_best=False)
    result = unclipped(images)
    assert (per_image(result.images, "amax") > per_image(images, "amax")).any()
    # An image with the opposite weight: the shared perturbation lowers its age; keep_best keeps it clean.
    flipped = LinearModel(images.shape[1:])
    with torch.no_grad():
        flipped.weight.copy_(-model.weight)
    fitted = create_attack("universal", flipped, budget={"epsilon": 0.05})
    fitted.perturbation = unclipped.perturbation
    kept = fitted.apply(images)
    assert torch.equal(kept.images, images)
    assert torch.equal(kept.adversarial_prediction, kept.clean_prediction)
    strict = create_attack("universal", flipped, budget={"epsilon": 0.05}, keep_best=False)
    strict.perturbation = unclipped.perturbation
    assert (strict.apply(images).adversarial_prediction < kept.clean_prediction).all()


def test_fit_needs_a_reiterable_set_and_apply_a_fitted_perturbation() -> None:
    model, images, _ = linear_set()
    attack = create_attack("universal", model)
    with pytest.raises(MedrobustError, match="not fitted yet"):
        attack.apply(images)
    with pytest.raises(MedrobustError, match="re-iterable"):
        attack.fit(batch for batch in [(images, None, None, None)])
    with pytest.raises(MedrobustError, match="is empty"):
        attack.fit([])
    with pytest.raises(MedrobustError, match=r"tuple \(images, features, ages, mask\)"):
        attack.fit([images])
    attack.fit([(images, None, None, None)])
    with pytest.raises(MedrobustError, match="do not match the fitted perturbation"):
        attack.apply(images[..., :4])
    with pytest.raises(MedrobustError, match="algorithm must be one of sign, pgd"):
        create_attack("universal", model, algorithm="adam")


def test_universal_takes_sample_seeds_as_every_attack_and_draws_nothing_from_them() -> None:
    model, images, _ = linear_set()
    attack = create_attack("universal", model, budget={"epsilon": 0.01})
    plain = attack(images)
    seeded = attack(images, sample_seeds=[5, 6, 7, 8])
    assert torch.equal(plain.images, seeded.images)
    assert torch.equal(attack.apply(images, sample_seeds=[1, 2, 3, 4]).images, plain.images)
    with pytest.raises(MedrobustError, match="sample_seeds"):
        attack.apply(images, sample_seeds=[1, 2])


def test_fit_leaves_the_model_as_it_found_it() -> None:
    model = build("cnn3d")
    images, mask = brain_batch(GRID, batch=2)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        create_attack("universal", model, steps=2).fit([(images, None, None, mask)])
    assert all(module.training for module in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- l0


def greedy_reference(weight: torch.Tensor, image: torch.Tensor, budget: int, max_failures: int) -> torch.Tensor:
    """The paper's greedy walk, one image at a time, for age = 40 + sum(w * image): down the voxels by |w|, set
    each to the min, mid or max that raises the age most, if any does."""
    flat, w = image.flatten().clone(), weight.flatten()
    low, high = flat.min(), flat.max()
    changed = failures = 0
    for voxel in w.abs().argsort(descending=True, stable=True).tolist():
        if changed == budget or failures == max_failures:
            break
        gains = [float(w[voxel] * (value - flat[voxel])) for value in (low, (low + high) / 2, high)]
        best = max(range(3), key=lambda i: gains[i])
        if gains[best] > 0:
            flat[voxel] = (low, (low + high) / 2, high)[best]
            changed, failures = changed + 1, 0
        else:
            failures += 1
    return flat.view_as(image)


def test_l0_budget_counts_voxels() -> None:
    assert Budget("l0", 360).as_dict() == {"norm": "l0", "epsilon": 360.0, "unit": "abs"}
    assert Budget("linf", 0.1).unit == "range"
    images = torch.zeros(2, 1, 3, 3)
    assert torch.equal(Budget("l0", 2.7).radius(images), torch.tensor([2.0, 2.0]))
    with pytest.raises(MedrobustError, match="budget unit of norm 'l0' must be 'abs'"):
        Budget("l0", 360, "range")


def test_l0_follows_the_greedy_walk_on_a_linear_model() -> None:
    model, images, _ = linear_set()
    result = create_attack("l0", model, budget={"norm": "l0", "epsilon": 5}, max_failures=3)(images)
    weight = model.weight.detach()
    for image, adversarial in zip(images, result.images, strict=True):
        assert torch.equal(adversarial, greedy_reference(weight, image, 5, 3))
    assert (perturbation_norms(result.images - images)["l0"] == 5).all()


def test_l0_changes_at_most_epsilon_voxels_inside_the_mask_each_to_the_min_mid_or_max() -> None:
    model = build("cnn3d")
    images, mask = brain_batch(GRID, batch=2)
    result = create_attack("l0", model, budget={"norm": "l0", "epsilon": 6}, max_failures=5, rerank_every=2)(
        images, mask=mask)
    changed = result.images != images
    assert (changed.flatten(1).sum(dim=1) <= 6).all() and changed.any()
    assert not changed[~mask.expand_as(changed)].any()
    low, high = per_image(images, "amin").view(-1, 1, 1, 1, 1), per_image(images, "amax").view(-1, 1, 1, 1, 1)
    levels = (result.images == low) | (result.images == (low + high) / 2) | (result.images == high)
    assert levels[changed].all()
    assert (result.adversarial_prediction > result.clean_prediction).all()


def test_l0_stops_after_max_failures_in_a_row() -> None:
    model, images, _ = linear_set(batch=1)
    with torch.no_grad():
        model.weight.zero_()
        model.weight.view(-1)[:3] = torch.tensor([3.0, 2.0, 1.0])  # only 3 voxels can raise the age
    images.view(-1)[:3] = 0.0
    result = create_attack("l0", model, budget={"norm": "l0", "epsilon": 10}, max_failures=4)(images)
    assert torch.equal(result.images.view(-1)[:3], torch.full((3,), 7.0))
    assert int(perturbation_norms(result.images - images)["l0"]) == 3
    # Clean and final prediction, one ranking (forward and backward), 3 values for each of 3 + 4 voxels.
    assert (result.forward, result.backward, result.steps) == (2 + 1 + 3 * (3 + 4), 1, 1)


def test_l0_beats_random_voxel_changes() -> None:
    model = build("cnn3d")
    images, mask = brain_batch(GRID, batch=2, seed=2)
    result = create_attack("l0", model, budget={"norm": "l0", "epsilon": 10}, max_failures=10)(images, mask=mask)
    attacked = result.adversarial_prediction - result.clean_prediction
    generator = torch.Generator().manual_seed(0)
    inside = mask.flatten().nonzero()[:, 0]
    low, high = per_image(images, "amin"), per_image(images, "amax")
    levels = torch.stack([low, (low + high) / 2, high], dim=1)
    for _ in range(5):
        noisy = images.clone().flatten(1)
        for sample in range(2):
            voxels = inside[torch.randperm(len(inside), generator=generator)[:10]]
            noisy[sample, voxels] = levels[sample, torch.randint(3, (10,), generator=generator)]
        with torch.no_grad():
            shift = model(noisy.view_as(images)) - result.clean_prediction
        assert (attacked > shift).all()


@pytest.mark.parametrize(("kwargs", "name"), [({"max_failures": 0}, "max_failures"),
                                               ({"max_failures": 2.5}, "max_failures"),
                                               ({"rerank_every": 0}, "rerank_every"),
                                               ({"rerank_every": True}, "rerank_every"),
                                               ({"budget": {"norm": "linf"}}, "supports budget norms l0")])
def test_l0_bad_arguments_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(MedrobustError, match=name):
        create_attack("l0", build("conv2d"), **kwargs)
