"""Segmenters: networks that label every voxel of an image with a region, so that the regional volumes a hybrid
model is given can be measured from the image itself (``medrobust.attacks.extractors.SegmenterVolumes``, the
``segmenter`` extractor of the ``recomputed`` threat model).

A segmenter is not a brain-age model: it has its own registry (``register_segmenter``; ``seg_unet`` is built in),
is trained by ``medrobust train --model seg_unet`` on a dataset's label maps (``medrobust.training``), and is
saved as a checkpoint of kind ``segmenter`` (``medrobust.models.checkpoint``), which no age-model slot accepts.

Its classes are the background and groups of the regions it was trained on (``region_names``): a grouping
(``REGION_GROUPINGS``) puts regions together by name, e.g. the 166 AAL3 parcels and three tissue classes of the
built-in cohort into 21 lobes, nuclei and tissues (``lobes``, seg_unet's default), or keeps each region a class
(``regions``); a region no group names is a class of its own, a voxel of any other label is background.
``members`` says which regions each class holds. Volumes are in mL, as the data layer's ``vol_<region>`` features
are: the sum over voxels of each class's softmax probability (``soft_volumes``, differentiable) or the count of
voxels whose most probable class it is (``hard_volumes``), times the voxel volume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medrobust.errors import MedrobustError
from medrobust.models._registry import variant
from medrobust.models.base import ModelMeta, as_grid, as_normalization, as_voxel_size, as_widths, check_grid_image
from medrobust.registry import Registry

FactoryT = TypeVar("FactoryT", bound=Callable)

_segmenters = Registry("segmenter")


def register_segmenter(factory: FactoryT) -> FactoryT:
    """Record a segmenter factory under its function name (``@register_segmenter``)."""
    return _segmenters.register(factory)


def list_segmenters(pattern: str = "*") -> list[str]:
    """Registered segmenter names matching the shell-style ``pattern``, sorted."""
    return _segmenters.names(pattern)


def create_segmenter(name: str, **kwargs) -> Segmenter:
    """Build the registered segmenter ``name`` with constructor ``kwargs``."""
    return _segmenters.create(name, **kwargs)


def segmenter_entrypoint(name: str) -> Callable:
    """The factory registered as ``name``."""
    return _segmenters.entrypoint(name)


# Groupings of regions into a segmenter's classes: per group, its name and a pattern its regions' names match
# (re.fullmatch); the first group that matches takes a region. `lobes` groups the built-in cohort's AAL3 parcels
# (Rolls et al. 2020) by lobe, keeping the medial temporal lobe, the cingulate and insula, the deep grey nuclei
# and the cerebellum apart, and each hemisphere apart; its tissue classes stay classes of their own.
_SIDES = (("_L", "_L"), ("_R", "_R"))
_LOBES = (
    ("Frontal", r"(Precentral|Frontal_.*|Rolandic_Oper|Supp_Motor_Area|Olfactory|Rectus|OFC.*|Paracentral_Lobule)"),
    ("Temporal", r"(Temporal_.*|Heschl|Fusiform)"),
    ("Parietal", r"(Postcentral|Parietal_.*|SupraMarginal|Angular|Precuneus)"),
    ("Occipital", r"(Calcarine|Cuneus|Lingual|Occipital_.*)"),
    ("Medial_Temporal", r"(Hippocampus|ParaHippocampal|Amygdala)"),
    ("Cingulate_Insula", r"(Cingulate_.*|ACC_.*|Insula)"),
    ("Deep_Grey", r"(Caudate|Putamen|Pallidum|Thal_.*|N_Acc)"),
    ("Cerebellum", r"(Cerebellum_.*)"),
)
REGION_GROUPINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "lobes": tuple((f"{name}{side}", f"{pattern}{suffix}") for name, pattern in _LOBES for side, suffix in _SIDES)
    + (("Vermis", r"Vermis_.*"), ("Brainstem_Nuclei", r"(VTA|SN_pc|SN_pr|Red_N|LC|Raphe_.*)(_L|_R)?")),
    "regions": (),
}


def group_regions(region_names: Sequence[str], grouping: str) -> dict[str, list[str]]:
    """The classes of ``grouping`` over ``region_names``: class name -> its regions, in the order of the first
    region of each class; a region no group matches is a class of its own."""
    if grouping not in REGION_GROUPINGS:
        raise MedrobustError(f"grouping must be one of {', '.join(REGION_GROUPINGS)}, got {grouping!r}")
    members: dict[str, list[str]] = {}
    for region in region_names:
        group = next((name for name, pattern in REGION_GROUPINGS[grouping] if re.fullmatch(pattern, region)), region)
        members.setdefault(group, []).append(region)
    return members


def as_region_names(region_names: Sequence[str]) -> list[str]:
    """Validate a segmenter's region names: non-empty, unique strings (the background is implied)."""
    names = list(region_names or [])
    if not names or not all(isinstance(n, str) and n for n in names):
        raise MedrobustError(f"region_names must be a non-empty list of names, got {region_names!r}")
    if len(set(names)) != len(names):
        raise MedrobustError("region_names contains duplicates; each region must be named once")
    return names


