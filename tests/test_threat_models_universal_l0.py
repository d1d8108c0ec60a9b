"""Threat models of the universal and l0 attacks: fixed keeps the context features, perturbed moves the regional
volumes within their budget, recomputed measures them again on the attacked image through the batch's
extractor."""

from __future__ import annotations

import pytest
import torch
from test_threat_models import GRID, NAMES, batch, extractor_for, hybrid, labelled_batch

from medrobust.attacks import Budget, create_attack
from medrobust.errors import MedrobustError
from medrobust.models import create_model

BUDGET = Budget("linf", 5e-3, "range")
L0 = {"budget": Budget("l0", 8), "max_failures": 4}
VOLUMES = slice(2, None)  # sex and field strength come first in NAMES


def image_blind_hybrid() -> torch.nn.Module:
    """The hybrid with its head's weights on the conv trunk zeroed: it sees the image only through the
    features, so any move under ``recomputed`` is one that went through the extractor."""
    model = hybrid()
    with torch.no_grad():
        model.head[0].weight[:, :model.conv_trunk.out_features] = 0.0
    return model


def assert_reported_prediction(model, result) -> None:
    """The reported prediction is the model's on the returned images AND features."""
    with torch.no_grad():
        assert torch.allclose(result.adversarial_prediction, model(result.images, result.features), atol=1e-4)


def assert_volumes_moved_within_budget(result, features, feature_budget: float) -> None:
    change = result.features - features
    assert torch.equal(change[:, :2], torch.zeros_like(change[:, :2]))  # sex and field strength stay
    assert change[:, VOLUMES].abs().gt(0).any()
    assert (change.abs() <= feature_budget * features.abs() * (1 + 1e-6)).all()


# ---------------------------------------------------------------- universal


def test_universal_fixed_leaves_the_features_untouched():
    model = hybrid()
    images, features = batch()
    result = create_attack("universal", model, budget=BUDGET, steps=3)(images, features)
    assert torch.equal(result.features, features)
    assert create_attack("universal", model, budget=BUDGET).feature_perturbation is None


def test_universal_perturbed_fits_one_relative_change_per_volume_shared_by_every_subject():
    model = hybrid()
    images, features = batch()
    attack = create_attack("universal", model, budget=BUDGET, steps=4, threat_model="perturbed",
                           feature_budget=0.05, keep_best=False)
    result = attack(images, features)
    shift = attack.feature_perturbation
    assert shift.shape == (1, len(NAMES))
    assert torch.equal(shift[:, :2], torch.zeros_like(shift[:, :2]))
    assert shift[:, VOLUMES].abs().gt(0).all() and (shift.abs() <= 0.05).all()
    assert_volumes_moved_within_budget(result, features, 0.05)
    # The same relative change for every subject: the volumes are v + shift x |v|.
    assert torch.allclose(result.features, features + shift * features.abs() * (shift != 0), rtol=1e-6)
    assert_reported_prediction(model, result)
    fixed = create_attack("universal", model, budget=BUDGET, steps=4, keep_best=False)(images, features)
    assert result.adversarial_prediction.mean() > fixed.adversarial_prediction.mean()  # objective "older"


def test_universal_perturbed_applies_the_fitted_change_to_held_out_subjects():
    model = hybrid()
    images, features = batch()
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
    model = hybrid()
    images, features = batch()
    fixed = create_attack("universal", model, budget=BUDGET, steps=3)(images, features)
    zero = create_attack("universal", model, budget=BUDGET, steps=3, threat_model="perturbed",
                         feature_budget=0.0)(images, features)
    assert torch.equal(fixed.images, zero.images) and torch.equal(zero.features, features)


def test_universal_recomputed_fits_through_each_mini_batch_extractor():
    model = hybrid()
    images, features, labels = labelled_batch()
    extractors = [extractor_for(images[rows], features[rows], labels[rows]) for rows in (slice(0, 2), slice(2, 3))]
    attack = create_attack("universal", model, budget=BUDGET, steps=3, threat_model="recomputed")
    shared = attack.fit([(images[:2], features[:2], None, None, extractors[0]),
                         (images[2:], features[2:], None, None, extractors[1])])
    assert shared.abs().gt(0).any() and attack.feature_perturbation is None
    result = attack.apply(images[2:], features[2:], extractor=extractors[1])
    assert not torch.equal(result.features, features[2:])  # the shared image perturbation moved the volumes
    assert torch.allclose(result.features, extractors[1](result.images), rtol=1e-5, atol=1e-5)
    assert torch.equal(result.features[:, :2], features[2:, :2])
    assert_reported_prediction(model, result)


def test_universal_recomputed_gradient_flows_through_the_extractor():
    # A model that sees the image only through its volumes: a fit that did not go through the extractor
    # would have a zero gradient and leave the image as it is.
    model = image_blind_hybrid()
    images, features, labels = labelled_batch()
    extractor = extractor_for(images, features, labels)
    attack = create_attack("universal", model, budget=BUDGET, steps=3, threat_model="recomputed", keep_best=False)
    result = attack(images, features, extractor=extractor)
    assert attack.perturbation.abs().gt(0).any()
    assert (result.adversarial_prediction > result.clean_prediction).all()
    fixed = create_attack("universal", model, budget=BUDGET, steps=3, keep_best=False)(images, features)
    assert torch.equal(fixed.adversarial_prediction, fixed.clean_prediction)


