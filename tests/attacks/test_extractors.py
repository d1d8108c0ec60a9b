"""Hard-threshold regional volumes (a non-differentiable extractor) and the straight-through (BPDA) extractor
that attacks through them with the soft volumes' gradient."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import Budget, create_attack
from medrobust.attacks.checks import (
    CONTEXT_FEATURE_NAMES,
    image_blind_context_model,
    labelled_batch,
)
from medrobust.attacks.extractors import HardVolumes, SoftVolumes, StraightThrough, make_extractor
from medrobust.errors import MedrobustError
from medrobust.vocabulary import LABEL_MAP_EXTRACTORS

FEATURE_LABELS = [None, None, 1, 3, 2]  # sex, field strength, then the volumes of labels 1, 3 ("ventricles"), 2
BUDGET = Budget("linf", 1e-2, "range")


def parts(images, features, labels):
    return (HardVolumes(labels, FEATURE_LABELS, CONTEXT_FEATURE_NAMES, images, features),
            SoftVolumes(labels, FEATURE_LABELS, CONTEXT_FEATURE_NAMES, images, features))


def attacked(images, labels):
    """A moved image: tissue darkened and the ventricle brightened, each by a different amount per voxel."""
    generator = torch.Generator().manual_seed(5)
    return images + 0.8 * torch.randn(images.shape, generator=generator) * (labels > 0)


def test_hard_volumes_count_whole_voxels_against_the_threshold():
    images, features, labels = labelled_batch()
    hard, _ = parts(images, features, labels)
    assert torch.equal(hard(images), features)  # the clean features on the clean images
    moved = attacked(images, labels)
    threshold = hard.threshold.view(-1, 1, 1, 1, 1)
    expected = features.clone()
    for column, label in ((2, 1), (3, 3), (4, 2)):
        # Tissue regions count their voxels above the threshold, the ventricle its voxels at or below it.
        counts = [((x > threshold) != (label == 3)) & (labels == label) for x in (moved, images)]
        ratio = counts[0].flatten(1).sum(1).double() / counts[1].flatten(1).sum(1).double()
        expected[:, column] = features[:, column] * ratio.float()
    assert torch.allclose(hard(moved), expected, rtol=1e-6)
    assert not torch.equal(hard(moved), features)


def test_hard_volumes_have_a_zero_gradient():
    images, features, labels = labelled_batch()
    hard, _ = parts(images, features, labels)
    leaf = attacked(images, labels).requires_grad_(True)
    (grad,) = torch.autograd.grad(hard(leaf).sum(), leaf)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_straight_through_has_the_hard_value_and_the_soft_gradient():
    images, features, labels = labelled_batch()
    hard, soft = parts(images, features, labels)
    bpda = StraightThrough(hard, soft)
    moved = attacked(images, labels)
    assert torch.equal(bpda(images), features)
    assert torch.equal(bpda(moved), hard(moved))  # exactly the hard extractor's value
    assert not torch.equal(bpda(moved), soft(moved))
    weights = torch.tensor([0.0, 0.0, 1.0, -2.0, 0.5])  # any weighting of the features
    grads = []
    for extractor in (bpda, soft):
        leaf = moved.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((extractor(leaf) * weights).sum(), leaf)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])  # exactly the soft extractor's gradient


def test_straight_through_is_exact_for_any_pair_of_extractors():
    # surrogate(x) + (extractor(x) - surrogate(x)) rounds away from extractor(x) for most values on different
    # scales; the straight-through value must not.
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(1000, generator=generator) * 100
    bpda = StraightThrough(lambda x: torch.sign(x).clamp_min(0) * 0.1 + x.detach() ** 2, lambda x: scale * x)
    x = torch.rand(1000, generator=generator).requires_grad_(True)
    value = bpda(x)
    assert torch.equal(value, 0.1 + x.detach() ** 2)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.equal(grad, scale)

    def unused(images):
        raise AssertionError("the surrogate ran where no gradient was wanted")

    forward_only = StraightThrough(lambda x: x * 2, unused)
    with torch.no_grad():
        assert torch.equal(forward_only(x), x.detach() * 2)
    assert torch.equal(forward_only(x.detach()), x.detach() * 2)


def test_an_attack_through_the_straight_through_extractor_moves_a_hybrid_the_hard_one_alone_cannot():
    # The hybrid sees the image only through its volumes, so the attack can only work through the extractor.
    model = image_blind_context_model()
    images, features, labels = labelled_batch()
    hard, soft = parts(images, features, labels)
    kwargs = {"budget": BUDGET, "threat_model": "recomputed", "steps": 4, "random_start": False}
    masked = create_attack("pgd", model, **kwargs)(images, features, extractor=hard)
    assert torch.equal(masked.images, images)  # a zero gradient: no step moves any voxel
    assert torch.equal(masked.adversarial_prediction, masked.clean_prediction)
    bpda = StraightThrough(hard, soft)
    result = create_attack("pgd", model, **kwargs)(images, features, extractor=bpda)
    assert (result.adversarial_prediction > result.clean_prediction).all()
    # The features the model was given are the hard volumes of the returned image.
    assert torch.equal(result.features, hard(result.images))
    assert not torch.equal(result.features, features)
    with torch.no_grad():
        assert torch.allclose(result.adversarial_prediction, model(result.images, result.features), atol=1e-4)


@pytest.mark.parametrize("name", LABEL_MAP_EXTRACTORS)
def test_make_extractor_builds_each_extractor_by_name(name):
    images, features, labels = labelled_batch()
    extractor = make_extractor(name, labels, FEATURE_LABELS, CONTEXT_FEATURE_NAMES, images, features)
    assert torch.equal(extractor(images), features)
    hard, soft = parts(images, features, labels)
    moved = attacked(images, labels)
    expected = {"soft": soft, "hard": hard, "hard-bpda": hard}[name](moved)
    assert torch.equal(extractor(moved), expected)
    assert extractor.to("cpu")(moved).shape == features.shape


def test_make_extractor_refuses_an_unknown_name():
    images, features, labels = labelled_batch()
    with pytest.raises(MedrobustError, match="extractor must be one of soft, hard, hard-bpda, segmenter.*got 'sharp'"):
        make_extractor("sharp", labels, FEATURE_LABELS, CONTEXT_FEATURE_NAMES, images, features)
