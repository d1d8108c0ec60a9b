"""Context features recomputed from an image: what the `recomputed` threat model attacks through.

A segmentation pipeline measures regional volumes from the image, so an attacker who changes the image also
changes the volumes a hybrid model is given. `SoftVolumes` stands in for that pipeline on the model grid: each
voxel of a labelled region counts with a tissue probability given by its intensity (a sigmoid around a
threshold between CSF and tissue), so a darkened grey-matter voxel counts less and a brightened ventricle
voxel counts less too. The recomputed volume of a region is its clean volume times the ratio of soft volumes
(attacked / clean): it equals the clean feature exactly on the clean image, and gradients reach every voxel.

`HardVolumes` measures the same regions as a real pipeline does, with a hard threshold: a voxel counts or it
does not, so its gradient is zero everywhere (what a gradient-masking defence looks like to an attacker).
`StraightThrough` (BPDA, Athalye et al. 2018) gives such an extractor's exact values with a differentiable
surrogate's gradient; `make_extractor` builds any of them by name, for a config key.

`SegmenterVolumes` is the pipeline itself: a trained segmentation network (``medrobust.models.segmenter``)
segments the attacked image afresh, so the attacker can fool the segmentation too; its volumes are the sums of
the network's softmax probabilities per region (or, ``hard``, its argmax counts), and the gradient flows image ->
segmenter -> volumes -> model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from medrobust.errors import MedrobustError
from medrobust.models.segmenter import Segmenter
from medrobust.vocabulary import EXTRACTORS, SEGMENTER_EXTRACTORS, VOLUME_PREFIX

# Regions whose content is fluid, dark on T1: for them the probability is inverted.
FLUID_WORDS = ("ventric", "csf", "cerebrospinal")


class RegionVolumes:
    """Callable ``extractor(images) -> features [B, F]`` for one batch: the regional volumes re-measured from
    ``images``, each its clean value times the ratio of tissue counts (measured / clean) in its region.

    ``labels``: int label maps on the model grid [B, 1, ...]; ``feature_labels``: per feature, the label id of
    its region or None (sex, field strength: kept at their clean values); ``feature_names`` decide which regions
    are fluid; ``clean_images`` and ``clean_features`` anchor the ratio. The threshold between CSF and tissue is
    midway between the mean intensities of each image's tissue and fluid regions. Subclasses say how much a
    voxel counts (``probability``).
    """

    def __init__(self, labels: Tensor, feature_labels: Sequence[int | None], feature_names: Sequence[str],
                 clean_images: Tensor, clean_features: Tensor) -> None:
        batch = labels.shape[0]
        self.index = labels.reshape(batch, -1).long()
        self.n_labels = int(self.index.max()) + 1 if self.index.numel() else 1
        columns = [label if label is not None and 0 < label < self.n_labels else 0 for label in feature_labels]
        self.columns = torch.tensor(columns, device=labels.device)
        self.regional = torch.tensor([c > 0 for c in columns], device=labels.device)
        fluid_ids = {label for label, name in zip(feature_labels, feature_names, strict=True)
                     if label is not None and any(word in name.lower() for word in FLUID_WORDS)}
        fluid = torch.zeros(self.n_labels, dtype=torch.bool, device=labels.device)
        for label in fluid_ids:
            if 0 < label < self.n_labels:
                fluid[label] = True
        self.fluid_voxel = fluid[self.index]  # [B, V]
        flat = clean_images.reshape(batch, -1)
        inside = self.index > 0
        tissue, liquid = inside & ~self.fluid_voxel, inside & self.fluid_voxel
        tissue_mean = _masked_mean(flat, tissue)
        # Without fluid regions, the threshold sits below the tissue mean by its spread.
        liquid_mean = torch.where(liquid.any(1), _masked_mean(flat, liquid),
                                  tissue_mean - 2 * _masked_std(flat, tissue, tissue_mean))
        self.threshold = ((tissue_mean + liquid_mean) / 2).unsqueeze(1)
        self.gap = (tissue_mean - liquid_mean).abs().unsqueeze(1)  # the CSF-to-tissue intensity gap
        self.clean_features = clean_features
        self.clean_counts = self.counts(clean_images).detach()

    def probability(self, flat: Tensor) -> Tensor:
        """How much each voxel of ``flat`` [B, V] counts as tissue, from 0 to 1."""
        raise NotImplementedError

    def counts(self, images: Tensor) -> Tensor:
        """Tissue counts per label [B, n_labels], fluid regions counting fluid (column 0, the background, is
        meaningless)."""
        flat = images.reshape(images.shape[0], -1)
        probability = self.probability(flat)
        probability = torch.where(self.fluid_voxel, 1 - probability, probability)
        counts = torch.zeros(flat.shape[0], self.n_labels, dtype=flat.dtype, device=flat.device)
        return counts.scatter_add(1, self.index, probability)

    def __call__(self, images: Tensor) -> Tensor:
        return rescaled(self.clean_features, self.regional, self.counts(images)[:, self.columns],
                        self.clean_counts[:, self.columns])

    def to(self, device: torch.device | str) -> RegionVolumes:
        """This extractor with its tensors on ``device`` (itself when they are there already)."""
        if self.index.device == torch.device(device):
            return self
        moved = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(moved, key, value.to(device))
        return moved


class SoftVolumes(RegionVolumes):
    """Differentiable regional volumes: each voxel counts with the sigmoid of its distance to the threshold.

    ``sharpness``: the sigmoid's width as a fraction of the CSF-to-tissue intensity gap of each image.
    """

    def __init__(self, labels: Tensor, feature_labels: Sequence[int | None], feature_names: Sequence[str],
                 clean_images: Tensor, clean_features: Tensor, sharpness: float = 0.25) -> None:
        self.sharpness = sharpness
        super().__init__(labels, feature_labels, feature_names, clean_images, clean_features)

    @property
    def width(self) -> Tensor:
        return (self.sharpness * self.gap).clamp_min(1e-6)

    @property
    def clean_soft(self) -> Tensor:
        """Soft voxel counts per label of the clean images [B, n_labels]."""
        return self.clean_counts

    def probability(self, flat: Tensor) -> Tensor:
        return torch.sigmoid((flat - self.threshold) / self.width)

    def soft_volumes(self, images: Tensor) -> Tensor:
        """Soft voxel counts per label [B, n_labels] (column 0, the background, is meaningless)."""
        return self.counts(images)


class HardVolumes(RegionVolumes):
    """Regional volumes as a segmentation measures them: a voxel above the threshold is tissue (at or below it,
    fluid), whole or not at all. Piecewise constant in the image: its gradient is zero wherever it exists (it is
    computed as such, so autograd runs through it and returns zeros)."""

    def probability(self, flat: Tensor) -> Tensor:
        # sign() has a zero derivative: the counts stay in the autograd graph with an exactly zero gradient.
        return torch.sign(flat - self.threshold).clamp_min(0)


class StraightThrough:
    """BPDA (backward-pass differentiable approximation, Athalye et al. 2018): the forward value of
    ``extractor`` (non-differentiable, e.g. ``HardVolumes``) with the gradient of ``surrogate`` (differentiable,
    e.g. ``SoftVolumes`` over the same regions), so a gradient attack can go through a masked extractor.

    Computed as extractor(x) + (surrogate(x) - surrogate(x).detach()): the bracket is exactly zero, so the value
    is the extractor's bit for bit (the form surrogate(x) + (extractor(x) - surrogate(x)).detach() can differ
    from it by a rounding), and its gradient is the surrogate's alone. Where no gradient can flow (under
    ``torch.no_grad()`` or for images that do not require one, as in an attack's forward-only predictions), the
    surrogate is not evaluated.
    """

    def __init__(self, extractor: Callable[[Tensor], Tensor], surrogate: Callable[[Tensor], Tensor]) -> None:
        self.extractor = extractor
        self.surrogate = surrogate

    def __call__(self, images: Tensor) -> Tensor:
        value = self.extractor(images).detach()
        if not (torch.is_grad_enabled() and images.requires_grad):  # no gradient wanted: the surrogate is moot
            return value
        approximation = self.surrogate(images)
        return value + (approximation - approximation.detach())

    def to(self, device: torch.device | str) -> StraightThrough:
        """This extractor with both parts' tensors on ``device`` (parts without ``to`` are kept as they are)."""
        parts = [part.to(device) if hasattr(part, "to") else part for part in (self.extractor, self.surrogate)]
        return StraightThrough(*parts)


