"""The built-in lifespan cohort: determinism, BIDS output, visible aging, the data layer reads it, CLI errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from medrobust.cli import main
from medrobust.data.cohort import (
    CSF_LABEL,
    VENTRICLE_LABEL,
    WHITE_MATTER_LABEL,
    CohortGenerator,
    draw_subject,
    load_template,
    synthesize,
)
from medrobust.data.index import load_dataset_index
from medrobust.data.preprocess import Preprocessing, prepare_dataset
from medrobust.settings import CohortSpec

TINY = CohortSpec(n=5, seed=3, shape=(24, 28, 24), voxel_size=(7.0, 7.0, 7.0), age_range=(20.0, 60.0))
GREY = slice(1, 171)  # AAL3 grey-matter parcels


@pytest.fixture(scope="module", autouse=True)
def template():
    """The anatomy template (about 10 s to build), once for the whole module."""
    return load_template()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The TINY cohort written by the CLI."""
    out = tmp_path_factory.mktemp("cohort") / "bids"
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--n", "5", "--seed", "3",
                                       "--shape", "24x28x24", "--voxel-size", "7", "--age-range", "20", "60",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _arrays(spec: CohortSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(image, labels) for _, image, labels in CohortGenerator(spec).subjects()]


def _at_age(spec: CohortSpec, age: float, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Subject `index` of `spec` rendered at `age` (chronological, anatomical and intensity age)."""
    draw = dataclasses.replace(draw_subject(spec, index), age=age, anatomy_age=age, intensity_age=age)
    with torch.no_grad():
        image, labels = CohortGenerator(spec).render([draw])
    return image[0].numpy(), labels[0].numpy()


def _read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def test_synthesize_is_deterministic(tmp_path: Path, cohort: Path) -> None:
    again = synthesize(tmp_path / "again", TINY, progress=False)
    for t1 in sorted(cohort.glob("sub-*/anat/*.nii.gz")):
        first, second = _read(t1), _read(again / t1.relative_to(cohort))
        assert first.dtype == second.dtype
        assert first.tobytes() == second.tobytes(), t1.name
    assert (again / "participants.tsv").read_text() == (cohort / "participants.tsv").read_text()


def test_subjects_do_not_depend_on_batch_size() -> None:
    one = _arrays(dataclasses.replace(TINY, batch_size=1))
    many = _arrays(dataclasses.replace(TINY, batch_size=16))
    for (image_a, labels_a), (image_b, labels_b) in zip(one, many, strict=True):
        assert image_a.tobytes() == image_b.tobytes()
        assert labels_a.tobytes() == labels_b.tobytes()


def test_different_seeds_differ() -> None:
    first = _arrays(dataclasses.replace(TINY, n=2))
    other = _arrays(dataclasses.replace(TINY, n=2, seed=TINY.seed + 1))
    for (image_a, _), (image_b, _) in zip(first, other, strict=True):
        assert not np.array_equal(image_a, image_b)
    assert draw_subject(TINY, 0).age != draw_subject(dataclasses.replace(TINY, seed=4), 0).age


def test_bids_layout_and_participants(cohort: Path) -> None:
    participants = pd.read_csv(cohort / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex", "field_strength"]
    assert list(participants.participant_id) == [f"sub-{i:04d}" for i in range(1, 6)]
    assert participants.age.between(20, 60).all()
    assert set(participants.sex) <= {"F", "M"}
    assert set(participants.field_strength) <= {1.5, 3.0}
    for subject in participants.participant_id:
        anat = cohort / subject / "anat"
        assert sorted(p.name for p in anat.iterdir()) == [f"{subject}_T1w.nii.gz", f"{subject}_dseg.nii.gz"]
        t1, dseg = nib.load(anat / f"{subject}_T1w.nii.gz"), nib.load(anat / f"{subject}_dseg.nii.gz")
        assert t1.get_data_dtype() == np.int16 and dseg.get_data_dtype() == np.uint8
        assert t1.shape == dseg.shape == TINY.shape
        np.testing.assert_array_equal(t1.affine, dseg.affine)
        np.testing.assert_allclose(nib.affines.voxel_sizes(t1.affine), TINY.voxel_size)
        assert _read(anat / f"{subject}_T1w.nii.gz").max() > 100  # scanner units, not a [0, 1] image


def test_dseg_tsv_lists_every_label_present(cohort: Path) -> None:
    table = pd.read_csv(cohort / "dseg.tsv", sep="\t")
    assert list(table.columns) == ["index", "name"]
    listed = set(table["index"])
    assert {WHITE_MATTER_LABEL, VENTRICLE_LABEL, CSF_LABEL} <= listed
    assert len(listed - {WHITE_MATTER_LABEL, VENTRICLE_LABEL, CSF_LABEL}) == 166  # the AAL3 parcels
    present = set().union(*(np.unique(_read(p)).tolist() for p in cohort.glob("sub-*/anat/*_dseg.nii.gz")))
    assert present - {0} <= listed


def test_dataset_description_records_parameters(cohort: Path) -> None:
    description = json.loads((cohort / "dataset_description.json").read_text())
    assert description["BIDSVersion"] and description["Name"]
    generated = description["GeneratedBy"][0]
    assert generated["Parameters"] == json.loads(json.dumps(dataclasses.asdict(TINY)))
    assert {"torch", "numpy", "nibabel", "nilearn"} <= set(generated["PackageVersions"])


def test_same_out_folder_and_spec_is_reused(cohort: Path) -> None:
    before = (cohort / "participants.tsv").stat().st_mtime_ns
    assert synthesize(cohort, TINY, progress=False) == cohort
    assert (cohort / "participants.tsv").stat().st_mtime_ns == before


def test_aging_changes_the_compartments() -> None:
    spec = CohortSpec(n=1, seed=1)
    young, old = (np.bincount(_at_age(spec, age)[1].ravel(), minlength=256) for age in (20.0, 80.0))
    assert old[VENTRICLE_LABEL] > 1.5 * young[VENTRICLE_LABEL]
    assert old[CSF_LABEL] > 1.5 * young[CSF_LABEL]
    assert old[GREY].sum() < 0.95 * young[GREY].sum()
    assert old[WHITE_MATTER_LABEL] < young[WHITE_MATTER_LABEL]


def test_children_have_lower_grey_white_contrast() -> None:
    spec = CohortSpec(n=1, seed=2)

    def contrast(age: float) -> float:
        image, labels = _at_age(spec, age)
        white = image[labels == WHITE_MATTER_LABEL].mean()
        grey = image[(labels >= GREY.start) & (labels < GREY.stop)].mean()
        return float((white - grey) / (white + grey))

    # The tissue-mean contrast of a 6-year-old is ~0.82 of an adult's; partial volume dilutes it in the labels.
    assert contrast(6.0) < 0.93 * contrast(30.0)


def test_data_layer_reads_the_cohort(cohort: Path, tmp_path: Path) -> None:
    index = load_dataset_index(cohort, strict=True)
    assert [r.subject_id for r in index.subjects] == [f"sub-{i:04d}" for i in range(1, 6)]
    assert all(r.dseg_path is not None and r.sex in ("F", "M") for r in index.subjects)
    assert {WHITE_MATTER_LABEL, VENTRICLE_LABEL, CSF_LABEL} <= set(index.label_names)
    prepared = prepare_dataset(index, Preprocessing(shape=TINY.shape, voxel_size=TINY.voxel_size),
                               cache_dir=tmp_path / "cache", progress=False)
    assert prepared.skipped == []
    assert prepared.images.shape == (5, 1, *TINY.shape)
    assert torch.isfinite(prepared.features).all()


@pytest.mark.parametrize("arguments", [
    ["--n", "0"],
    ["--shape", "4x4x4"],
    ["--age-range", "50", "10"],
    ["--voxel-size", "20"],
])
def test_cli_rejects_bad_input(tmp_path: Path, arguments: list[str]) -> None:
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "out"), "--quiet", *arguments])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a cohort")
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path), "--n", "2", "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_refuses_a_cohort_with_other_parameters(cohort: Path) -> None:
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(cohort), "--n", "5", "--seed", "4", "--quiet"])
    assert result.exit_code == 2
    assert "other parameters" in result.stderr


def test_paper_grid_renders() -> None:
    spec = CohortSpec(n=1, shape=(172, 220, 156), voxel_size=(1.0, 1.0, 1.0))
    (draw, image, labels), = CohortGenerator(spec).subjects()
    assert image.shape == labels.shape == (172, 220, 156)
    assert np.isfinite(image).all() and image.min() >= 0
    counts = np.bincount(labels.ravel(), minlength=256)
    assert counts[WHITE_MATTER_LABEL] > 0 and counts[VENTRICLE_LABEL] > 0 and counts[GREY].sum() > 0
    # 1 mm voxels: label volumes in mL are plausible for an adult-sized head.
    assert 600 < counts[GREY].sum() / 1e3 + counts[WHITE_MATTER_LABEL] / 1e3 < 3000
