"""Preprocessing: NIfTI files on disk become normalized tensors on the model's grid, cached by content.

One subject: reorient to RAS, resample to the model grid (centred on the source field of view), build a brain
mask, normalize intensities as the model declares, and measure regional volumes on the native label map.
One dataset: every subject through a content-keyed cache, bad subjects skipped with a reason, and the context
features assembled in raw units.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from medrobust.data.features import (
    COVARIATE_NAMES,
    context_feature_names,
    context_features,
    covariates,
    precomputed_volume_labels,
)

# SubjectError lives in dataset.py (the bottom of the import chain) so that features.py can raise it too.
from medrobust.data.index import DatasetIndex, SkippedSubject, SubjectError, SubjectRecord
from medrobust.errors import MedrobustError
from medrobust.files import atomic_write, file_sha256
from medrobust.vocabulary import NORMALIZATIONS, SPACES

# Bump when the preprocessing code changes what it produces, so that old cache entries are not reused.
_ALGORITHM_VERSION = 1
# Grids closer than this (affine entries, mm) are treated as the same grid.
_SAME_GRID_ATOL = 1e-4
# A label map may differ from its T1 by this much (affine entries) before it is rejected.
_DSEG_GRID_ATOL = 1e-3


@dataclass(frozen=True)
class Preprocessing:
    """How images are brought onto a model's input grid; a model's metadata declares it."""

    shape: tuple[int, int, int]  # model grid (x, y, z) in RAS voxel order
    voxel_size: tuple[float, float, float]  # mm
    normalization: str = "zscore_brain"
    use_mask: bool = True  # zero the voxels outside the brain mask after normalization
    space: str = "resample"  # medrobust.vocabulary.SPACES: resampled onto the grid, or taken as stored

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON metadata) but store tuples so that the object stays hashable.
        try:
            shape = tuple(int(n) for n in self.shape)
            voxel_size = tuple(float(v) for v in self.voxel_size)
        except (TypeError, ValueError):
            raise MedrobustError(
                f"preprocessing: shape {self.shape!r}, voxel_size {self.voxel_size!r}: need 3 numbers each"
            ) from None
        if len(shape) != 3 or min(shape) < 1:
            raise MedrobustError(f"preprocessing.shape: {self.shape!r} must be three positive integers")
        if len(voxel_size) != 3 or not all(np.isfinite(voxel_size)) or min(voxel_size) <= 0:
            raise MedrobustError(f"preprocessing.voxel_size: {self.voxel_size!r} must be three positive mm")
        if self.space not in SPACES:
            raise MedrobustError(f"preprocessing.space: {self.space!r} is unknown; use one of {SPACES}")
        if self.normalization not in NORMALIZATIONS:
            raise MedrobustError(
                f"preprocessing.normalization: {self.normalization!r} is unknown; use one of {NORMALIZATIONS}"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "voxel_size", voxel_size)
        object.__setattr__(self, "use_mask", bool(self.use_mask))

    def key(self) -> str:
        """Stable hash of the parameters (and the algorithm version): part of every cache key."""
        values = {k: v for k, v in asdict(self).items() if (k, v) != ("space", "resample")}  # earlier keys stay
        payload = json.dumps({"version": _ALGORITHM_VERSION, **values}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class PreparedSubject:
    """One subject on the model grid."""

    image: torch.Tensor  # float32 [1, X, Y, Z], normalized
    mask: torch.Tensor  # bool [1, X, Y, Z]
    volumes: dict[int, float]  # mL per label (label != 0) on the native label map; {} without a label map
    labels: torch.Tensor | None = None  # int16 [1, X, Y, Z]: the label map on the model grid; None without one


@dataclass
class PreparedDataset:
    """A whole dataset on the model grid; features in raw units with NaN for unknown values."""

    subject_ids: list[str]
    ages: torch.Tensor  # float32 [N]
    images: torch.Tensor  # float32 [N, 1, X, Y, Z]
    masks: torch.Tensor  # bool [N, 1, X, Y, Z]
    features: torch.Tensor  # float32 [N, F]
    feature_names: list[str]
    skipped: list[SkippedSubject] = field(default_factory=list)
    # The label maps on the model grid (int16 [N, 1, X, Y, Z]; None unless every subject has one) and the label
    # id of each regional-volume feature (None for sex and field strength): what a feature extractor needs.
    labels: torch.Tensor | None = None
    feature_labels: list[int | None] = field(default_factory=list)

    def subset(self, ids: list[str]) -> PreparedDataset:
        """The subjects `ids`, in that order (e.g. one split)."""
        position = {subject_id: i for i, subject_id in enumerate(self.subject_ids)}
        missing = [subject_id for subject_id in ids if subject_id not in position]
        if missing:
            raise MedrobustError(
                f"subjects {missing[:5]} are not in the prepared dataset; delete the stale splits file"
            )
        rows = torch.tensor([position[subject_id] for subject_id in ids], dtype=torch.long)
        return PreparedDataset(
            subject_ids=list(ids),
            ages=self.ages[rows],
            images=self.images[rows],
            masks=self.masks[rows],
            features=self.features[rows],
            feature_names=list(self.feature_names),
            skipped=list(self.skipped),
            labels=self.labels[rows] if self.labels is not None else None,
            feature_labels=list(self.feature_labels),
        )


# The largest image read, per axis and in all: a header beyond them is damaged or not a brain MRI (the paper's grid
# is 172x220x156 = 5.9 M voxels; a 0.5 mm whole-head scan about 400^3 = 64 M).
MAX_AXIS = 1024
MAX_VOXELS = 2**28


def header_problem(image) -> str | None:
    """What is wrong with an image's header (dimensions, voxel sizes, affine), read before any voxel, or None."""
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 2:
        return f"has shape {tuple(image.shape)}; a 3D volume is needed"
    if max(shape) > MAX_AXIS or math.prod(shape) > MAX_VOXELS:
        return (f"header claims {'x'.join(map(str, shape))} voxels (at most {MAX_AXIS} per axis and {MAX_VOXELS:,} in "
                f"all are read); the header is damaged, or the image is not a brain MRI")
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        return f"header has voxel sizes {zooms}; they must be finite and positive"
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return "has an invalid affine (non-finite or singular); fix its header"
    return None


