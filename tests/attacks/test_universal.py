"""The universal attack: one perturbation shared by a set, fitted over mini-batches, applied to held-out subjects;
under each threat model (fixed keeps the context features, perturbed moves the regional volumes within their
budget, recomputed measures them again on the attacked image through the batch's extractor)."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import Budget, create_attack, perturbation_norms
from medrobust.attacks.checks import (
    CONTEXT_FEATURE_NAMES,
    GRID,
    LinearModel,
    assert_prediction_is_the_models,
    assert_volumes_moved_within_budget,
    brain_batch,
    context_batch,
    context_model,
    image_blind_context_model,
    labelled_batch,
    linear_set,
    per_image,
    soft_extractor,
    toy_model,
)
from medrobust.errors import MedrobustError

BUDGET = Budget("linf", 5e-3, "range")



def test_one_perturbation_is_shared_by_every_image() -> None:
    model = toy_model("cnn3d")
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
    model = toy_model("cnn3d")
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
    model = toy_model("cnn3d")
    images, mask = brain_batch(GRID, batch=2)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        create_attack("universal", model, steps=2).fit([(images, None, None, mask)])
    assert all(module.training for module in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- threat models


def test_universal_fixed_leaves_the_features_untouched():
    model = context_model()
    images, features = context_batch()
    result = create_attack("universal", model, budget=BUDGET, steps=3)(images, features)
    assert torch.equal(result.features, features)
    assert create_attack("universal", model, budget=BUDGET).feature_perturbation is None


def test_universal_perturbed_fits_one_relative_change_per_volume_shared_by_every_subject():
    model = context_model()
    images, features = context_batch()
    attack = create_attack("universal", model, budget=BUDGET, steps=4, threat_model="perturbed",
                           feature_budget=0.05, keep_best=False)
    result = attack(images, features)
    shift = attack.feature_perturbation
    assert shift.shape == (1, len(CONTEXT_FEATURE_NAMES))
    assert torch.equal(shift[:, :2], torch.zeros_like(shift[:, :2]))
    assert shift[:, 2:].abs().gt(0).all() and (shift.abs() <= 0.05).all()
    assert_volumes_moved_within_budget(result, features, 0.05)
    # The same relative change for every subject: the volumes are v + shift x |v|.
    assert torch.allclose(result.features, features + shift * features.abs() * (shift != 0), rtol=1e-6)
    assert_prediction_is_the_models(model, result)
    fixed = create_attack("universal", model, budget=BUDGET, steps=4, keep_best=False)(images, features)
    assert result.adversarial_prediction.mean() > fixed.adversarial_prediction.mean()  # objective "older"


def test_universal_perturbed_applies_the_fitted_change_to_held_out_subjects():
    model = context_model()
    images, features = context_batch()
    attack = create_attack("universal", model, budget=BUDGET, steps=3, threat_model="perturbed",
                           keep_best=False)
    attack.fit([(images[:2], features[:2], None, None)])
    result = attack.apply(images[2:], features[2:])
    relative = (result.features - features[2:]) / features[2:].abs()
    assert torch.allclose(relative, attack.feature_perturbation, atol=1e-6)
    assert (result.forward, result.backward) == (2, 0)
    with pytest.raises(MedrobustError, match="do not match the fitted feature perturbation"):
        attack.apply(images, features[:, :3])


def test_universal_zero_feature_budget_is_the_fixed_threat_model():
    model = context_model()
    images, features = context_batch()
    fixed = create_attack("universal", model, budget=BUDGET, steps=3)(images, features)
    zero = create_attack("universal", model, budget=BUDGET, steps=3, threat_model="perturbed",
                         feature_budget=0.0)(images, features)
    assert torch.equal(fixed.images, zero.images) and torch.equal(zero.features, features)


def test_universal_recomputed_fits_through_each_mini_batch_extractor():
    model = context_model()
    images, features, labels = labelled_batch()
    extractors = [soft_extractor(images[rows], features[rows], labels[rows]) for rows in (slice(0, 2), slice(2, 3))]
    attack = create_attack("universal", model, budget=BUDGET, steps=3, threat_model="recomputed")
    shared = attack.fit([(images[:2], features[:2], None, None, extractors[0]),
                         (images[2:], features[2:], None, None, extractors[1])])
    assert shared.abs().gt(0).any() and attack.feature_perturbation is None
    result = attack.apply(images[2:], features[2:], extractor=extractors[1])
    assert not torch.equal(result.features, features[2:])  # the shared image perturbation moved the volumes
    assert torch.allclose(result.features, extractors[1](result.images), rtol=1e-5, atol=1e-5)
    assert torch.equal(result.features[:, :2], features[2:, :2])
    assert_prediction_is_the_models(model, result)


def test_universal_recomputed_gradient_flows_through_the_extractor():
    # A model that sees the image only through its volumes: a fit that did not go through the extractor
    # would have a zero gradient and leave the image as it is.
    model = image_blind_context_model()
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    attack = create_attack("universal", model, budget=BUDGET, steps=3, threat_model="recomputed", keep_best=False)
    result = attack(images, features, extractor=extractor)
    assert attack.perturbation.abs().gt(0).any()
    assert (result.adversarial_prediction > result.clean_prediction).all()
    fixed = create_attack("universal", model, budget=BUDGET, steps=3, keep_best=False)(images, features)
    assert torch.equal(fixed.adversarial_prediction, fixed.clean_prediction)


def test_universal_recomputed_through_a_detached_extractor_finds_no_direction():
    # An extractor outside autograd (a segmentation run on the host, say) leaves a frozen features-only model no
    # graph at all: the fit runs and leaves the perturbation at zero.
    model = context_model("features_mlp")
    model.requires_grad_(False)
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    attack = create_attack("universal", model, budget=BUDGET, steps=2, threat_model="recomputed")
    shared = attack.fit([(images, features, None, None, lambda x: extractor(x).detach())])
    assert torch.equal(shared, torch.zeros_like(shared))


def test_universal_recomputed_without_an_extractor_is_a_clear_error():
    model = context_model()
    images, features, labels = labelled_batch()
    attack = create_attack("universal", model, budget=BUDGET, steps=2, threat_model="recomputed")
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor with every"):
        attack.fit([(images, features, None, None)])
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor"):
        attack.fit([(images, None, None, None, soft_extractor(images, features, labels))])
    attack.fit([(images, features, None, None, soft_extractor(images, features, labels))])
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor"):
        attack.apply(images, features)
    with pytest.raises(MedrobustError, match=r"\(images, features, ages, mask, extractor\)"):
        attack.fit([(images, features)])


def test_universal_fixed_and_perturbed_ignore_an_extractor_given_with_the_batch():
    model = context_model()
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    for threat_model in ("fixed", "perturbed"):
        kwargs = {"budget": BUDGET, "steps": 2, "threat_model": threat_model}
        plain = create_attack("universal", model, **kwargs)(images, features)
        given = create_attack("universal", model, **kwargs)(images, features, extractor=extractor)
        assert torch.equal(plain.images, given.images) and torch.equal(plain.features, given.features)


def test_an_extractor_already_on_the_device_moves_nowhere():
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    assert extractor.to("cpu") is extractor