class Segmenter(nn.Module):
    """Base of every segmenter: ``forward(image [B, 1, X, Y, Z]) -> logits [B, 1 + C, X, Y, Z]``, class 0 the
    background and class ``1 + c`` the regions ``members[class_names[c]]``. Subclasses implement ``logits``."""

    meta: ModelMeta
    kind: ClassVar[str] = "segmenter"  # what a checkpoint of it holds (medrobust.models.checkpoint.KINDS)
    # Batch norm needs two samples per training batch.
    min_training_batch: ClassVar[int] = 2

    def __init__(self, meta: ModelMeta, region_names: Sequence[str], grouping: str = "regions") -> None:
        super().__init__()
        self.meta = meta
        self.region_names = as_region_names(region_names)
        self.members = group_regions(self.region_names, grouping)
        self.class_names = list(self.members)

    def class_of(self, region: str) -> int | None:
        """The class index (0 for the first after the background) that measures ``region``: the class holding it,
        or the class of that name; None where the segmenter measures no such region."""
        for index, (name, regions) in enumerate(self.members.items()):
            if region == name or region in regions:
                return index
        return None

    @property
    def voxel_ml(self) -> float:
        """The volume of one voxel of the segmenter's grid in mL."""
        return math.prod(self.meta.voxel_size) / 1000.0

    def logits(self, image: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, image: Tensor) -> Tensor:
        return self.logits(check_grid_image(self.meta, image))

    def soft_volumes(self, image: Tensor) -> Tensor:
        """Per image and class [B, C], the sum of the class's softmax probability over the voxels, in mL:
        differentiable in the image."""
        logits = self(image)  # the softmax in at least fp32 (under autocast the logits may be bf16)
        probability = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)[:, 1:]
        return probability.flatten(2).sum(2) * self.voxel_ml

    def hard_volumes(self, image: Tensor) -> Tensor:
        """Per image and class [B, C], the voxels whose most probable class it is, in mL (piecewise constant in
        the image: no gradient flows through it)."""
        classes = self(image).argmax(1).flatten(1)
        counts = torch.zeros(classes.shape[0], 1 + len(self.class_names), device=classes.device)
        counts.scatter_add_(1, classes, torch.ones_like(classes, dtype=counts.dtype))
        return counts[:, 1:] * self.voxel_ml

    def labels(self, image: Tensor) -> Tensor:
        """The most probable class of every voxel [B, X, Y, Z] (0 the background, 1 + c the class c)."""
        return self(image).argmax(1)


def _block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm3d(channels_out), nn.ReLU(),
        nn.Conv3d(channels_out, channels_out, 3, padding=1, bias=False), nn.BatchNorm3d(channels_out), nn.ReLU())


class SegUNet(Segmenter):
    """A compact 3D U-Net (Ronneberger et al. 2015; Cicek et al. 2016): per level two 3x3x3 convolutions with
    batch norm, max pooling down, trilinear upsampling and a skip connection up, a 1x1x1 convolution to the classes.

    Its input is the image and three coordinate channels (each voxel's position on the grid, from -1 to 1, as in
    CoordConv, Liu et al. 2018): a parcellation is as much where a voxel is as what it looks like, and the built-in
    cohort's regions differ by position, not by contrast. ``filters``: the widths of the levels, from the finest;
    ``region_names``: the regions of the label maps it learns, put into classes by ``grouping``."""

    def __init__(self, input_shape: Sequence[int] = (48, 56, 48), voxel_size: Sequence[float] = (3.5, 3.5, 3.5),
                 normalization: str = "zscore_brain", region_names: Sequence[str] = ("region",),
                 grouping: str = "lobes", filters: Sequence[int] = (4, 8, 16, 32), name: str = "seg_unet") -> None:
        grid, size = as_grid(input_shape), as_voxel_size(voxel_size)
        widths = as_widths(filters, "filters")
        names = as_region_names(region_names)
        kwargs = {"input_shape": list(grid), "voxel_size": list(size), "normalization": as_normalization(normalization),
                  "region_names": names, "grouping": grouping, "filters": list(widths)}
        meta = ModelMeta(name=name, kwargs=kwargs, input_shape=grid, voxel_size=size, normalization=normalization)
        super().__init__(meta, names, grouping)
        axes = [torch.linspace(-1, 1, n) for n in grid]
        self.register_buffer("coordinates", torch.stack(torch.meshgrid(*axes, indexing="ij"))[None],
                             persistent=False)
        self.down = nn.ModuleList()
        channels = 1 + 3
        for width in widths:
            self.down.append(_block(channels, width))
            channels = width
        self.up = nn.ModuleList(_block(widths[level] + widths[level + 1], widths[level])
                                for level in reversed(range(len(widths) - 1)))
        self.head = nn.Conv3d(widths[0], 1 + len(self.class_names), 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv3d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def logits(self, image: Tensor) -> Tensor:
        x = torch.cat([image, self.coordinates.to(image.dtype).expand(image.shape[0], -1, -1, -1, -1)], 1)
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else F.max_pool3d(x, 2, ceil_mode=True))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([skip, x], 1))
        return self.head(x)


seg_unet = register_segmenter(variant(
    SegUNet, "seg_unet", "A compact 3D U-Net with coordinate channels (filters 4-8-16-32) that segments a dataset's "
                         "regions grouped into lobes, nuclei and tissues (grouping 'lobes')."))
seg_unet_regions = register_segmenter(variant(
    SegUNet, "seg_unet_regions", "seg_unet with every region of the label maps a class of its own (grouping "
                                 "'regions'; the built-in cohort's 169: slower to train).", grouping="regions"))
