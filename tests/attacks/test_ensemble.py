"""The ensemble: the worst case per subject over its members, at the sum of their costs."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import create_attack
from medrobust.attacks.checks import BUDGETS, context_batch, context_model, toy_inputs, toy_model
from medrobust.attacks.ensemble import PROBE_STEPS
from medrobust.errors import MedrobustError

MEMBERS = [{"name": "pgd", "steps": 3}, {"name": "fgsm"}, {"name": "square", "queries": 10}]


def inputs():
    images, features, ages, mask = toy_inputs("cnn3d")
    return toy_model("cnn3d"), images, ages, mask


@pytest.mark.parametrize("objective", ["older", "deviation", "error"])
def test_each_subject_gets_its_worst_member_at_the_sum_of_their_costs(objective: str) -> None:
    model, images, ages, mask = inputs()
    ensemble = create_attack("ensemble", model, budget=BUDGETS["linf"], objective=objective, members=MEMBERS,
                             probe=False)
    result = ensemble(images, None, ages, mask)
    scores, costs = [], [0, 0, 0]
    for index, spec in enumerate(MEMBERS):
        arguments = {key: value for key, value in spec.items() if key != "name"}
        # Member i is the same attack on its own, drawing from seed + i.
        alone = create_attack(spec["name"], model, budget=BUDGETS["linf"], objective=objective, seed=index,
                              **arguments)(images, None, ages, mask)
        scores.append(score_of(objective, alone.adversarial_prediction, alone.clean_prediction, ages))
        for position, count in enumerate((alone.forward, alone.backward, alone.steps)):
            costs[position] += count
    ours = score_of(objective, result.adversarial_prediction, result.clean_prediction, ages)
    assert torch.allclose(ours, torch.stack(scores).amax(dim=0), atol=1e-4)
    # The members' passes, plus the ensemble's own clean and final prediction: nothing hidden.
    assert (result.forward, result.backward, result.steps) == (costs[0] + 2, costs[1], costs[2])
    won = torch.stack([value for key, value in result.diagnostics.items() if key.startswith("won:")])
    assert torch.equal(won.sum(dim=0), torch.ones(2))  # one winner per subject (no member lost to the clean)


def score_of(objective, prediction, clean, ages):
    from medrobust.attacks.objectives import objective_score

    return objective_score(objective, prediction, clean, ages)


def test_the_defaults_push_a_two_sided_objective_both_ways_and_the_probe_is_counted() -> None:
    model, images, ages, mask = inputs()
    one_sided = create_attack("ensemble", model, budget=BUDGETS["linf"])
    assert one_sided.member_labels() == ["apgd", "square"]
    two_sided = create_attack("ensemble", model, budget=BUDGETS["linf"], objective="error")
    assert two_sided.member_labels() == ["apgd/older", "apgd/younger", "square"]
    assert create_attack("ensemble", model, budget=BUDGETS["l0"], objective="deviation").member_labels() == [
        "l0/older", "l0/younger", "l0 ranking=gradient/older", "l0 ranking=gradient/younger"]
    repeated = create_attack("ensemble", model, budget=BUDGETS["linf"], members=[{"name": "fgsm"}, {"name": "fgsm"}])
    assert repeated.member_labels() == ["fgsm", "fgsm #2"]
    members = [{"name": "fgsm"}]
    with_probe = create_attack("ensemble", model, budget=BUDGETS["linf"], members=members)(images, mask=mask)
    without = create_attack("ensemble", model, budget=BUDGETS["linf"], members=members, probe=False)(
        images, mask=mask)
    # Two directions of PROBE_STEPS steps from the clean image, each with its final prediction.
    assert with_probe.backward - without.backward == 2 * PROBE_STEPS
    assert with_probe.forward - without.forward == 2 * (PROBE_STEPS + 1)
    assert torch.equal(with_probe.images, without.images)  # the probe never enters the result
    assert (with_probe.diagnostics["unbounded_shift"] > 100).all()  # a healthy model moves far


def test_members_that_do_not_fit_the_setting_are_left_out_and_bad_members_are_one_line() -> None:
    model = context_model()
    perturbed = create_attack("ensemble", model, budget=BUDGETS["linf"], threat_model="perturbed")
    assert perturbed.member_labels() == ["apgd"]  # square queries the image only
    images, features = context_batch()
    result = perturbed(images, features)
    assert not torch.equal(result.features, features)
    plain = toy_model("cnn3d")
    for members, message in [
        ([{"name": "sideways"}], "is not a registered attack"),
        ([{"name": "ensemble"}], "is not a registered attack"),
        ([{"name": "pgd", "budget": {"epsilon": 1}}], "sets budget, which the ensemble shares"),
        ([], "non-empty list"),
        (["pgd"], "must be a table"),
        ([{"name": "pgd", "stpes": 3}], "ensemble member 'pgd'"),
        ([{"name": "l0"}], "no ensemble member supports budget norm 'linf'"),
    ]:
        with pytest.raises(MedrobustError, match=message):
            create_attack("ensemble", plain, budget=BUDGETS["linf"], members=members)


def test_without_keep_best_each_subject_gets_a_member_image() -> None:
    model, images, ages, mask = inputs()
    result = create_attack("ensemble", model, budget=BUDGETS["linf"], objective="younger", members=MEMBERS,
                           probe=False, keep_best=False)(images, None, ages, mask)
    assert (result.images != images).flatten(1).any(dim=1).all()