def _load_volume(path: Path, what: str) -> nib.Nifti1Image:
    """Read a NIfTI fully into memory as a finite float32 3D image, or raise SubjectError saying why."""
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise SubjectError(f"{path}: {what} file not found") from None
    except Exception as error:  # nibabel raises many unrelated types for damaged files
        raise SubjectError(f"{path}: {what} is not a readable NIfTI ({type(error).__name__}: {error})") from None
    problem = header_problem(image)
    if problem:  # before a voxel is read: a header claiming 4000^3 voxels must not allocate them
        raise SubjectError(f"{path}: {what} {problem}")
    try:
        # Reading the data now catches truncated or corrupt payloads that the header alone does not show.
        data = image.get_fdata(dtype=np.float32)
    except Exception as error:  # nibabel raises many unrelated types for damaged files
        raise SubjectError(f"{path}: {what} is not a readable NIfTI ({type(error).__name__}: {error})") from None
    # A trailing singleton dimension (e.g. one volume of a 4D series) carries no extra data.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise SubjectError(f"{path}: {what} has {bad} NaN/Inf voxels; fix or remove the image")
    return nib.Nifti1Image(data, np.asarray(image.affine, dtype=np.float64))


def target_affine(
    img: nib.Nifti1Image, shape: tuple[int, int, int], voxel_size: tuple[float, float, float]
) -> np.ndarray:
    """RAS affine of the model grid centred on the centre of `img`'s field of view (world mm)."""
    source_centre = img.affine[:3, :3] @ ((np.array(img.shape[:3]) - 1) / 2) + img.affine[:3, 3]
    affine = np.diag([*voxel_size, 1.0])
    affine[:3, 3] = source_centre - np.array(voxel_size) * (np.array(shape) - 1) / 2
    return affine


