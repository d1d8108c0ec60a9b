"""The paper's context-aware hybrid: cnn3d conv trunk plus anatomical context features into a dense head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medrobust.errors import MedrobustError
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
from medrobust.models.cnn3d import CNN3d, ConvTrunk


class HybridModel(BrainAgeModel):
    """Conv trunk features, affinely scaled to [-1, 1] and de-meaned, concatenated with the standardized
    context features, into a dense head.

    Two recipes share this class: ``hybrid`` (the paper's two-stage recipe: trunk copied from a trained cnn3d
    and frozen) and ``hybrid_e2e`` (trunk trained end to end from scratch).
    """

    def __init__(
        self,
        feature_names: Sequence[str] | None = None,
        input_shape: Sequence[int] = (48, 56, 48),
        voxel_size: Sequence[float] = (3.5, 3.5, 3.5),
        normalization: str = "zscore_brain",
        filters: Sequence[int] = (8, 16, 32, 64, 128),
        dense: Sequence[int] = (128, 128),
        trunk_frozen: bool = True,
        name: str = "hybrid",
    ) -> None:
        names = as_feature_names(feature_names)
        grid = as_grid(input_shape)
        voxels = as_voxel_size(voxel_size)
        normalization = as_normalization(normalization)
        filters = as_widths(filters, "filters")
        dense = as_widths(dense, "dense")
        trunk_frozen = bool(trunk_frozen)
        meta = ModelMeta.from_kwargs(
            name,
            {
                "feature_names": list(names),
                "input_shape": list(grid),
                "voxel_size": list(voxels),
                "normalization": normalization,
                "filters": list(filters),
                "dense": list(dense),
                "trunk_frozen": trunk_frozen,
            },
            uses_image=True,
            uses_features=True,
        )
        super().__init__(meta)
        self.trunk_frozen = trunk_frozen
        self.conv_trunk = ConvTrunk(grid, filters)
        n_trunk = self.conv_trunk.out_features
        # Identity scaling until set from training-set trunk features (the end-to-end default).
        self.register_buffer("trunk_min", torch.full((n_trunk,), -1.0))
        self.register_buffer("trunk_max", torch.ones(n_trunk))
        self.register_buffer("trunk_mean", torch.zeros(n_trunk))
        self.head = dense_head(n_trunk + len(names), dense)
        if trunk_frozen:
            self.conv_trunk.requires_grad_(False)

    @classmethod
    def from_cnn3d(cls, cnn: CNN3d, feature_names: Sequence[str], **kwargs) -> HybridModel:
        """Two-stage hybrid on the grid of a trained ``cnn``: its trunk copied (frozen unless
        ``trunk_frozen=False``) and its target scaling taken over (same training cohort); a fresh head."""
        arch = {k: cnn.meta.kwargs[k] for k in ("input_shape", "voxel_size", "normalization", "filters")}
        model = cls(feature_names=feature_names, **{**arch, **kwargs})
        model.load_trunk_from(cnn)
        model.set_target_scaling(float(cnn.age_mean), float(cnn.age_std))
        return model

    def load_trunk_from(self, cnn: CNN3d) -> None:
        """Copy the conv trunk weights of a trained cnn3d of the same grid and filters."""
        if not isinstance(cnn, CNN3d):
            raise MedrobustError(f"the hybrid's trunk must come from a cnn3d model, got {type(cnn).__name__}")
        ours = (self.conv_trunk.input_shape, self.conv_trunk.filters)
        theirs = (cnn.conv_trunk.input_shape, cnn.conv_trunk.filters)
        if ours != theirs:
            raise MedrobustError(
                f"cnn3d trunk (grid {theirs[0]}, filters {theirs[1]}) does not match the hybrid's "
                f"(grid {ours[0]}, filters {ours[1]}); build it with the cnn's input_shape and filters"
            )
        self.conv_trunk.load_state_dict(cnn.conv_trunk.state_dict())

    def set_trunk_scaling(self, minimum: Sequence[float] | Tensor, maximum: Sequence[float] | Tensor,
                          mean: Sequence[float] | Tensor) -> None:
        """Per-unit min, max and mean [T] of the RAW trunk features over the training set."""
        n = self.conv_trunk.out_features
        stats = [torch.as_tensor(v, dtype=torch.float32).detach().cpu() for v in (minimum, maximum, mean)]
        if any(s.shape != (n,) for s in stats):
            raise MedrobustError(f"trunk scaling needs min, max and mean of {n} trunk features each, "
                                 f"got shapes {[tuple(s.shape) for s in stats]}")
        if not all(torch.isfinite(s).all() for s in stats) or (stats[1] < stats[0]).any():
            raise MedrobustError("trunk scaling must be finite with max >= min for every trunk feature")
        for buffer, value in zip((self.trunk_min, self.trunk_max, self.trunk_mean), stats, strict=True):
            buffer.copy_(value)

    def scale_trunk(self, trunk: Tensor) -> Tensor:
        """2 (t - min) / (max - min) - 1 minus the same map of the training mean: 2 (t - mean) / range."""
        spread = self.trunk_max - self.trunk_min
        # A unit constant over training (often a dead ReLU) has no range: keep slope 1, still de-meaned.
        spread = torch.where(spread > 0, spread, torch.full_like(spread, 2.0))
        return 2.0 * (trunk - self.trunk_mean) / spread

    def trunk(self, image: Tensor) -> Tensor:
        """Raw flattened conv features [B, T] of an image [B, 1, X, Y, Z]."""
        return self.conv_trunk(self.check_image(image))

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The head only when the trunk is frozen (two-stage), else every parameter."""
        if self.trunk_frozen:
            return list(self.head.parameters())
        return list(self.parameters())

    def predict_standardized(self, image: Tensor | None, features: Tensor | None) -> Tensor:
        joint = torch.cat([self.scale_trunk(self.conv_trunk(image)), features], dim=1)
        return self.head(joint).squeeze(1)

    def cache_frozen(self, image: Tensor) -> Tensor | None:
        """The raw trunk features [B, T] when the trunk is frozen (two-stage), else None."""
        return self.trunk(image) if self.trunk_frozen else None

    def forward_cached(self, cache: Tensor, features: Tensor | None) -> Tensor:
        joint = torch.cat([self.scale_trunk(cache), self.standardize_features(features)], dim=1)
        return self.head(joint).squeeze(1) * self.age_std + self.age_mean

    def fit_cache_scaling(self, cache: Tensor) -> None:
        self.set_trunk_scaling(cache.min(0).values, cache.max(0).values, cache.mean(0))


def _from_cnn3d(trained: dict, feature_names: Sequence[str] | None = None, **kwargs) -> HybridModel:
    # The trunk's grid and filters are the trained cnn3d's.
    kwargs = {k: v for k, v in kwargs.items() if k not in ("input_shape", "voxel_size", "normalization", "filters")}
    return HybridModel.from_cnn3d(trained["cnn3d"], feature_names=feature_names, **kwargs)


hybrid = register_model(variant(
    HybridModel, "hybrid", "The paper's two-stage hybrid: trunk from a trained cnn3d (``HybridModel.from_cnn3d``), "
    "head trained.", trunk_frozen=True), requires=("cnn3d",), from_trained=_from_cnn3d)
hybrid_e2e = register_model(variant(
    HybridModel, "hybrid_e2e", "The hybrid architecture trained end to end from scratch; trunk scaling is the "
    "identity unless set.", trunk_frozen=False))
