"""Shared fixtures: tiny hand-made NIfTI volumes and a tiny BIDS dataset written into tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHAPE = (12, 14, 10)


def _synthetic_brain(shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' (label 1 core, label 2 shell) on a dark background, with a little noise."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    radius = np.sqrt(sum(((grid[i] - centre[i]) / (shape[i] * 0.38)) ** 2 for i in range(3)))
    dseg = np.zeros(shape, dtype=np.int16)
    dseg[radius < 1.0] = 2
    dseg[radius < 0.55] = 1
    image = 10.0 + 80.0 * (dseg == 2) + 120.0 * (dseg == 1) + rng.normal(0, 3, shape)
    return image.astype(np.float32), dseg


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def synthetic_brain() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Factory: `synthetic_brain(shape=SHAPE, seed=0)` -> (float32 image, int16 label map)."""
    return _synthetic_brain


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    """Factory: `write_nifti(path, data, affine=None)` writes a NIfTI (identity affine by default)."""
    return _write_nifti


@pytest.fixture
def bids_dataset(tmp_path: Path) -> Path:
    """A BIDS folder with awkward ages (`34,5`, `89+`, `n/a`), a session layout, a subject without a T1w
    image, derivative label maps and a dseg.tsv."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\n"
        "sub-01\t34,5\tF\n"
        "sub-02\t89+\tM\n"
        "sub-03\tn/a\tF\n"
        "sub-04\t40\tmale\n"
        "sub-05\t50\tF\n"
        "sub-06\t61.5\tn/a\n"
    )
    (root / "dseg.tsv").write_text("index\tname\n0\tbackground\n1\tcore\n2\tshell\n")
    for number, subject in enumerate(["sub-01", "sub-02", "sub-03", "sub-04", "sub-06"]):
        image, dseg = _synthetic_brain(seed=number)
        anat = f"{subject}/ses-1/anat" if subject == "sub-06" else f"{subject}/anat"
        session = "_ses-1" if subject == "sub-06" else ""
        _write_nifti(root / anat / f"{subject}{session}_T1w.nii.gz", image)
        _write_nifti(root / "derivatives" / "seg" / anat / f"{subject}{session}_dseg.nii.gz", dseg)
    (root / "sub-05" / "anat").mkdir(parents=True)  # listed, but its image is missing
    return root