def resample_to_grid(
    img: nib.Nifti1Image,
    shape: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    order: int,
) -> np.ndarray:
    """Reorient `img` to RAS and resample it onto the model grid centred on its field of view.

    `order` 1 is trilinear (intensities), 0 nearest-neighbour (labels). Outside the source field of view the
    result is 0. A source already on the target grid is returned unchanged.
    """
    canonical = nib.as_closest_canonical(img)
    data = np.asanyarray(canonical.dataobj)
    shape = tuple(int(n) for n in shape)
    affine = target_affine(canonical, shape, voxel_size)
    if data.shape == shape and np.allclose(canonical.affine, affine, rtol=0, atol=_SAME_GRID_ATOL):
        return data
    from scipy import ndimage  # imported where used: a finished grid's re-run never loads scipy

    # Target voxel index -> world mm -> source voxel index.
    to_source = np.linalg.inv(canonical.affine) @ affine
    data = data.astype(np.float32 if order > 0 else np.int32, copy=False)
    return ndimage.affine_transform(
        data, to_source[:3, :3], to_source[:3, 3], output_shape=shape, order=order, mode="constant", cval=0
    )


def _threshold_mask(image: np.ndarray) -> np.ndarray:
    # Without a label map: voxels brighter than the image mean, with the holes (ventricles, CSF) filled.
    from scipy import ndimage

    return ndimage.binary_fill_holes(image > image.mean())


def _normalize(image: np.ndarray, mask: np.ndarray, method: str, path: Path) -> np.ndarray:
    if method == "none":
        return image
    if method == "minmax":
        low, high = float(image.min()), float(image.max())
        if high <= low:
            raise SubjectError(f"{path}: image is constant; cannot apply minmax normalization")
        return (image - low) / (high - low)
    values = image[mask] if method == "zscore_brain" else image
    std = float(values.std())
    if std <= 0:
        where = "inside the brain mask" if method == "zscore_brain" else "over the volume"
        raise SubjectError(f"{path}: image is constant {where}; cannot apply z-score normalization")
    return (image - float(values.mean())) / std


def _label_volumes(dseg: nib.Nifti1Image) -> dict[int, float]:
    labels, counts = np.unique(np.asanyarray(dseg.dataobj), return_counts=True)
    voxel_ml = abs(np.linalg.det(dseg.affine[:3, :3])) / 1000.0
    return {int(lab): float(n) * voxel_ml for lab, n in zip(labels, counts, strict=True) if lab != 0}


def _check_stored_grid(image: nib.Nifti1Image, path: Path, preprocessing: Preprocessing) -> None:
    """With space "preprocessed": the image must already have the model's shape and voxel size (nothing is
    resampled or reoriented), or the subject is skipped saying what it has."""
    shape = tuple(int(n) for n in image.shape[:3])
    zooms = tuple(float(z) for z in np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0)))
    if shape != preprocessing.shape or not np.allclose(zooms, preprocessing.voxel_size, rtol=1e-3, atol=1e-4):
        raise SubjectError(f"{path}: image is {'x'.join(map(str, shape))} at {'x'.join(f'{z:g}' for z in zooms)} mm, "
                           f"the model takes {'x'.join(map(str, preprocessing.shape))} at "
                           f"{'x'.join(f'{z:g}' for z in preprocessing.voxel_size)} mm; space = 'preprocessed' "
                           f"resamples nothing (resample the image, or use space = 'resample')")


