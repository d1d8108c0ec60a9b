"""Segmenters: the built-in seg_unet, its volumes, its checkpoints (a kind of their own), and its training on the
built-in cohort's label maps."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks.checks import tiny_segmenter
from medrobust.errors import MedrobustError
from medrobust.models import load_checkpoint, save_checkpoint
from medrobust.models.checks import tiny_model
from medrobust.models.segmenter import create_segmenter, list_segmenters
from medrobust.segmentation import confusion_counts, dice_from_counts, segmentation_loss


def test_seg_unet_gives_a_class_per_voxel_and_refuses_another_grid():
    segmenter = tiny_segmenter()
    images = torch.randn(2, 1, 32, 32, 32)
    logits = segmenter(images)
    assert logits.shape == (2, 1 + 3, 32, 32, 32)
    with pytest.raises(MedrobustError, match=r"expects images on the grid \(32, 32, 32\)"):
        segmenter(torch.randn(2, 1, 16, 32, 32))
    assert list_segmenters() == ["seg_unet", "seg_unet_regions"]


def test_soft_volumes_share_out_every_voxel_and_hard_volumes_count_the_argmax():
    segmenter = tiny_segmenter()
    images = torch.randn(2, 1, 32, 32, 32)
    probability = torch.softmax(segmenter(images), 1)
    soft = segmenter.soft_volumes(images)
    # background + regions = every voxel, in mL (6 mm voxels: 0.216 mL each)
    total = soft.sum(1) + probability[:, 0].sum((1, 2, 3)) * 0.216
    assert torch.allclose(total, torch.full((2,), 32**3 * 0.216), rtol=1e-5)
    hard = segmenter.hard_volumes(images)
    classes = segmenter.labels(images)
    for region in range(3):
        assert torch.equal(hard[:, region], (classes == region + 1).sum((1, 2, 3)).float() * 0.216)


def test_a_segmenter_checkpoint_round_trips_and_is_no_age_model(tmp_path):
    segmenter = tiny_segmenter()
    save_checkpoint(segmenter, tmp_path / "seg")
    loaded, sidecar = load_checkpoint(tmp_path / "seg", kind="segmenter")
    assert sidecar["kind"] == "segmenter" and sidecar["target_scaling"] is None
    assert loaded.region_names == segmenter.region_names
    images = torch.randn(1, 1, 32, 32, 32)
    assert torch.equal(loaded(images), segmenter(images))
    with pytest.raises(MedrobustError, match="holds a segmenter, not a brain-age model"):
        load_checkpoint(tmp_path / "seg")
    save_checkpoint(tiny_model("cnn3d"), tmp_path / "age")
    with pytest.raises(MedrobustError, match="holds a brain-age model, not a segmenter"):
        load_checkpoint(tmp_path / "age", kind="segmenter")


def test_region_names_are_checked():
    with pytest.raises(MedrobustError, match="region_names contains duplicates"):
        create_segmenter("seg_unet", region_names=["a", "a"])
    with pytest.raises(MedrobustError, match="region_names must be a non-empty list"):
        create_segmenter("seg_unet", region_names=[])


def test_dice_counts_overlap_per_class_and_the_loss_is_zero_when_certain():
    predicted = torch.tensor([[0, 1, 1, 2]])
    target = torch.tensor([[0, 1, 2, 2]])
    dice = dice_from_counts(confusion_counts(predicted, target, 4))
    assert torch.allclose(dice[:3], torch.tensor([1.0, 2 / 3, 2 / 3], dtype=torch.float64))
    assert torch.isnan(dice[3])  # neither predicted nor true
    certain = torch.nn.functional.one_hot(target, 3).permute(0, 2, 1).float() * 40
    assert float(segmentation_loss(certain, target)) < 1e-6
    wrong = certain.roll(1, dims=1)  # certain of a wrong class everywhere: Dice near 0, cross-entropy large
    assert float(segmentation_loss(wrong, target)) > 40
    # the Dice term as a one-hot copy of the target computes it
    probability = torch.softmax(wrong, 1)
    one_hot = torch.nn.functional.one_hot(target, 3).permute(0, 2, 1).float()
    dice = (2 * (probability * one_hot).sum((0, 2)) + 1) / (probability.sum((0, 2)) + one_hot.sum((0, 2)) + 1)
    cross_entropy = torch.nn.functional.cross_entropy(wrong, target)
    assert torch.allclose(segmentation_loss(wrong, target), cross_entropy + 1 - dice[1:].mean())
