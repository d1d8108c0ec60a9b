"""The threat models for anatomical context: what happens to a model's context features under attack.

``fixed``: the features keep their clean values (the paper's setting). ``perturbed``: the attacker also moves each
regional volume (a feature named by ``medrobust.vocabulary.VOLUME_PREFIX``) within ``feature_budget`` times its
clean value, jointly with the image; sex and field strength stay. ``recomputed``: the features follow from the
attacked image through a feature extractor given with the batch (``medrobust.attacks.extractors``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medrobust.errors import MedrobustError
from medrobust.vocabulary import THREAT_MODELS, is_volume

__all__ = ["THREAT_MODELS", "check_recomputed", "feature_box", "feature_radius", "movable_features"]


def check_recomputed(threat_model: str, extractor: object, features: Tensor | None) -> None:
    """Refuse ``recomputed`` without the clean features and an extractor to measure them on an attacked image."""
    if threat_model == "recomputed" and (extractor is None or features is None):
        raise MedrobustError("threat_model 'recomputed' needs the clean context features and a feature "
                             "extractor (extractor=callable(images) -> features) with the batch")


def movable_features(model: nn.Module, features: Tensor) -> Tensor:
    """Per feature [F] (bool), whether ``perturbed`` may move it: the regional volumes, found by the model's
    feature names (``meta.feature_names``, the ``vol_`` ones). A model that names none is refused: which of its
    features are volumes (and which are sex or field strength, which never move) is unknown."""
    names = getattr(getattr(model, "meta", None), "feature_names", None)
    if names is None:
        raise MedrobustError("threat_model 'perturbed' moves the regional volumes only, found by the model's "
                             "feature names (meta.feature_names, volumes named vol_*); this model names none, so "
                             "its sex or field strength would move too: name its features, or use 'fixed'")
    if len(names) != features.shape[1]:
        raise MedrobustError(f"the model names {len(names)} context features but the batch has "
                             f"{features.shape[1]} per image: give it the features it was trained on")
    used = set(getattr(model, "used_feature_names", names))  # a column the model ignores is not its context
    return torch.tensor([is_volume(name) and name in used for name in names], device=features.device)


def feature_radius(threat_model: str, feature_budget: float, model: nn.Module,
                   features: Tensor | None) -> Tensor | None:
    """Per sample and feature, how far ``perturbed`` may move a feature: ``feature_budget`` x |clean value| for
    the movable ones, 0 for the rest (and for missing values); None when the features stay fixed."""
    if threat_model != "perturbed" or features is None:
        return None
    radius = feature_budget * features.abs()
    movable = movable_features(model, features)
    return torch.where(movable & torch.isfinite(features), radius, torch.zeros_like(radius))


def feature_box(clean: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """The features' box under ``perturbed``: each feature within its radius of its clean value, an end that
    rounding put farther than the radius moved one ulp back (as for the image), and the clean value itself where
    the radius is 0 (sex, field strength, missing values)."""
    low, high = clean - radius, clean + radius
    low = torch.where(clean - low > radius, torch.nextafter(low, clean), low)
    high = torch.where(high - clean > radius, torch.nextafter(high, clean), high)
    return torch.where(radius > 0, low, clean), torch.where(radius > 0, high, clean)