def prepare_subject(record: SubjectRecord, preprocessing: Preprocessing) -> PreparedSubject:
    """Bring one subject onto the model grid; raises SubjectError with the reason for any bad input."""
    t1 = _load_volume(record.t1_path, "T1w image")
    dseg = None
    volumes: dict[int, float] = {}
    if record.dseg_path is not None:
        dseg = _load_volume(record.dseg_path, "dseg label map")
        if dseg.shape != t1.shape or not np.allclose(dseg.affine, t1.affine, rtol=0, atol=_DSEG_GRID_ATOL):
            raise SubjectError(
                f"{record.dseg_path}: label map grid (shape {dseg.shape}) differs from its T1w image "
                f"{record.t1_path} (shape {t1.shape}); resample the label map onto the T1w grid"
            )
        labels = np.asanyarray(dseg.dataobj)
        if labels.min() < 0 or not np.array_equal(labels, np.round(labels)):
            raise SubjectError(f"{record.dseg_path}: label map must hold non-negative integer labels")
        dseg = nib.Nifti1Image(labels.astype(np.int32), dseg.affine)
        volumes = _label_volumes(dseg)

    if preprocessing.space == "preprocessed":  # already in the model's space: as stored, its grid checked
        _check_stored_grid(t1, record.t1_path, preprocessing)
        image = np.asanyarray(t1.dataobj).astype(np.float32)
    else:
        image = resample_to_grid(t1, preprocessing.shape, preprocessing.voxel_size, order=1).astype(np.float32)
    grid_labels = None
    if dseg is not None:  # on the T1w's grid already (checked above)
        grid_labels = np.asanyarray(dseg.dataobj) if preprocessing.space == "preprocessed" else resample_to_grid(
            dseg, preprocessing.shape, preprocessing.voxel_size, order=0)
        mask = grid_labels > 0
    else:
        mask = _threshold_mask(image)
    if not mask.any():
        raise SubjectError(f"{record.t1_path}: brain mask is empty on the model grid; check the image")
    image = _normalize(image, mask, preprocessing.normalization, record.t1_path)
    if preprocessing.use_mask:
        image = np.where(mask, image, 0.0)
    return PreparedSubject(
        image=torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
        mask=torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None],
        volumes=volumes,
        labels=torch.from_numpy(np.ascontiguousarray(grid_labels, dtype=np.int16))[None]
        if grid_labels is not None else None,
    )


def subject_cache_key(record: SubjectRecord, preprocessing: Preprocessing) -> str:
    """Cache key of one subject: the content of its files and the preprocessing parameters."""
    files = [record.t1_path, record.dseg_path, record.features_path]
    parts = [file_sha256(path) if path is not None else None for path in files]
    return hashlib.sha256(json.dumps([parts, preprocessing.key()]).encode()).hexdigest()


def _save_cached(path: Path, subject: PreparedSubject) -> None:
    labels = sorted(subject.volumes)
    tensors = {
        "image": subject.image.contiguous(),
        "mask": subject.mask.contiguous(),
        "volume_labels": torch.tensor(labels, dtype=torch.int64),
        "volume_ml": torch.tensor([subject.volumes[label] for label in labels], dtype=torch.float64),
        # Always present (empty without a label map), so an entry written before labels were kept is a miss.
        "labels": subject.labels.contiguous() if subject.labels is not None else torch.zeros(0, dtype=torch.int16),
    }
    atomic_write(path, lambda name: save_file(tensors, str(name)))


def _load_cached(path: Path, preprocessing: Preprocessing) -> PreparedSubject | None:
    try:
        tensors = load_file(str(path))
        subject = PreparedSubject(
            image=tensors["image"],
            mask=tensors["mask"],
            volumes=dict(zip(tensors["volume_labels"].tolist(), tensors["volume_ml"].tolist(), strict=True)),
            labels=tensors["labels"] if tensors["labels"].numel() else None,
        )
    except Exception:  # a damaged or foreign cache file is only a cache miss
        return None
    expected = (1, *preprocessing.shape)
    if tuple(subject.image.shape) != expected or tuple(subject.mask.shape) != expected:
        return None
    if subject.labels is not None and tuple(subject.labels.shape) != expected:
        return None
    return subject


