"""SFCN (Peng et al. 2021, "Accurate brain age prediction with lightweight deep neural networks", Medical Image
Analysis 68): the UK Biobank brain-age network. Blocks of [conv 3x3x3, batch norm, max-pool 2, ReLU], a last
[conv 1x1x1, batch norm, ReLU] block, global average pooling, dropout, and a 1x1x1 convolution to one logit per
age bin; the predicted age is the softmax-weighted mean of the bin centres (the paper's soft-label output),
differentiable, so attacks go through it. Written from the paper's description.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medrobust.errors import MedrobustError
from medrobust.models._registry import register_model, variant
from medrobust.models.base import BrainAgeModel, ModelMeta, as_grid, as_normalization, as_voxel_size, as_widths


class SFCN(BrainAgeModel):
    """Image-only brain-age network with a binned (soft-label) output over ``age_range`` in ``bins`` bins.

    ``channels``: the widths of the blocks; all but the last are pooled, so every side of ``input_shape`` needs
    at least 2^(len(channels) - 1) voxels (the paper: 32, 64, 128, 256, 256, 64 on 160x192x160 at 1 mm).
    """

    min_training_batch = 2  # batch norm over a 1-voxel map in training mode needs two samples

    def __init__(
        self,
        input_shape: Sequence[int] = (48, 56, 48),
        voxel_size: Sequence[float] = (3.5, 3.5, 3.5),
        normalization: str = "zscore_brain",
        channels: Sequence[int] = (32, 64, 128, 256, 256, 64),
        bins: int = 40,
        age_range: Sequence[float] = (0.0, 100.0),
        dropout: float = 0.5,
        name: str = "sfcn",
    ) -> None:
        grid = as_grid(input_shape)
        voxels = as_voxel_size(voxel_size)
        normalization = as_normalization(normalization)
        channels = as_widths(channels, "channels")
        low, high = (float(a) for a in age_range)
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2 or not low < high:
            raise MedrobustError(f"sfcn needs bins >= 2 and age_range LOW < HIGH, got {bins!r} and {age_range!r}")
        if min(grid) < 2 ** (len(channels) - 1):
            raise MedrobustError(f"input_shape {grid} is too small for sfcn's {len(channels) - 1} pooling blocks: "
                                 f"every side needs at least {2 ** (len(channels) - 1)} voxels")
        if not 0.0 <= float(dropout) < 1.0:
            raise MedrobustError(f"dropout must be in [0, 1), got {dropout!r}")
        meta = ModelMeta.from_kwargs(
            name,
            {"input_shape": list(grid), "voxel_size": list(voxels), "normalization": normalization,
             "channels": list(channels), "bins": bins, "age_range": [low, high], "dropout": float(dropout)},
            uses_image=True,
            uses_features=False,
        )
        super().__init__(meta)
        layers: list[nn.Module] = []
        width = 1
        for i, out in enumerate(channels):
            last = i == len(channels) - 1
            layers += [nn.Conv3d(width, out, kernel_size=1 if last else 3, padding=0 if last else 1),
                       nn.BatchNorm3d(out)]
            layers += [nn.ReLU()] if last else [nn.MaxPool3d(2), nn.ReLU()]
            width = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Dropout(float(dropout)),
                                        nn.Conv3d(width, bins, kernel_size=1))
        step = (high - low) / bins
        self.register_buffer("bin_centres", low + step / 2 + step * torch.arange(bins, dtype=torch.float32))

    def predict_standardized(self, image: Tensor | None, features: Tensor | None) -> Tensor:
        logits = self.classifier(self.features(image)).flatten(1)
        age = torch.softmax(logits, dim=1) @ self.bin_centres
        return (age - self.age_mean) / self.age_std  # the base maps it back to years: the expected age


sfcn = register_model(variant(SFCN, "sfcn", "SFCN (Peng et al. 2021): the UK Biobank brain-age network, a binned "
                                            "soft-label output over the age range."))
