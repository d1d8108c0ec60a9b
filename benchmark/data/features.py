"""Anatomical context features (sex, field strength, regional volumes in mL) and their training-set scaler."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medrobust.data.index import SubjectError, SubjectRecord
from medrobust.data.tables import feature_value
from medrobust.errors import MedrobustError
from medrobust.vocabulary import COVARIATE_NAMES, VOLUME_PREFIX

_SEX_VALUES = {"F": 0.0, "M": 1.0}


def context_feature_names(label_names: dict[int, str], labels: list[int]) -> list[str]:
    """Feature names: `sex`, `field_strength`, then `vol_<label name or id>` in label-id order."""
    names = list(COVARIATE_NAMES)
    for label in sorted(labels):
        name = f"{VOLUME_PREFIX}{label_names.get(label, label)}"
        # Two labels sharing a name would make the columns ambiguous: disambiguate with the id.
        names.append(f"{name}_{label}" if name in names else name)
    return names


def _read_precomputed(path: Path) -> dict[str, float]:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise SubjectError(f"{path}: cannot read the precomputed features ({error})") from None
    if len(table) != 1:
        raise SubjectError(f"{path}: precomputed features need exactly one data row, found {len(table)}")
    values = {}
    for name, text in table.iloc[0].items():
        try:
            values[str(name).strip()] = feature_value(text)
        except ValueError:
            raise SubjectError(f"{path}: feature {name!r} = {str(text).strip()!r} is not a number") from None
    return values


def precomputed_volume_labels(record: SubjectRecord) -> list[int]:
    """Label ids named `vol_<id>` in a subject's precomputed-features header ([] when it has none)."""
    if record.features_path is None:
        return []
    try:
        header = pd.read_csv(record.features_path, sep=None, engine="python", nrows=0).columns
    except (OSError, ValueError, pd.errors.ParserError):
        return []  # reported by context_features when the file is read for real
    pattern = re.escape(VOLUME_PREFIX) + r"(\d+)"
    return [int(m.group(1)) for m in (re.fullmatch(pattern, str(c).strip()) for c in header) if m]


def covariates(record: SubjectRecord) -> list[float]:
    """Sex (F -> 0, M -> 1) and field strength of a subject, NaN where unknown: the first context features."""
    return [_SEX_VALUES.get(record.sex, float("nan")) if record.sex else float("nan"),
            float(record.field_strength) if record.field_strength is not None else float("nan")]


def context_features(
    record: SubjectRecord,
    volumes: dict[int, float],
    labels: list[int],
    label_names: dict[int, str] | None = None,
) -> np.ndarray:
    """Context features of one subject in raw units, float32 [F], ordered as `context_feature_names`.

    Sex is F -> 0, M -> 1; an unknown sex or field strength is NaN. A label absent from the subject's label
    map has volume 0.0; a subject without a label map has NaN volumes. With `record.features_path` the values
    are read from that file instead (its header must hold the expected names; sex and field strength may be
    left out and are then taken from the record).
    """
    names = context_feature_names(label_names or {}, labels)
    known = covariates(record)
    if record.features_path is None:
        has_labels = bool(volumes) or record.dseg_path is not None
        missing_volume = 0.0 if has_labels else float("nan")
        row = known + [volumes.get(label, missing_volume) for label in sorted(labels)]
        return np.asarray(row, dtype=np.float32)

    values = _read_precomputed(Path(record.features_path))
    for name, value in zip(COVARIATE_NAMES, known, strict=True):
        values.setdefault(name, value)
    missing = [name for name in names if name not in values]
    extra = [name for name in values if name not in names]
    if missing or extra:
        raise SubjectError(
            f"{record.features_path}: feature names do not match the expected {names} "
            f"(missing {missing}, unexpected {extra}); rename the columns"
        )
    return np.asarray([values[name] for name in names], dtype=np.float32)


@dataclass
class FeatureScaler:
    """Per-feature mean and std fitted on the training split, NaN-aware.

    A model stores them (``BrainAgeModel.set_feature_scaling``) and standardizes raw features itself, with
    NaN (unknown) imputed as the training mean; the checkpoint sidecar records them.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray | torch.Tensor) -> FeatureScaler:
        """Fit on training features [N, F] ignoring NaN; a constant or all-unknown feature gets std 1."""
        data = np.asarray(features, dtype=np.float64)
        if data.ndim != 2:
            raise MedrobustError(f"features: expected a [N, F] array, got shape {data.shape}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is handled just below
            mean = np.nanmean(data, axis=0) if len(data) else np.zeros(data.shape[1])
            std = np.nanstd(data, axis=0) if len(data) else np.ones(data.shape[1])
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        return cls(mean=mean, std=std)
