"""The segmenter extractors of ``recomputed``: a trained segmenter segments the attacked image afresh, and the
attack's gradient flows image -> segmenter -> volumes -> model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medrobust.attacks import Budget, create_attack
from medrobust.attacks.checks import (
    CONTEXT_FEATURE_NAMES,
    context_batch,
    image_blind_context_model,
    segmenter_extractor,
    tiny_segmenter,
)
from medrobust.attacks.extractors import SegmenterVolumes, StraightThrough, make_extractor
from medrobust.data import load_prepared
from medrobust.data.cohort import synthesize
from medrobust.errors import MedrobustError
from medrobust.models.base import ModelMeta
from medrobust.models.segmenter import Segmenter
from medrobust.segmentation import class_lookup, labelled_regions, targets
from medrobust.settings import CohortSpec
from medrobust.vocabulary import SEGMENTER_EXTRACTORS, VOLUME_PREFIX

TINY = CohortSpec(n=4, seed=5, shape=(24, 28, 24), voxel_size=(7.0, 7.0, 7.0), age_range=(20.0, 80.0))


class LabelMapSegmenter(Segmenter):
    """A constructed segmenter whose output is the one-hot of the classes of ``data``'s label maps (times a logit
    large enough that its softmax is the one-hot to float precision), whatever the image."""

    def __init__(self, data, grouping: str = "regions"):
        meta = ModelMeta(name="label_map", kwargs={}, input_shape=TINY.shape, voxel_size=TINY.voxel_size)
        super().__init__(meta, labelled_regions(data), grouping)
        self.classes = targets(data, slice(None), class_lookup(self, data))

    def logits(self, image):
        one_hot = F.one_hot(self.classes, 1 + len(self.class_names)).permute(0, 4, 1, 2, 3)
        return 200.0 * one_hot.to(image.dtype) + 0 * image


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = synthesize(tmp_path_factory.mktemp("cohort") / "bids", TINY, progress=False)
    return load_prepared(root, progress=False)[2]


def test_a_segmenter_that_outputs_the_label_map_measures_the_label_map_volumes(cohort):
    segmenter = LabelMapSegmenter(cohort)
    measured = segmenter.soft_volumes(cohort.images)
    columns = [cohort.feature_names.index(f"{VOLUME_PREFIX}{name}") for name in labelled_regions(cohort)]
    # the cohort's volume features are counted on its label maps (written on this grid): the same volumes
    assert torch.allclose(measured, cohort.features[:, columns], rtol=1e-5, atol=1e-4)
    assert torch.equal(segmenter.hard_volumes(cohort.images), measured)
    # and the extractor gives the clean features exactly on the clean image
    extractor = SegmenterVolumes(segmenter, cohort.feature_names, cohort.images, cohort.features)
    assert torch.equal(extractor(cohort.images), cohort.features)


def test_grouped_classes_measure_the_sum_of_their_regions_and_move_them_together(cohort):
    segmenter = LabelMapSegmenter(cohort, grouping="lobes")
    assert len(segmenter.class_names) == 21 and "Hippocampus_L" in segmenter.members["Medial_Temporal_L"]
    assert sum(len(regions) for regions in segmenter.members.values()) == len(labelled_regions(cohort))
    measured = segmenter.soft_volumes(cohort.images)
    for index, regions in enumerate(segmenter.members.values()):
        columns = [cohort.feature_names.index(f"{VOLUME_PREFIX}{name}") for name in regions]
        assert torch.allclose(measured[:, index], cohort.features[:, columns].sum(1), rtol=1e-5, atol=1e-4)
    # an attacked segmentation: the class Medial_Temporal_L loses a fifth of its voxels' probability
    extractor = SegmenterVolumes(segmenter, cohort.feature_names, cohort.images, cohort.features)
    shrunk = segmenter.class_names.index("Medial_Temporal_L")
    extractor.volumes = lambda images: extractor.clean_volumes * torch.where(
        extractor.columns == shrunk, 0.8, 1.0)
    moved = extractor(cohort.images)
    for name in cohort.feature_names:
        column = cohort.feature_names.index(name)
        factor = 0.8 if name.removeprefix(VOLUME_PREFIX) in segmenter.members["Medial_Temporal_L"] else 1.0
        assert torch.allclose(moved[:, column], cohort.features[:, column] * factor), name


def test_the_extractor_gradient_matches_finite_differences():
    segmenter = tiny_segmenter().double()
    images, features = context_batch()
    images, features = images[:1].double(), features[:1].double()
    extractor = SegmenterVolumes(segmenter, CONTEXT_FEATURE_NAMES, images, features)
    weights = torch.tensor([[0.0, 0.0, 1.0, -2.0, 0.5]], dtype=torch.float64)
    leaf = images.clone().requires_grad_(True)
    (extractor(leaf) * weights).sum().backward()
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        voxel = tuple(int(torch.randint(0, n, (1,), generator=generator)) for n in images.shape[2:])
        step = torch.zeros_like(images)
        step[(0, 0, *voxel)] = 1e-5
        with torch.no_grad():
            numeric = ((extractor(images + step) - extractor(images - step)) * weights).sum() / 2e-5
        assert torch.allclose(leaf.grad[(0, 0, *voxel)], numeric, rtol=1e-4, atol=1e-9), voxel
    assert leaf.grad.abs().sum() > 0


def test_sex_and_field_strength_keep_their_value_and_the_volumes_follow_the_segmenter():
    images, features = context_batch()
    extractor = segmenter_extractor(images, features)
    moved = images + 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    measured = extractor(moved)
    assert torch.equal(measured[:, :2], features[:, :2])
    soft = extractor.segmenter.soft_volumes
    assert torch.allclose(measured[:, 2:], features[:, 2:] * soft(moved) / soft(images), rtol=1e-5)
    assert not torch.allclose(measured[:, 2:], features[:, 2:])


def test_the_hard_variants_count_the_argmax_with_no_gradient_or_with_the_soft_one():
    images, features = context_batch()
    hard = make_extractor("segmenter-hard", None, [], CONTEXT_FEATURE_NAMES, images, features,
                          segmenter=tiny_segmenter())
    bpda = make_extractor("segmenter-hard-bpda", None, [], CONTEXT_FEATURE_NAMES, images, features,
                          segmenter=tiny_segmenter())
    soft = make_extractor("segmenter", None, [], CONTEXT_FEATURE_NAMES, images, features, segmenter=tiny_segmenter())
    assert isinstance(bpda, StraightThrough)
    moved = images + 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    counts = tiny_segmenter().hard_volumes
    clean = counts(images)  # a region the segmenter finds empty on the clean image keeps its clean volume
    expected = torch.where(clean > 0, features[:, 2:] * counts(moved) / clean.clamp_min(1e-12), features[:, 2:])
    assert torch.allclose(hard(moved)[:, 2:], expected, rtol=1e-5)
    assert not torch.equal(hard(moved), features)
    assert torch.equal(bpda(moved), hard(moved))
    gradients = {}
    for name, extractor in (("hard", hard), ("bpda", bpda), ("soft", soft)):
        leaf = moved.clone().requires_grad_(True)
        extractor(leaf)[:, 2:].sum().backward()
        gradients[name] = leaf.grad
    assert torch.count_nonzero(gradients["hard"]) == 0
    assert torch.allclose(gradients["bpda"], gradients["soft"]) and gradients["soft"].abs().sum() > 0


def test_make_extractor_refuses_a_segmenter_extractor_without_a_segmenter_or_without_its_regions():
    images, features = context_batch()
    for name in SEGMENTER_EXTRACTORS:
        with pytest.raises(MedrobustError, match="needs a trained segmenter"):
            make_extractor(name, None, [], CONTEXT_FEATURE_NAMES, images, features)
    with pytest.raises(MedrobustError, match="measures none of the context features"):
        make_extractor("segmenter", None, [], ["sex", "vol_elsewhere"], images, features[:, :2],
                       segmenter=tiny_segmenter())
    with pytest.raises(MedrobustError, match="label map, and this batch has none"):
        make_extractor("soft", None, [], CONTEXT_FEATURE_NAMES, images, features)


def test_an_attack_fools_the_segmenter_to_move_an_image_blind_model():
    # The model sees the image only through the volumes the segmenter measures on it: the attack can move its
    # prediction only by changing the segmentation.
    model = image_blind_context_model()
    images, features = context_batch()
    extractor = segmenter_extractor(images, features)
    attack = create_attack("pgd", model, budget=Budget("linf", 0.05, "range"), objective="older",
                           threat_model="recomputed", steps=5, random_start=False)
    result = attack(images, features, extractor=extractor)
    assert (result.adversarial_prediction > result.clean_prediction + 1e-4).all()
    with torch.no_grad():
        assert torch.allclose(result.features, extractor(result.images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "bim", "apgd"])
def test_the_segmenter_runs_exactly_when_the_model_does(name):
    # No extra pass through the segmenter: one forward (and backward) of it per forward (and backward) of the model
    # in the attack, the clean volumes measured once when the extractor is built.
    model = image_blind_context_model()
    images, features = context_batch()
    extractor = segmenter_extractor(images, features)
    calls = {"model": [0, 0], "segmenter": [0, 0]}

    def counter(key):
        def hook(module, args, output):
            calls[key][0] += 1
            if output.requires_grad:
                output.register_hook(lambda _: calls[key].__setitem__(1, calls[key][1] + 1))
        return hook

    model.register_forward_hook(counter("model"))
    extractor.segmenter.register_forward_hook(counter("segmenter"))
    steps = {} if name == "fgsm" else {"steps": 3}
    attack = create_attack(name, model, budget=Budget("linf", 0.05, "range"), objective="older",
                           threat_model="recomputed", **steps)
    result = attack(images, features, extractor=extractor)
    assert calls["segmenter"] == calls["model"] == [result.forward, result.backward], calls
