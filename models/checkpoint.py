"""Checkpoints: weights in ``<stem>.safetensors``, everything needed to rebuild and audit in ``<stem>.json``.

Loading never unpickles: the architecture is rebuilt from the registry and the tensors come from safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import medrobust
from medrobust.errors import MedrobustError
from medrobust.files import atomic_write, file_sha256
from medrobust.models._registry import create_model, list_models
from medrobust.models.base import BrainAgeModel
from medrobust.models.segmenter import Segmenter, create_segmenter, list_segmenters

FORMAT = "medrobust-checkpoint"
# 2: the sidecar records the hash of its own content (``sidecar_sha256``); version 1 sidecars (no such hash) are
# still read, their weights hash required and their grid checked against the architecture they rebuild.
FORMAT_VERSION = 2
_SUFFIXES = (".safetensors", ".json")
# What a checkpoint holds (its sidecar's ``kind``; absent: a brain-age model): the registry that rebuilds it.
KINDS = {"model": (list_models, create_model), "segmenter": (list_segmenters, create_segmenter)}
_KIND_WORDS = {"model": "brain-age model", "segmenter": "segmenter"}


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, sidecar) for a checkpoint given by its stem or by either of its two files."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in _SUFFIXES else path
    return beside(stem, ".safetensors"), beside(stem, ".json")


def beside(stem: str | os.PathLike, suffix: str) -> Path:
    """The file ``<stem><suffix>`` next to a checkpoint (its weights, sidecar, test predictions, regions): with_name,
    not with_suffix, so that a stem with a dot ("cnn3d.seed0", "cnn3d-at-pgd-linf0.002-3steps-seed0") keeps it."""
    stem = Path(stem)
    return stem.with_name(stem.name + suffix)


def save_checkpoint(model: BrainAgeModel | Segmenter, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``<path>.safetensors`` (state dict incl. buffers) and the ``<path>.json`` sidecar.

    ``extra`` (JSON-able: dataset fingerprint, clean metrics, training parameters) is stored as is.
    Returns the path of the weights file.
    """
    weights_path, sidecar_path = checkpoint_paths(path)
    meta = model.meta
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": model.kind,
        "model": {"name": meta.name, "kwargs": meta.kwargs},
        "meta": dataclasses.asdict(meta),
        "input_shape": list(meta.input_shape),
        "voxel_size": list(meta.voxel_size),
        "normalization": meta.normalization,
        "feature_names": list(meta.feature_names),
        "feature_scaling": (
            {"mean": state["feature_mean"].tolist(), "std": state["feature_std"].tolist()}
            if meta.uses_features
            else None
        ),
        "target_scaling": ({"mean": state["age_mean"].item(), "std": state["age_std"].item()}
                           if "age_mean" in state else None),
        "versions": {
            "medrobust": medrobust.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "weights_file": weights_path.name,
        "extra": extra or {},
    }
    try:
        text = json.dumps(sidecar, indent=2)
    except (TypeError, ValueError) as err:
        raise MedrobustError(f"checkpoint {sidecar_path}: 'extra' must be JSON-serializable ({err})") from err
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights_path, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    sidecar["weights_sha256"] = file_sha256(weights_path)
    sidecar["sidecar_sha256"] = sidecar_digest(sidecar)
    text = json.dumps(sidecar, indent=2)
    atomic_write(sidecar_path, lambda p: p.write_text(text + "\n", encoding="utf-8"))
    return weights_path


def sidecar_digest(sidecar: dict) -> str:
    """The hash of a sidecar's content, its own hash aside (key order and indentation aside)."""
    content = {k: v for k, v in sidecar.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _check_sidecar(sidecar: dict, sidecar_path: Path) -> None:
    """A sidecar edited by hand (a voxel size changed would resample the data to a grid the model never saw; a
    weights hash deleted would turn the tamper check off) is refused, saying how to recover."""
    if not isinstance(sidecar.get("weights_sha256"), str):
        raise MedrobustError(f"checkpoint sidecar {sidecar_path} records no weights_sha256, so its weights cannot "
                             f"be checked; restore the sidecar written with them, or train the model again")
    if sidecar.get("format_version", 1) >= 2 and sidecar.get("sidecar_sha256") != sidecar_digest(sidecar):
        raise MedrobustError(f"checkpoint sidecar {sidecar_path} was changed after it was written (its content "
                             f"no longer matches its sidecar_sha256); restore it, or train the model again")


def _check_meta(model: BrainAgeModel, sidecar: dict, sidecar_path: Path) -> None:
    """The grid, normalization and features a sidecar states must be those of the architecture it rebuilds."""
    meta = model.meta
    stated = {"input_shape": list(meta.input_shape), "voxel_size": list(meta.voxel_size),
              "normalization": meta.normalization, "feature_names": list(meta.feature_names)}
    for key, value in stated.items():
        if key in sidecar and sidecar[key] != value:
            raise MedrobustError(f"checkpoint sidecar {sidecar_path}: {key} {sidecar[key]!r} is not the model's "
                                 f"{value!r} (the sidecar was edited); restore it, or train the model again")


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", kind: str = "model"
) -> tuple[BrainAgeModel, dict]:
    """Rebuild a model from its checkpoint (stem or either file): returns (model in eval mode, sidecar).
    ``kind``: what the caller wants, a brain-age ``model`` or a ``segmenter``; a checkpoint of another kind is
    refused."""
    weights_path, sidecar_path = checkpoint_paths(path)
    for file in (sidecar_path, weights_path):
        if not file.is_file():
            raise MedrobustError(f"checkpoint file {file} is missing; need both .safetensors and .json")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        name, kwargs = sidecar["model"]["name"], sidecar["model"]["kwargs"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise MedrobustError(f"checkpoint sidecar {sidecar_path} is unreadable or corrupt ({err!r})") from err
    if sidecar.get("format") != FORMAT or sidecar.get("format_version", 0) > FORMAT_VERSION:
        raise MedrobustError(
            f"checkpoint sidecar {sidecar_path} is format {sidecar.get('format')!r} version "
            f"{sidecar.get('format_version')!r}; this medrobust reads {FORMAT!r} up to {FORMAT_VERSION}"
        )
    stored = sidecar.get("kind", "model")
    if stored != kind:
        said, wanted = _KIND_WORDS.get(stored, str(stored)), _KIND_WORDS[kind]
        raise MedrobustError(f"checkpoint {weights_path} holds a {said}, not a {wanted}; give a {wanted}'s checkpoint")
    names, create = KINDS[kind]
    if name not in names():
        raise MedrobustError(
            f"checkpoint sidecar {sidecar_path} names unknown {kind} '{name}'; "
            f"known: {', '.join(names())}"
        )
    _check_sidecar(sidecar, sidecar_path)
    if file_sha256(weights_path) != sidecar["weights_sha256"]:
        raise MedrobustError(
            f"checkpoint weights {weights_path} do not match their sidecar {sidecar_path} (sha256 differs); "
            "the pair was mixed up or the file is corrupt"
        )
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise MedrobustError(f"checkpoint weights {weights_path} are unreadable or corrupt ({err})") from err
    # Rebuilding runs the random init once; fork the RNG so loading never shifts the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        try:
            model = create(name, **kwargs)
        except (TypeError, MedrobustError) as err:
            raise MedrobustError(f"checkpoint sidecar {sidecar_path}: cannot rebuild {name}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise MedrobustError(
            f"checkpoint weights {weights_path} do not fit model '{name}' as its sidecar describes ({err})"
        ) from err
    _check_meta(model, sidecar, sidecar_path)
    return model.to(device).eval(), sidecar
