"""Context features recomputed from an image, differentiably: what the `recomputed` threat model attacks through.

A segmentation pipeline measures regional volumes from the image, so an attacker who changes the image also
changes the volumes a hybrid model is given. `SoftVolumes` stands in for that pipeline on the model grid: each
voxel of a labelled region counts with a tissue probability given by its intensity (a sigmoid around a
threshold between CSF and tissue), so a darkened grey-matter voxel counts less and a brightened ventricle
voxel counts less too. The recomputed volume of a region is its clean volume times the ratio of soft volumes
(attacked / clean): it equals the clean feature exactly on the clean image, and gradients reach every voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Regions whose content is fluid, dark on T1: for them the probability is inverted.
FLUID_WORDS = ("ventric", "csf", "cerebrospinal")


class SoftVolumes:
    """Callable ``extractor(images) -> features [B, F]`` for one batch.

    ``labels``: int label maps on the model grid [B, 1, ...]; ``feature_labels``: per feature, the label id of
    its region or None (sex, field strength: kept at their clean values); ``feature_names`` decide which regions
    are fluid; ``clean_images`` and ``clean_features`` anchor the ratio. ``sharpness``: the sigmoid's width as a
    fraction of the CSF-to-tissue intensity gap of each image.
    """

    def __init__(self, labels: Tensor, feature_labels: Sequence[int | None], feature_names: Sequence[str],
                 clean_images: Tensor, clean_features: Tensor, sharpness: float = 0.25) -> None:
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
        self.width = (sharpness * (tissue_mean - liquid_mean).abs()).clamp_min(1e-6).unsqueeze(1)
        self.clean_features = clean_features
        self.clean_soft = self.soft_volumes(clean_images).detach()

    def soft_volumes(self, images: Tensor) -> Tensor:
        """Soft voxel counts per label [B, n_labels] (column 0, the background, is meaningless)."""
        flat = images.reshape(images.shape[0], -1)
        probability = torch.sigmoid((flat - self.threshold) / self.width)
        probability = torch.where(self.fluid_voxel, 1 - probability, probability)
        counts = torch.zeros(flat.shape[0], self.n_labels, dtype=flat.dtype, device=flat.device)
        return counts.scatter_add(1, self.index, probability)

    def __call__(self, images: Tensor) -> Tensor:
        soft = self.soft_volumes(images)[:, self.columns]
        clean = self.clean_soft[:, self.columns]
        ratio = torch.where(clean > 0, soft / clean.clamp_min(1e-12), torch.ones_like(soft))
        return torch.where(self.regional, self.clean_features * ratio, self.clean_features)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1)


def _masked_std(values: Tensor, mask: Tensor, mean: Tensor) -> Tensor:
    return (((values - mean.unsqueeze(1)) ** 2 * mask).sum(1) / mask.sum(1).clamp_min(1)).sqrt()
