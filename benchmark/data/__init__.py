"""The data layer: files -> subjects -> tensors. A dataset folder (BIDS or a CSV manifest) is indexed
(``index``), its images prepared on a model grid with their context features (``preprocess``, ``features``),
and split by subject (``splits``); ``cohort`` writes the built-in synthetic cohort as such a folder.
``load_prepared`` does the first three in one call."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from medrobust.data.index import AGE_RANGE, DatasetIndex, load_dataset_index
from medrobust.data.preprocess import PreparedDataset, Preprocessing, header_problem, prepare_dataset
from medrobust.data.tables import FeatureSource
from medrobust.errors import MedrobustError

__all__ = ["DatasetIndex", "FeatureSource", "PreparedDataset", "Preprocessing", "dataset_grid", "load_prepared"]


def dataset_grid(index: DatasetIndex) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The default model grid: the most common (shape, voxel size) in RAS among the dataset's image headers that
    pass `header_problem` (read without their voxels; the first subject's on a tie). One damaged or odd header
    (4000^3 voxels, a 1x1x1 image) neither allocates its claim nor becomes every subject's grid."""
    import nibabel as nib

    grids: Counter = Counter()
    for record in index.subjects:
        try:
            image = nib.load(str(record.t1_path))
            if header_problem(image):
                continue
            image = nib.as_closest_canonical(image)
        except Exception:  # a damaged file is skipped later with its reason; look at the next one
            continue
        shape = tuple(int(s) for s in image.shape[:3])
        voxel_size = tuple(round(float(z), 4) for z in image.header.get_zooms()[:3])
        grids[shape, voxel_size] += 1
    if not grids:
        raise MedrobustError(f"{index.root}: no readable 3D T1w image to take the model grid from; "
                             "pass --shape and --voxel-size or fix the images")
    return max(grids, key=lambda grid: grids[grid])  # the first counted wins a tie


def load_prepared(data: str | Path, shape: tuple[int, int, int] | None = None,
                  voxel_size: tuple[float, float, float] | None = None, cache_dir: Path | None = None,
                  strict: bool = False, progress: bool = True,
                  normalization: str = "zscore_brain", features: FeatureSource | None = None,
                  space: str = "resample", age_range: tuple[float, float] = AGE_RANGE,
                  ) -> tuple[DatasetIndex, Preprocessing, PreparedDataset]:
    """Index a dataset and prepare it on a grid (default: the dataset's own) with an intensity normalization,
    through the content cache (default: <dataset>/.medrobust_cache), its context features read by name from
    ``features`` where given; with ``space="preprocessed"`` the images are taken as stored, their grid checked.
    Ages outside ``age_range`` are skipped. Skipped subjects are in the result's `skipped`."""
    index = load_dataset_index(data, strict=strict, features=features, age_range=age_range)
    if shape is None or voxel_size is None:
        default_shape, default_voxels = dataset_grid(index)
        shape, voxel_size = shape or default_shape, voxel_size or default_voxels
    preprocessing = Preprocessing(shape=shape, voxel_size=voxel_size, normalization=normalization, space=space)
    cache = cache_dir or Path(index.root) / ".medrobust_cache"
    return index, preprocessing, prepare_dataset(index, preprocessing, cache, strict=strict, progress=progress)