def rescaled(clean_features: Tensor, regional: Tensor, measured: Tensor, clean_measured: Tensor) -> Tensor:
    """The features [B, F] of an attacked image: each regional one (``regional`` [F]) its clean value times the
    ratio of what is measured on the attacked image to what is measured on the clean one (both [B, F]), so the
    clean image gives the clean features exactly; the others (and a region measured as empty) keep their value."""
    ratio = torch.where(clean_measured > 0, measured / clean_measured.clamp_min(1e-12), torch.ones_like(measured))
    # A missing value (NaN: a field strength not recorded, a volume not measured) stays missing; it is kept out of
    # the product, whose gradient would otherwise be NaN x 0 = NaN for every voxel.
    known = regional & torch.isfinite(clean_features)
    scaled = torch.where(known, clean_features, 0) * ratio
    return torch.where(known, scaled, clean_features)


class SegmenterVolumes:
    """Callable ``extractor(images) -> features [B, F]``: the regional volumes a trained ``segmenter`` measures on
    ``images``, each feature ``vol_<region>`` its clean value times the ratio of the segmenter's volume of the
    region's class (the region itself, or the group that holds it) on the attacked image to that on the clean one:
    the regions of one class move together. A model trained on the segmenter's own volumes (``vol_<class>``, as
    ``medrobust segment`` writes them) gets exactly the segmenter's volumes. Features that name no region of the
    segmenter (sex, field strength) keep their clean values.

    ``hard``: the segmenter's argmax counts instead of its softmax sums; piecewise constant in the image, so its
    gradient is zero (kept in the autograd graph as such); ``StraightThrough`` gives it the soft volumes' gradient.
    """

    def __init__(self, segmenter: Segmenter, feature_names: Sequence[str], clean_images: Tensor,
                 clean_features: Tensor, hard: bool = False) -> None:
        self.segmenter, self.hard = segmenter, hard
        classes = [segmenter.class_of(name.removeprefix(VOLUME_PREFIX)) if name.startswith(VOLUME_PREFIX) else None
                   for name in feature_names]
        columns = [-1 if index is None else index for index in classes]
        if all(column < 0 for column in columns):
            raise MedrobustError(f"the segmenter {segmenter.meta.name} measures none of the context features (its "
                                 f"classes {', '.join(segmenter.class_names[:4])}..., the features "
                                 f"{', '.join(list(feature_names)[:4])}...): give the segmenter trained on this "
                                 f"dataset's regions")
        device = clean_images.device
        self.regional = torch.tensor([column >= 0 for column in columns], device=device)
        self.columns = torch.tensor([max(column, 0) for column in columns], device=device)
        self.clean_features = clean_features
        with torch.no_grad():
            self.clean_volumes = self.volumes(clean_images)

    def volumes(self, images: Tensor) -> Tensor:
        """The segmenter's volume of each feature's region [B, F] (a non-regional feature's column is a
        placeholder)."""
        if not self.hard:
            return self.segmenter.soft_volumes(images)[:, self.columns]
        with torch.no_grad():
            counts = self.segmenter.hard_volumes(images)[:, self.columns]
        return counts + 0 * images.flatten(1)[:, :1]  # zero gradient, in the graph (as HardVolumes)

    def __call__(self, images: Tensor) -> Tensor:
        return rescaled(self.clean_features, self.regional, self.volumes(images), self.clean_volumes)

    def to(self, device: torch.device | str) -> SegmenterVolumes:
        """This extractor with its tensors (and segmenter) on ``device``."""
        moved = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, (Tensor, torch.nn.Module)):
                setattr(moved, key, value.to(device))
        return moved


