"""The paper's conventional 3D CNN: five [conv 3x3x3, ReLU, max-pool 2] blocks, then a dense head."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from medrobust.errors import MedrobustError
from medrobust.models._registry import register_model, variant
from medrobust.models.base import (
    BrainAgeModel,
    ModelMeta,
    as_grid,
    as_normalization,
    as_voxel_size,
    as_widths,
    dense_head,
    init_he,
)


class ConvTrunk(nn.Module):
    """[Conv3d 3x3x3 padding 1, ReLU, MaxPool3d 2] per filter count; no normalization layer (the paper)."""

    def __init__(self, input_shape: tuple[int, int, int], filters: Sequence[int]) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.filters = tuple(filters)
        self.output_shape = trunk_output_shape(input_shape, self.filters)
        layers: list[nn.Module] = []
        channels = 1
        for width in self.filters:
            layers += [nn.Conv3d(channels, width, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool3d(2)]
            channels = width
        self.layers = nn.Sequential(*layers)
        init_he(self.layers)

    @property
    def out_features(self) -> int:
        """Length of the flattened trunk output."""
        return math.prod(self.output_shape)

    def forward(self, image: Tensor) -> Tensor:
        """[B, 1, X, Y, Z] -> flattened features [B, T]."""
        return self.layers(image).flatten(1)


def trunk_output_shape(input_shape: Sequence[int], filters: Sequence[int]) -> tuple[int, int, int, int]:
    """(channels, x, y, z) after the trunk: padded convs keep the grid, each pool floors it by half."""
    grid = list(input_shape)
    for _ in filters:
        grid = [n // 2 for n in grid]
    if min(grid) < 1:
        raise MedrobustError(
            f"input_shape {tuple(input_shape)} is too small for {len(filters)} pooling blocks: "
            f"every side needs at least {2 ** len(filters)} voxels; use a larger grid or fewer filters"
        )
    return (filters[-1], *grid)


class CNN3d(BrainAgeModel):
    """Image-only brain-age CNN (Li et al. 2020's conventional network)."""

    def __init__(
        self,
        input_shape: Sequence[int] = (48, 56, 48),
        voxel_size: Sequence[float] = (3.5, 3.5, 3.5),
        normalization: str = "zscore_brain",
        filters: Sequence[int] = (8, 16, 32, 64, 128),
        dense: Sequence[int] = (128, 128),
        name: str = "cnn3d",
    ) -> None:
        grid = as_grid(input_shape)
        voxels = as_voxel_size(voxel_size)
        filters = as_widths(filters, "filters")
        dense = as_widths(dense, "dense")
        normalization = as_normalization(normalization)
        meta = ModelMeta.from_kwargs(
            name,
            {
                "input_shape": list(grid),
                "voxel_size": list(voxels),
                "normalization": normalization,
                "filters": list(filters),
                "dense": list(dense),
            },
            uses_image=True,
            uses_features=False,
        )
        super().__init__(meta)
        self.conv_trunk = ConvTrunk(grid, filters)
        self.head = dense_head(self.conv_trunk.out_features, dense)

    def trunk(self, image: Tensor) -> Tensor:
        """Flattened conv features [B, T] of an image [B, 1, X, Y, Z] (what the hybrid reuses)."""
        return self.conv_trunk(self.check_image(image))

    def predict_standardized(self, image: Tensor | None, features: Tensor | None) -> Tensor:
        return self.head(self.conv_trunk(image)).squeeze(1)


cnn3d = register_model(variant(
    CNN3d, "cnn3d", "The paper's conventional network on an image grid; the paper's grid is 172x220x156 at 1 mm."))