def test_universal_recomputed_through_a_detached_extractor_finds_no_direction():
    # An extractor outside autograd (a segmentation run on the host, say) leaves a frozen features-only model no
    # graph at all: the fit runs and leaves the perturbation at zero.
    torch.manual_seed(0)
    model = create_model("features_mlp", feature_names=NAMES, input_shape=GRID, voxel_size=(6.0, 6.0, 6.0))
    model.set_target_scaling(50.0, 15.0)
    model.set_feature_scaling([0.5, 2.0, 8.0, 30.0, 450.0], [0.5, 0.7, 1.0, 10.0, 50.0])
    model.requires_grad_(False)
    images, features, labels = labelled_batch()
    extractor = extractor_for(images, features, labels)
    attack = create_attack("universal", model, budget=BUDGET, steps=2, threat_model="recomputed")
    shared = attack.fit([(images, features, None, None, lambda x: extractor(x).detach())])
    assert torch.equal(shared, torch.zeros_like(shared))


def test_universal_recomputed_without_an_extractor_is_a_clear_error():
    model = hybrid()
    images, features, labels = labelled_batch()
    attack = create_attack("universal", model, budget=BUDGET, steps=2, threat_model="recomputed")
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor with every"):
        attack.fit([(images, features, None, None)])
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor"):
        attack.fit([(images, None, None, None, extractor_for(images, features, labels))])
    attack.fit([(images, features, None, None, extractor_for(images, features, labels))])
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor"):
        attack.apply(images, features)
    with pytest.raises(MedrobustError, match=r"\(images, features, ages, mask, extractor\)"):
        attack.fit([(images, features)])


def test_universal_fixed_and_perturbed_ignore_an_extractor_given_with_the_batch():
    model = hybrid()
    images, features, labels = labelled_batch()
    extractor = extractor_for(images, features, labels)
    for threat_model in ("fixed", "perturbed"):
        kwargs = {"budget": BUDGET, "steps": 2, "threat_model": threat_model}
        plain = create_attack("universal", model, **kwargs)(images, features)
        given = create_attack("universal", model, **kwargs)(images, features, extractor=extractor)
        assert torch.equal(plain.images, given.images) and torch.equal(plain.features, given.features)


def test_an_extractor_already_on_the_device_moves_nowhere():
    images, features, labels = labelled_batch()
    extractor = extractor_for(images, features, labels)
    assert extractor.to("cpu") is extractor


# ---------------------------------------------------------------- l0


def test_l0_fixed_leaves_the_features_untouched():
    model = hybrid()
    images, features = batch()
    result = create_attack("l0", model, **L0)(images, features)
    assert torch.equal(result.features, features)
    assert (result.images != images).any()


def test_l0_perturbed_moves_the_volumes_within_budget_and_never_loses():
    model = hybrid()
    images, features = batch()
    fixed = create_attack("l0", model, **L0)(images, features)
    attack = create_attack("l0", model, threat_model="perturbed", feature_budget=0.05, **L0)
    result = attack(images, features)
    assert_volumes_moved_within_budget(result, features, 0.05)
    assert_reported_prediction(model, result)
    assert (result.adversarial_prediction >= result.clean_prediction).all()
    assert result.adversarial_prediction.mean() > fixed.adversarial_prediction.mean()
    # One more forward per ranking: the step of the volumes is tried before it is kept.
    assert result.forward == fixed.forward + 1
    reranked = create_attack("l0", model, threat_model="perturbed", rerank_every=2, **L0)(images, features)
    assert_volumes_moved_within_budget(reranked, features, 0.05)
    assert (reranked.images != images).flatten(1).sum(1).le(8).all()


def test_l0_zero_feature_budget_gives_the_fixed_images():
    model = hybrid()
    images, features = batch()
    fixed = create_attack("l0", model, **L0)(images, features)
    zero = create_attack("l0", model, threat_model="perturbed", feature_budget=0.0, **L0)(images, features)
    assert torch.equal(fixed.images, zero.images) and torch.equal(zero.features, features)


def test_l0_recomputed_ranks_and_predicts_through_the_extractor():
    model = image_blind_hybrid()
    images, features, labels = labelled_batch()
    extractor = extractor_for(images, features, labels)
    result = create_attack("l0", model, threat_model="recomputed", **L0)(images, features, extractor=extractor)
    # Only the volumes carry the image to this model: any gain went through the extractor's gradient (the
    # ranking) and through the features recomputed for each trial.
    assert (result.adversarial_prediction > result.clean_prediction).all()
    assert not torch.equal(result.features, features)
    assert torch.allclose(result.features, extractor(result.images), rtol=1e-5, atol=1e-5)
    assert (result.images != images).flatten(1).sum(1).le(8).all()
    assert_reported_prediction(model, result)
    fixed = create_attack("l0", model, **L0)(images, features)
    assert torch.equal(fixed.adversarial_prediction, fixed.clean_prediction)
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor"):
        create_attack("l0", model, threat_model="recomputed", **L0)(images, features)
