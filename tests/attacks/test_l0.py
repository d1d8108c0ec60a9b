"""The greedy l0 attack (the paper's): voxels ranked by the gradient, each set to the min, mid or max of the image,
stopping after max_failures in a row; under each threat model."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import Budget, create_attack, perturbation_norms
from medrobust.attacks.checks import (
    GRID,
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

L0 = {"budget": Budget("l0", 8), "max_failures": 4}



def greedy_reference(weight: torch.Tensor, image: torch.Tensor, budget: int, max_failures: int,
                     ranking: str = "gain") -> torch.Tensor:
    """The greedy walk, one image at a time, for age = 40 + sum(w * image): down the voxels by their gain |w| x
    room to the bound along sign(w) (``gradient``: by |w|, the paper's walk), set each to the min, mid or max
    that raises the age most, if any does."""
    flat, w = image.flatten().clone(), weight.flatten()
    low, high = flat.min(), flat.max()
    rank = w.abs() if ranking == "gradient" else w.abs() * torch.where(w > 0, high - flat, flat - low)
    changed = failures = 0
    for voxel in rank.argsort(descending=True, stable=True).tolist():
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


@pytest.mark.parametrize("ranking", ["gain", "gradient"])
def test_l0_follows_the_greedy_walk_on_a_linear_model(ranking: str) -> None:
    model, images, _ = linear_set()
    result = create_attack("l0", model, budget={"norm": "l0", "epsilon": 5}, max_failures=3, ranking=ranking)(images)
    weight = model.weight.detach()
    for image, adversarial in zip(images, result.images, strict=True):
        assert torch.equal(adversarial, greedy_reference(weight, image, 5, 3, ranking))
    assert (perturbation_norms(result.images - images)["l0"] == 5).all()


def test_l0_changes_at_most_epsilon_voxels_inside_the_mask_each_to_the_min_mid_or_max() -> None:
    model = toy_model("cnn3d")
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
    model = toy_model("cnn3d")
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
        create_attack("l0", toy_model("conv2d"), **kwargs)


# ---------------------------------------------------------------- threat models


def test_l0_fixed_leaves_the_features_untouched():
    model = context_model()
    images, features = context_batch()
    result = create_attack("l0", model, **L0)(images, features)
    assert torch.equal(result.features, features)
    assert (result.images != images).any()


def test_l0_perturbed_moves_the_volumes_within_budget_and_never_loses():
    model = context_model()
    images, features = context_batch()
    fixed = create_attack("l0", model, **L0)(images, features)
    attack = create_attack("l0", model, threat_model="perturbed", feature_budget=0.05, **L0)
    result = attack(images, features)
    assert_volumes_moved_within_budget(result, features, 0.05)
    assert_prediction_is_the_models(model, result)
    assert (result.adversarial_prediction >= result.clean_prediction).all()
    assert result.adversarial_prediction.mean() > fixed.adversarial_prediction.mean()
    # One more forward per ranking: the step of the volumes is tried before it is kept.
    assert result.forward == fixed.forward + 1
    reranked = create_attack("l0", model, threat_model="perturbed", rerank_every=2, **L0)(images, features)
    assert_volumes_moved_within_budget(reranked, features, 0.05)
    assert (reranked.images != images).flatten(1).sum(1).le(8).all()


def test_l0_zero_feature_budget_gives_the_fixed_images():
    model = context_model()
    images, features = context_batch()
    fixed = create_attack("l0", model, **L0)(images, features)
    zero = create_attack("l0", model, threat_model="perturbed", feature_budget=0.0, **L0)(images, features)
    assert torch.equal(fixed.images, zero.images) and torch.equal(zero.features, features)


def test_l0_recomputed_ranks_and_predicts_through_the_extractor():
    model = image_blind_context_model()
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    result = create_attack("l0", model, threat_model="recomputed", **L0)(images, features, extractor=extractor)
    # Only the volumes carry the image to this model: any gain went through the extractor's gradient (the
    # ranking) and through the features recomputed for each trial.
    assert (result.adversarial_prediction > result.clean_prediction).all()
    assert not torch.equal(result.features, features)
    assert torch.allclose(result.features, extractor(result.images), rtol=1e-5, atol=1e-5)
    assert (result.images != images).flatten(1).sum(1).le(8).all()
    assert_prediction_is_the_models(model, result)
    fixed = create_attack("l0", model, **L0)(images, features)
    assert torch.equal(fixed.adversarial_prediction, fixed.clean_prediction)
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor"):
        create_attack("l0", model, threat_model="recomputed", **L0)(images, features)