# soft: differentiable soft volumes. hard: hard-threshold volumes alone (zero gradient: an attack through it
# sees only the model's own image pathway). hard-bpda: hard-threshold values with the soft volumes' gradient.
# segmenter, segmenter-hard, segmenter-hard-bpda: the same three with a trained segmenter's volumes.


def make_extractor(name: str, labels: Tensor | None, feature_labels: Sequence[int | None],
                   feature_names: Sequence[str], images: Tensor, features: Tensor,
                   segmenter: Segmenter | None = None) -> Callable[[Tensor], Tensor]:
    """The extractor called ``name`` (see ``EXTRACTORS``) for one batch: its label maps [B, 1, ...] on the
    images' grid and device, each feature's label id (None: not a region), the feature names, the clean images
    and clean features; ``segmenter`` (on the images' device) for the segmenter extractors, which need no label
    map."""
    if name in SEGMENTER_EXTRACTORS:
        if segmenter is None:
            raise MedrobustError(f"extractor {name!r} needs a trained segmenter (the run's `segmenter` checkpoint)")
        if name == "segmenter-hard-bpda":
            return StraightThrough(SegmenterVolumes(segmenter, feature_names, images, features, hard=True),
                                   SegmenterVolumes(segmenter, feature_names, images, features))
        return SegmenterVolumes(segmenter, feature_names, images, features, hard=name == "segmenter-hard")
    if labels is None:
        raise MedrobustError(f"extractor {name!r} measures the volumes over each subject's label map, and this "
                             f"batch has none")
    if name == "soft":
        return SoftVolumes(labels, feature_labels, feature_names, images, features)
    if name == "hard":
        return HardVolumes(labels, feature_labels, feature_names, images, features)
    if name == "hard-bpda":
        return StraightThrough(HardVolumes(labels, feature_labels, feature_names, images, features),
                               SoftVolumes(labels, feature_labels, feature_names, images, features))
    raise MedrobustError(f"extractor must be one of {', '.join(EXTRACTORS)}, got {name!r}")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1)


def _masked_std(values: Tensor, mask: Tensor, mean: Tensor) -> Tensor:
    return (((values - mean.unsqueeze(1)) ** 2 * mask).sum(1) / mask.sum(1).clamp_min(1)).sqrt()