def _prepare_cached(
    record: SubjectRecord, preprocessing: Preprocessing, cache_dir: Path | None
) -> PreparedSubject:
    """prepare_subject through the cache; a remembered failure is raised again without opening the files."""
    if cache_dir is None:
        return prepare_subject(record, preprocessing)
    try:
        key = subject_cache_key(record, preprocessing)
    except OSError as error:
        raise SubjectError(f"cannot read the files of {record.subject_id} ({error})") from None
    entry = cache_dir / f"{key}.safetensors"
    failure = cache_dir / f"{key}.failed.json"
    if failure.is_file():
        try:
            reason = str(json.loads(failure.read_text())["reason"])
        except (OSError, ValueError, KeyError, TypeError):
            reason = None  # an unreadable failure record is ignored and the subject prepared again
        if reason is not None:
            raise SubjectError(reason)
    if entry.is_file():
        cached = _load_cached(entry, preprocessing)
        if cached is not None:
            return cached
    try:
        subject = prepare_subject(record, preprocessing)
    except SubjectError as error:
        reason = json.dumps({"reason": str(error)})
        atomic_write(failure, lambda name: name.write_text(reason))
        raise
    _save_cached(entry, subject)
    return subject


def prepare_dataset(
    index: DatasetIndex,
    preprocessing: Preprocessing,
    cache_dir: Path | None,
    strict: bool = False,
    progress: bool = True,
) -> PreparedDataset:
    """Prepare every subject of `index` (through the cache in `cache_dir` if given) and its context features.

    A bad subject is recorded in `skipped` (with `strict=True` it raises); a dataset with no usable subject
    raises MedrobustError naming the dataset folder.
    """
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            reason = f"cannot create the preprocessing cache ({error}); pick another folder"
            raise MedrobustError(f"{cache_dir}: {reason}") from None
    skipped = list(index.skipped)
    prepared: list[tuple[SubjectRecord, PreparedSubject]] = []
    for record in tqdm(index.subjects, desc="preprocessing", unit="subject", disable=not progress):
        try:
            prepared.append((record, _prepare_cached(record, preprocessing, cache_dir)))
        except SubjectError as error:
            if strict:
                raise
            skipped.append(SkippedSubject(record.subject_id, str(error)))

    if index.features is not None:  # features read by name: no region of a label map behind them
        named = [name for name in index.features.names if name not in COVARIATE_NAMES]
        feature_names = list(COVARIATE_NAMES) + named
        labels, feature_labels = [], [None] * len(feature_names)
    else:
        if index.label_names:
            labels = sorted(index.label_names)
        else:
            seen = {label for _, subject in prepared for label in subject.volumes}
            seen |= {label for record, _ in prepared for label in precomputed_volume_labels(record)}
            labels = sorted(seen)
        feature_names = context_feature_names(index.label_names, labels)
        feature_labels = [None] * len(COVARIATE_NAMES) + list(labels)
    usable: list[tuple[SubjectRecord, PreparedSubject, np.ndarray]] = []
    for record, subject in prepared:
        if index.features is not None:
            values = index.features.values[record.subject_id]
            usable.append((record, subject, np.asarray(covariates(record) + [
                values.get(name, np.nan) for name in feature_names[len(COVARIATE_NAMES):]], dtype=np.float32)))
            continue
        try:
            features = context_features(record, subject.volumes, labels, label_names=index.label_names)
        except SubjectError as error:
            if strict:
                raise
            skipped.append(SkippedSubject(record.subject_id, str(error)))
            continue
        usable.append((record, subject, features))

    if not usable:
        reasons = "; ".join(f"{s.subject_id}: {s.reason}" for s in skipped[:3])
        raise MedrobustError(f"{index.root}: no usable subject after preprocessing ({reasons})")
    return PreparedDataset(
        subject_ids=[record.subject_id for record, _, _ in usable],
        ages=torch.tensor([record.age for record, _, _ in usable], dtype=torch.float32),
        images=torch.stack([subject.image for _, subject, _ in usable]),
        masks=torch.stack([subject.mask for _, subject, _ in usable]),
        features=torch.from_numpy(np.stack([features for _, _, features in usable]).astype(np.float32)),
        feature_names=feature_names,
        skipped=skipped,
        labels=torch.stack([subject.labels for _, subject, _ in usable])
        if all(subject.labels is not None for _, subject, _ in usable) else None,
        feature_labels=feature_labels,
    )
