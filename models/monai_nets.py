"""MONAI's 3D networks as registered models (``pip install 'medrobust[monai]'``, or MONAI with ``--no-deps`` where
its metadata would move torch): ``densenet121`` (Huang et al. 2017) and ``resnet18_3d`` (He et al. 2016, MONAI's
3D ResNet), image-only, one output unit read as the standardized age, trainable on the built-in cohort like our
own. MONAI is imported when such a model is built, never with the package."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from medrobust.errors import MedrobustError
from medrobust.models._registry import register_model, variant
from medrobust.models.base import BrainAgeModel, ModelMeta, as_grid, as_normalization, as_voxel_size

# name -> (the MONAI constructor, its arguments for one 3D input channel and one output)
NETWORKS = {
    "densenet121": ("DenseNet121", {"spatial_dims": 3, "in_channels": 1, "out_channels": 1}),
    "resnet18_3d": ("resnet18", {"spatial_dims": 3, "n_input_channels": 1, "num_classes": 1}),
}


class MonaiNet(BrainAgeModel):
    """A MONAI network behind our model contract: ``network`` is a key of ``NETWORKS``."""

    min_training_batch = 2  # their batch norm meets 1-voxel maps on small grids

    def __init__(
        self,
        input_shape: Sequence[int] = (48, 56, 48),
        voxel_size: Sequence[float] = (3.5, 3.5, 3.5),
        normalization: str = "zscore_brain",
        network: str = "densenet121",
        name: str = "densenet121",
    ) -> None:
        if network not in NETWORKS:
            raise MedrobustError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
        try:
            from monai.networks import nets
        except ImportError:
            raise MedrobustError(f"model {name!r} needs MONAI: pip install 'medrobust[monai]' (or pip install "
                                 f"--no-deps monai)") from None
        grid = as_grid(input_shape)
        meta = ModelMeta.from_kwargs(
            name, {"input_shape": list(grid), "voxel_size": list(as_voxel_size(voxel_size)),
                   "normalization": as_normalization(normalization), "network": network},
            uses_image=True, uses_features=False)
        super().__init__(meta)
        constructor, arguments = NETWORKS[network]
        self.network = getattr(nets, constructor)(**arguments)

    def predict_standardized(self, image: Tensor | None, features: Tensor | None) -> Tensor:
        return self.network(image).reshape(image.shape[0])


densenet121 = register_model(variant(MonaiNet, "densenet121", "MONAI's 3D DenseNet121 (Huang et al. 2017), one "
                                                              "output: the standardized age.", network="densenet121"))
resnet18_3d = register_model(variant(MonaiNet, "resnet18_3d", "MONAI's 3D ResNet-18 (He et al. 2016), one output: "
                                                              "the standardized age.", network="resnet18_3d"))
# The optional package these need (the tests skip them where it is missing; `medrobust list` shows it).
densenet121.package = resnet18_3d.package = "monai"
