"""The "structural only" baseline: an MLP on the standardized anatomical context features."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from medrobust.models._registry import register_model, variant
from medrobust.models.base import (
    BrainAgeModel,
    ModelMeta,
    as_feature_names,
    as_grid,
    as_normalization,
    as_voxel_size,
    as_widths,
    dense_head,
)


class FeaturesMLP(BrainAgeModel):
    """Context features only; the image is ignored (may be None).

    The grid, voxel size and normalization are recorded only so that the runner prepares the same data for
    every model of a comparison.
    """

    def __init__(
        self,
        feature_names: Sequence[str] | None = None,
        hidden: Sequence[int] = (128, 128),
        input_shape: Sequence[int] = (48, 56, 48),
        voxel_size: Sequence[float] = (3.5, 3.5, 3.5),
        normalization: str = "zscore_brain",
        name: str = "features_mlp",
    ) -> None:
        names = as_feature_names(feature_names)
        hidden = as_widths(hidden, "hidden")
        grid = as_grid(input_shape)
        voxels = as_voxel_size(voxel_size)
        normalization = as_normalization(normalization)
        meta = ModelMeta.from_kwargs(
            name,
            {
                "feature_names": list(names),
                "hidden": list(hidden),
                "input_shape": list(grid),
                "voxel_size": list(voxels),
                "normalization": normalization,
            },
            uses_image=False,
            uses_features=True,
        )
        super().__init__(meta)
        self.head = dense_head(len(names), hidden)

    def predict_standardized(self, image: Tensor | None, features: Tensor | None) -> Tensor:
        return self.head(features).squeeze(1)


features_mlp = register_model(variant(
    FeaturesMLP, "features_mlp", 'MLP on the context features alone (the paper\'s "features only" baseline).'))
