"""Model registry and the brain-age model wrappers.

Importing this package registers every built-in model:
``cnn3d``, ``hybrid``, ``hybrid_e2e``, ``features_mlp``, ``sfcn``, and MONAI's ``densenet121`` and ``resnet18_3d``
(built only where MONAI is installed).
"""

from medrobust.models import cnn3d, features_mlp, hybrid, monai_nets, segmenter, sfcn  # noqa: F401  (registers the built-ins)
from medrobust.models._registry import (
    create_from_trained,
    create_model,
    list_models,
    model_entrypoint,
    model_requires,
    register_model,
    training_order,
    unregister_model,
    variant,
)
from medrobust.models.base import BrainAgeModel, ModelMeta
from medrobust.models.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "BrainAgeModel",
    "ModelMeta",
    "create_from_trained",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_entrypoint",
    "model_requires",
    "register_model",
    "save_checkpoint",
    "training_order",
    "unregister_model",
    "variant",
]
