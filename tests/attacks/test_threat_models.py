"""Threat models for models with context features: fixed keeps them, perturbed moves the volumes in budget,
recomputed measures them on the attacked image."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import Budget, attack_entrypoint, create_attack, list_attacks
from medrobust.attacks.checks import (
    context_batch,
    context_model,
    labelled_batch,
    soft_extractor,
    toy_inputs,
    toy_model,
)
from medrobust.errors import MedrobustError

BUDGET = Budget("linf", 2e-3, "range")






def test_perturbed_moves_only_the_volumes_and_within_their_budget():
    model = context_model()
    images, features = context_batch()
    attack = create_attack("pgd", model, budget=BUDGET, threat_model="perturbed", feature_budget=0.05, steps=3,
                           random_start=False)
    result = attack(images, features)
    change = result.features - features
    assert torch.equal(change[:, :2], torch.zeros_like(change[:, :2]))  # sex and field strength stay
    assert change[:, 2:].abs().gt(0).any()
    assert (change.abs() <= 0.05 * features.abs() * (1 + 1e-6)).all()
    with torch.no_grad():  # the reported prediction is the model's on the returned image AND features
        assert torch.allclose(result.adversarial_prediction, model(result.images, result.features), atol=1e-4)


# Quick settings per attack; apgd and cw run from the clean image, so that the threat models share the start.
SETTINGS = {"fgsm": {}, "pgd": {"random_start": False}, "bim": {}, "apgd": {"steps": 10, "random_start": False},
            "cw": {"iterations": 10, "search_steps": 1}}
# The attacks that implement all three threat models with their own update (not only through state.ascend).
OWN_UPDATE = ["apgd", "cw"]


def attack_for(name, model, **kwargs):
    return create_attack(name, model, budget=BUDGET, **SETTINGS[name], **kwargs)


@pytest.mark.parametrize("name", OWN_UPDATE)
def test_perturbed_moves_only_the_volumes_within_their_budget_under_the_attacks_own_update(name):
    model = context_model()
    images, features = context_batch()
    clean_features = features.clone()
    result = attack_for(name, model, threat_model="perturbed", feature_budget=0.05)(images, features)
    assert torch.equal(features, clean_features)  # the caller's tensor is not written to
    change = result.features - features
    assert torch.equal(change[:, :2], torch.zeros_like(change[:, :2]))  # sex and field strength stay
    # Every volume moved, in the direction that ages this model, a good part of its budget, and within it.
    assert (change[:, 2:].abs() > 0.25 * 0.05 * features[:, 2:].abs()).all()
    assert (change.abs() <= 0.05 * features.abs() * (1 + 1e-6)).all()
    assert not torch.equal(result.images, images)
    with torch.no_grad():  # the returned pair is what the reported prediction was made on
        assert torch.allclose(result.adversarial_prediction, model(result.images, result.features), atol=1e-4)


@pytest.mark.parametrize("name", OWN_UPDATE)
def test_fixed_leaves_the_features_untouched(name):
    model = context_model()
    images, features = context_batch()
    clean_features = features.clone()
    result = attack_for(name, model)(images, features)
    assert torch.equal(features, clean_features) and torch.equal(result.features, clean_features)
    with torch.no_grad():
        assert torch.allclose(result.adversarial_prediction, model(result.images, features), atol=1e-4)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "bim", *OWN_UPDATE])
def test_perturbed_is_at_least_as_strong_as_fixed(name):
    model = context_model()
    images, features = context_batch()
    fixed = attack_for(name, model, threat_model="fixed")(images, features)
    perturbed = attack_for(name, model, threat_model="perturbed")(images, features)
    assert torch.equal(fixed.features, features)
    # Objective "older": on this model the volumes add about a year on top of the image attack's 55 to 85.
    assert perturbed.adversarial_prediction.mean() > fixed.adversarial_prediction.mean() + 0.5
    assert (perturbed.adversarial_prediction >= fixed.adversarial_prediction - 0.5).all()


@pytest.mark.parametrize("name", ["pgd", *OWN_UPDATE])
def test_a_zero_feature_budget_is_the_fixed_threat_model(name):
    model = context_model()
    images, features = context_batch()
    kwargs = {"steps": 3} if name == "pgd" else {}
    fixed = attack_for(name, model, **kwargs)(images, features)
    zero = attack_for(name, model, threat_model="perturbed", feature_budget=0.0, **kwargs)(images, features)
    assert torch.equal(fixed.images, zero.images) and torch.equal(zero.features, features)
    assert torch.equal(fixed.adversarial_prediction, zero.adversarial_prediction)


def test_a_features_only_model_can_be_attacked_when_its_features_may_move():
    model = context_model("features_mlp")
    images, features = context_batch()
    with pytest.raises(MedrobustError, match="does not use the image"):
        create_attack("pgd", model, budget=BUDGET)
    result = create_attack("pgd", model, budget=BUDGET, threat_model="perturbed", steps=3,
                           random_start=False)(images, features)
    assert torch.equal(result.images, images)  # nothing to gain from the image
    assert (result.adversarial_prediction > result.clean_prediction).all()


def test_attacks_that_cannot_move_features_refuse_the_perturbed_threat_model():
    model = context_model()
    refusing = [name for name in list_attacks() if "perturbed" not in attack_entrypoint(name).threat_models]
    for name in ["fgsm", "pgd", "bim", "noise", *OWN_UPDATE]:
        assert attack_entrypoint(name).threat_models == ("fixed", "perturbed", "recomputed")
    for name in refusing:
        with pytest.raises(MedrobustError, match="supports threat models"):
            create_attack(name, model, threat_model="perturbed")


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "5%"])
def test_feature_budget_is_validated(bad):
    with pytest.raises(MedrobustError, match="feature_budget"):
        create_attack("pgd", context_model(), threat_model="perturbed", feature_budget=bad)






def test_soft_volumes_give_the_clean_features_on_the_clean_image_and_follow_intensity():
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    assert torch.equal(extractor(images), features)
    darker = images - 0.5 * (labels > 0)  # tissue loses volume, fluid gains
    moved = extractor(darker)
    assert (moved[:, 2] < features[:, 2]).all() and (moved[:, 4] < features[:, 4]).all()
    assert (moved[:, 3] > features[:, 3]).all()
    assert torch.equal(moved[:, :2], features[:, :2])
    leaf = images.clone().requires_grad_(True)
    extractor(leaf)[:, 2].sum().backward()
    assert leaf.grad[labels == 1].abs().sum() > 0 and leaf.grad[labels == 2].abs().sum() == 0


def test_recomputed_features_follow_the_attacked_image():
    model = context_model()
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    attack = create_attack("pgd", model, budget=BUDGET, threat_model="recomputed", steps=3, random_start=False)
    result = attack(images, features, extractor=extractor)
    assert not torch.equal(result.features, features)  # the image attack moved the measured volumes
    assert torch.allclose(result.features, extractor(result.images), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(result.adversarial_prediction, model(result.images, result.features), atol=1e-4)
    with pytest.raises(MedrobustError, match="needs the clean context features and a feature extractor"):
        attack(images, features)


@pytest.mark.parametrize("name", OWN_UPDATE)
def test_recomputed_features_follow_the_attacked_image_under_the_attacks_own_update(name):
    model = context_model()
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    result = attack_for(name, model, threat_model="recomputed")(images, features, extractor=extractor)
    assert not torch.equal(result.features, features)
    assert torch.equal(result.features[:, :2], features[:, :2])
    assert torch.allclose(result.features, extractor(result.images), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(result.adversarial_prediction, model(result.images, result.features), atol=1e-4)


@pytest.mark.parametrize("name", ["pgd", *OWN_UPDATE])
def test_under_recomputed_the_gradient_reaches_the_image_through_the_extractor(name):
    # A features-only model: the image changes its prediction only through the recomputed volumes, so an attack
    # whose gradient did not flow through the extractor would have no direction to move the image in.
    model = context_model("features_mlp")
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    kwargs = {"steps": 3} if name == "pgd" else {}
    result = attack_for(name, model, threat_model="recomputed", **kwargs)(images, features, extractor=extractor)
    assert not torch.equal(result.images, images)
    assert (result.adversarial_prediction > result.clean_prediction).all()
    assert torch.allclose(result.features, extractor(result.images), rtol=1e-5, atol=1e-5)


def _refuse(*args, **kwargs):
    raise RuntimeError("host synchronisation inside the attack loop")


@pytest.mark.parametrize("threat_model", ["perturbed", "recomputed"])
@pytest.mark.parametrize("name", OWN_UPDATE)
def test_moving_features_adds_no_host_synchronisation(name, threat_model, monkeypatch):
    model = context_model()
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels)
    attack = attack_for(name, model, threat_model=threat_model)
    original = type(attack).perturb

    def guarded(self, state):
        with pytest.MonkeyPatch.context() as patch:
            for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                patch.setattr(torch.Tensor, method, _refuse)
            return original(self, state)

    monkeypatch.setattr(type(attack), "perturb", guarded)
    result = attack(images, features, extractor=extractor if threat_model == "recomputed" else None)
    assert result.steps == 10


def test_evaluate_gives_the_weighted_gradients_and_refuses_features_it_cannot_use():
    from medrobust.attacks.base import AttackState

    model = context_model()
    images, features = context_batch()
    weights = torch.tensor([1.0, -2.0, 0.5])
    attack = attack_for("pgd", model, threat_model="perturbed")
    with torch.enable_grad():
        state = AttackState(attack, images, features, None, None)
        moved = features * 1.01
        plain, weighted = state.evaluate(images, moved), state.evaluate(images, moved, weights)
    assert torch.equal(state.features, moved) and state.backward == 2 and state.steps == 2
    assert torch.allclose(weighted.grad, plain.grad * weights.view(-1, 1, 1, 1, 1), rtol=1e-5, atol=1e-7)
    assert torch.allclose(weighted.feature_grad, plain.feature_grad * weights.view(-1, 1), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(plain.prediction, model(images, moved), atol=1e-5)
    fixed = attack_for("pgd", model)
    with torch.enable_grad():
        state = AttackState(fixed, images, features, None, None)
        assert state.evaluate(images).feature_grad is None
        with pytest.raises(MedrobustError, match="only under threat_model 'perturbed'"):
            state.evaluate(images, features)


@pytest.mark.parametrize("name", ["pgd", *OWN_UPDATE])
def test_perturbed_features_of_a_model_that_ignores_them_stay_clean(name):
    # A model that takes the features (two named volumes) and ignores them: no feature gradient reaches them, so
    # they never move.
    from types import SimpleNamespace

    model = toy_model("conv2d")
    model.meta = SimpleNamespace(name="conv2d", uses_image=True, feature_names=["vol_a", "vol_b"])
    images, _, _, _ = toy_inputs("conv2d")
    features = torch.tensor([[7.5, 25.0], [8.5, 40.0]])
    kwargs = {"steps": 3} if name == "pgd" else {}
    result = create_attack(name, model, budget={"epsilon": 0.02}, threat_model="perturbed", **SETTINGS[name],
                           **kwargs)(images, features)
    assert torch.equal(result.features, features)
    assert (result.adversarial_prediction > result.clean_prediction).all()


@pytest.mark.parametrize("threat_model", ["fixed", "perturbed", "recomputed"])
def test_apgd_from_the_clean_image_takes_its_clean_prediction_from_its_first_pass(threat_model):
    # Under every threat model the first pass sees the clean image with the clean features (recomputed: the
    # extractor gives exactly them on the clean image), so its prediction is the clean prediction.
    model = context_model()
    images, features, labels = labelled_batch()
    extractor = soft_extractor(images, features, labels) if threat_model == "recomputed" else None
    attack = attack_for("apgd", model, threat_model=threat_model)
    assert attack.starts_clean
    result = attack(images, features, extractor=extractor)
    with torch.no_grad():
        assert torch.equal(result.clean_prediction, model(images, features))
    assert result.forward == result.backward + 1 and not model._forward_hooks
    eager = type("Eager", (type(attack),), {"starts_clean": False})(model, **attack.params())
    reference = eager(images, features, extractor=extractor)
    assert torch.equal(result.images, reference.images) and torch.equal(result.features, reference.features)
    assert torch.equal(result.adversarial_prediction, reference.adversarial_prediction)
    assert reference.forward == result.forward + 1


def test_noise_is_a_baseline_under_every_threat_model():
    model = context_model()
    images, features, labels = labelled_batch()
    # perturbed: each volume at a random end of its box (or clean, where keep_best kept the clean pair); the
    # image noise of exactly the budget, as under fixed.
    noise = create_attack("noise", model, budget=BUDGET, threat_model="perturbed", draws=3, keep_best=False)
    result = noise(images, features)
    change = result.features - features
    assert torch.equal(change[:, :2], torch.zeros_like(change[:, :2]))
    assert torch.allclose(change[:, 2:].abs(), 0.05 * features[:, 2:].abs(), rtol=1e-5)
    assert (change[:, 2:] > 0).any() and (change[:, 2:] < 0).any()  # random signs
    with torch.no_grad():
        assert torch.allclose(result.adversarial_prediction, model(result.images, result.features), atol=1e-4)
    # recomputed: the volumes measured on the noisy image.
    extractor = soft_extractor(images, features, labels)
    result = create_attack("noise", model, budget=BUDGET, threat_model="recomputed")(images, features,
                                                                                      extractor=extractor)
    assert torch.allclose(result.features, extractor(result.images), rtol=1e-5, atol=1e-5)
    # One draw: the same image noise as under fixed (the volumes' signs are drawn after it).
    fixed = create_attack("noise", model, budget=BUDGET, keep_best=False)(images, features)
    perturbed = create_attack("noise", model, budget=BUDGET, threat_model="perturbed", keep_best=False)
    assert torch.equal(fixed.images, perturbed(images, features).images)


def test_features_that_do_not_match_the_models_names_are_refused_clearly():
    model = context_model()
    images, features = context_batch()
    attack = create_attack("pgd", model, budget=BUDGET, threat_model="perturbed", steps=1, random_start=False)
    with pytest.raises(MedrobustError, match="names 5 context features but the batch has 3"):
        attack(images, features[:, :3])


def test_perturbed_volumes_stay_within_their_budget_exactly_in_float32():
    # Volumes of many magnitudes, pushed to the ends of their boxes: every move is within 0.05 x |value| as
    # float32 computes it, not only up to rounding.
    model = context_model()
    images, _ = context_batch()
    generator = torch.Generator().manual_seed(5)
    volumes = torch.exp(torch.empty(3, 3).uniform_(-3, 8, generator=generator))
    features = torch.cat([torch.tensor([[1.0, 3.0], [0.0, 1.5], [1.0, 3.0]]), volumes], dim=1)
    attack = create_attack("pgd", model, budget=BUDGET, threat_model="perturbed", steps=5, step_size=1.0,
                           random_start=False)
    result = attack(images, features)
    radius = 0.05 * features.abs()
    assert ((result.features - features).abs() <= radius).all()
    at_end = torch.isclose((result.features - features).abs()[:, 2:], radius[:, 2:], rtol=1e-5, atol=0)
    assert at_end.float().mean() > 0.5  # most volumes were pushed to an end of their box


def test_perturbed_refuses_a_model_that_does_not_name_its_features():
    # Which of its features are regional volumes (and which are sex or field strength, which never move) is
    # unknown: moving them all, as before, broke the threat model's promise.
    model = toy_model("conv2d")
    images, _, _, _ = toy_inputs("conv2d")
    with pytest.raises(MedrobustError, match="names none, so its sex or field strength would move too"):
        create_attack("pgd", model, budget={"epsilon": 0.02}, threat_model="perturbed", steps=2)(
            images, torch.tensor([[1.0, 25.0], [0.0, 40.0]]))
