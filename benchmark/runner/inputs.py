"""What a process attacks: models and prepared subjects loaded once per process and device (``LoadedInputs``),
the subjects a config selects, and the keyword arguments of an attack for a batch of them."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from medrobust.attacks.extractors import make_extractor
from medrobust.data import load_prepared
from medrobust.data.preprocess import PreparedDataset
from medrobust.data.splits import load_or_create_splits
from medrobust.errors import MedrobustError
from medrobust.models import BrainAgeModel
from medrobust.models.adapter import AdaptedModel
from medrobust.models.checkpoint import load_checkpoint
from medrobust.models.segmenter import Segmenter
from medrobust.models.sources import ModelSource
from medrobust.runner.config import RunConfig


def evaluation_subset(config: RunConfig, root: Path, all_ids: list[str], data: PreparedDataset,
                      fitting: bool = False) -> PreparedDataset:
    """The configured split's usable subjects, `count` of them drawn with the split seed, in id order; with
    ``fitting``, those of the split a universal perturbation is fitted on (`fit_split`, `fit_count`)."""
    name, key = ("fit_split", "fit_count") if fitting else ("split", "count")
    chosen = getattr(config.dataset, name)
    if chosen == "all":
        split = all_ids
    else:
        split = load_or_create_splits(root, all_ids, config.dataset.split_seed,
                                      create_in=None if config.dataset.builtin else config.out / "splits")[chosen]
    usable = set(data.subject_ids)
    ids = [s for s in split if s in usable]
    count = getattr(config.dataset, key) or (config.dataset.count if fitting else None) or len(ids)
    if count > len(ids):
        raise MedrobustError(f"{config.source}: dataset.{key} = {count} but the {getattr(config.dataset, name)} "
                             f"split of {root} has {len(ids)} usable subjects; lower dataset.{key}")
    return data.subset(sorted(random.Random(config.dataset.split_seed).sample(ids, count)))


def model_grid(model: BrainAgeModel) -> tuple:
    """(input shape, voxel size, normalization, space) of a model: how its subjects are prepared."""
    meta = model.meta
    return tuple(meta.input_shape), tuple(meta.voxel_size), meta.normalization, meta.space


def attack_inputs(data: PreparedDataset, rows: slice, model: BrainAgeModel, config: RunConfig,
                  device: torch.device | None, extractor: str | None = None, segmenter: Segmenter | None = None
                  ) -> dict:
    """An attack's keyword arguments for the subjects ``rows`` of `data`, on `device` (None: host memory); with
    ``extractor`` (threat model ``recomputed``), that feature extractor for the batch: over its label maps, or by
    ``segmenter`` (on the images' device) for the segmenter extractors."""
    def move(tensor):
        return tensor if device is None else tensor.to(device)

    images = move(data.images[rows])
    inputs = {"images": images, "features": move(data.features[rows]) if model.meta.uses_features else None,
              "ages": move(data.ages[rows]), "mask": move(data.masks[rows]) if config.brain_mask else None}
    if extractor is not None:
        labels = data.labels[rows].to(images.device) if data.labels is not None else None
        inputs["extractor"] = make_extractor(extractor, labels, data.feature_labels, data.feature_names, images,
                                             inputs["features"], segmenter=segmenter)
    return inputs


def batches(data: PreparedDataset, model: BrainAgeModel, config: RunConfig, device: torch.device | None,
            extractor: str | None = None, segmenter: Segmenter | None = None) -> list[tuple]:
    """The batches of `data` as (images, features, ages, mask[, extractor]) tuples: what a universal attack fits on
    (its extractors, like its tensors, on `device`: a segmenter extractor measures its clean volumes there)."""
    size = config.batch_size
    return [tuple(attack_inputs(data, slice(start, start + size), model, config, device, extractor,
                                segmenter).values())
            for start in range(0, len(data.subject_ids), size)]


class LoadedInputs:
    """The models and prepared subjects one process attacks on one device, each loaded once.

    The driver's also plans the grid; an executor's worker builds its own from the paths of its tasks.
    """

    def __init__(self, config: RunConfig, root: Path, device: torch.device, progress: bool = False) -> None:
        self.config, self.root, self.device, self.progress = config, Path(root), device, progress
        self._models: dict[ModelSource, tuple[BrainAgeModel, dict]] = {}
        self._prepared: dict[tuple, tuple] = {}  # grid -> (index, prepared dataset)
        self._subjects: dict[tuple, PreparedDataset] = {}  # (grid, fitting) -> subjects
        self._segmenter: tuple[Segmenter, dict] | None = None

    def segmenter(self) -> tuple[Segmenter, dict]:
        """The config's segmenter (the segmenter extractors') on this process's device, its weights frozen (an
        attack differentiates through it with respect to the image alone), and its sidecar."""
        if self._segmenter is None:
            if self.config.segmenter is None:
                raise MedrobustError(f"{self.config.source}: a segmenter extractor needs `segmenter`, the checkpoint "
                                     f"of a trained segmenter")
            segmenter, record = load_checkpoint(self.config.segmenter, self.device, kind="segmenter")
            segmenter.requires_grad_(False)
            self._segmenter = segmenter, record
        return self._segmenter

    def model(self, source: ModelSource) -> tuple[BrainAgeModel, dict]:
        """The model of a source on this process's device, and its record (a checkpoint's sidecar)."""
        if source not in self._models:
            model, record = source.load(self.device)
            if isinstance(model, AdaptedModel) and model.meta.uses_features:  # its declared columns of the data
                model.take_features_from(self._index(model_grid(model))[1].feature_names, source.where)
            self._models[source] = model, record
        return self._models[source]

    def _index(self, grid: tuple) -> tuple:
        if grid not in self._prepared:
            shape, voxel_size, normalization, space = grid
            dataset = self.config.dataset
            cache = dataset.cache_dir or (None if dataset.builtin else self.config.out / "cache")
            index, _, prepared = load_prepared(self.root, shape, voxel_size, cache_dir=cache, strict=dataset.strict,
                                               progress=self.progress, normalization=normalization,
                                               features=dataset.features, space=space, age_range=dataset.age_range)
            self._prepared[grid] = (index, prepared)
        return self._prepared[grid]

    def fingerprint(self, grid: tuple) -> str:
        return self._index(grid)[0].fingerprint()

    def subjects(self, grid: tuple, fitting: bool = False) -> PreparedDataset:
        """The attacked subjects of the model grid ``grid`` (or, with ``fitting``, those a universal perturbation
        is fitted on), drawn as the config says."""
        if (grid, fitting) not in self._subjects:
            index, prepared = self._index(grid)
            all_ids = [s.subject_id for s in index.subjects]
            self._subjects[grid, fitting] = evaluation_subset(self.config, index.root, all_ids, prepared, fitting)
        return self._subjects[grid, fitting]
