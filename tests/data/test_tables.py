"""Context features of real data read by name: FreeSurfer/FastSurfer stats files, SynthSeg's volumes CSV and a
table of one's own; subjects without features skipped with their reason; the values in the dataset's fingerprint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from medrobust.data import load_prepared
from medrobust.data.tables import FeatureRowError, FeatureSource, read_freesurfer_stats
from medrobust.errors import MedrobustError

# The lines of a FreeSurfer 7 aseg.stats that matter here (its header comments shortened).
ASEG = """# Title Segmentation Statistics
# Measure BrainSeg, BrainSegVol, Brain Segmentation Volume, {brain:.1f}, mm^3
# Measure EstimatedTotalIntraCranialVol, eTIV, Estimated Total Intracranial Volume, {etiv:.6f}, mm^3
# Measure Cortex, NumVert, Number of Vertices, 120000, unitless
# NRows 2
# ColHeaders  Index SegId NVoxels Volume_mm3 StructName normMean normStdDev normMin normMax normRange
  1   4     {v1:.0f}   {v1:.1f}  Left-Lateral-Ventricle  31.2  10.1  12.0  80.0  68.0
  2  17     {v2:.0f}   {v2:.1f}  Left-Hippocampus        75.6   8.3  40.0 100.0  60.0
"""
APARC = """# Measure Cortex, WhiteSurfArea, White Surface Total Area, 80000.0, mm^2
# ColHeaders StructName NumVert SurfArea GrayVol ThickAvg ThickStd MeanCurv GausCurv FoldInd CurvInd
bankssts                                 1475    987   2512  2.561 0.492     0.109     0.025        9     1.4
superiorfrontal                         11000   7600  {gray:.0f}  2.800 0.600     0.120     0.030       90    10.0
"""


def _freesurfer(subjects_dir: Path, subject: str, scale: float) -> None:
    stats = subjects_dir / subject / "stats"
    stats.mkdir(parents=True)
    (stats / "aseg.stats").write_text(ASEG.format(brain=1.1e6 * scale, etiv=1.5e6 * scale, v1=8000 * scale,
                                                  v2=4200 * scale))
    (stats / "lh.aparc.stats").write_text(APARC.format(gray=22000 * scale))


def test_a_freesurfer_stats_file_reads_as_volumes_in_ml(tmp_path: Path) -> None:
    _freesurfer(tmp_path, "sub-01", 1.0)
    aseg = read_freesurfer_stats(tmp_path / "sub-01" / "stats" / "aseg.stats")
    assert aseg == pytest.approx({"vol_BrainSegVol": 1100.0, "vol_eTIV": 1500.0,
                                  "vol_Left-Lateral-Ventricle": 8.0, "vol_Left-Hippocampus": 4.2})
    aparc = read_freesurfer_stats(tmp_path / "sub-01" / "stats" / "lh.aparc.stats")  # GrayVol, the hemisphere named
    assert aparc == pytest.approx({"vol_lh_bankssts": 2.512, "vol_lh_superiorfrontal": 22.0})
    (tmp_path / "empty.stats").write_text("# Title nothing\n")
    with pytest.raises(FeatureRowError, match="no volume in it"):
        read_freesurfer_stats(tmp_path / "empty.stats")


def test_a_bids_dataset_takes_its_volumes_from_a_subjects_dir(bids_dataset: Path, tmp_path: Path) -> None:
    subjects_dir = tmp_path / "freesurfer"
    for number, subject in enumerate(["sub-01", "04", "sub-06"]):  # FreeSurfer folders without sub- too; no sub-02
        _freesurfer(subjects_dir, subject, 1.0 + number / 10)
    source = FeatureSource("freesurfer", subjects_dir, stats=("aseg.stats", "lh.aparc.stats"))
    index, _, prepared = load_prepared(bids_dataset, (16, 16, 16), (1.0, 1.0, 1.0), tmp_path / "cache",
                                       progress=False, features=source)
    assert prepared.subject_ids == ["sub-01", "sub-04", "sub-06"]
    assert prepared.feature_names == ["sex", "field_strength", "vol_BrainSegVol", "vol_eTIV",
                                      "vol_Left-Lateral-Ventricle", "vol_Left-Hippocampus", "vol_lh_bankssts",
                                      "vol_lh_superiorfrontal"]
    hippocampus = prepared.features[:, prepared.feature_names.index("vol_Left-Hippocampus")]
    assert hippocampus.tolist() == pytest.approx([4.2, 4.62, 5.04])
    assert prepared.features[:2, 0].tolist() == [0.0, 1.0] and math.isnan(prepared.features[2, 0])  # sex n/a
    assert all(label is None for label in prepared.feature_labels)  # no label-map region behind these volumes
    reasons = {s.subject_id: s.reason for s in prepared.skipped}
    assert reasons["sub-02"].startswith(f"features: no FreeSurfer folder {subjects_dir / 'sub-02'}")
    assert "age is missing" in reasons["sub-03"]
    # The values read belong to the dataset's identity: a changed stats file is another dataset.
    before = index.fingerprint()
    _freesurfer(subjects_dir / "again", "sub-01", 2.0)
    (subjects_dir / "sub-01" / "stats" / "aseg.stats").write_text(
        (subjects_dir / "again" / "sub-01" / "stats" / "aseg.stats").read_text())
    again, _, _ = load_prepared(bids_dataset, (16, 16, 16), (1.0, 1.0, 1.0), tmp_path / "cache", progress=False,
                                features=source)
    assert again.fingerprint() != before


def test_synthseg_and_own_tables_match_subjects_by_id(bids_dataset: Path, tmp_path: Path) -> None:
    synthseg = tmp_path / "synthseg.csv"
    synthseg.write_text("subject,total intracranial,left hippocampus\n"
                        f"{bids_dataset}/sub-01/anat/sub-01_T1w.nii.gz,1500000,4200\n"
                        "/elsewhere/sub-02_T1w_synthseg.nii.gz,1400000,4000\n"
                        "sub-04_T1w.nii.gz,1450000,n/a\n"
                        "sub-06_ses-1_T1w.nii.gz,1300000,3900\n")
    _, _, prepared = load_prepared(bids_dataset, (16, 16, 16), (1.0, 1.0, 1.0), tmp_path / "cache", progress=False,
                                   features=FeatureSource("synthseg", synthseg))
    assert prepared.feature_names[2:] == ["vol_total intracranial", "vol_left hippocampus"]
    assert prepared.features[:, 2].tolist() == pytest.approx([1500.0, 1400.0, 1450.0, 1300.0])
    assert math.isnan(prepared.features[2, 3])  # n/a: unknown, imputed by the model's training mean
    own = tmp_path / "own.tsv"
    own.write_text("participant_id\tvol_hippocampus\twmh_load\n01\t4.1\t0.3\nsub-02\t4.0\t0.1\n04\t3.9\tx\n"
                   "sub-06\t3.8\t0.2\n")
    _, _, prepared = load_prepared(bids_dataset, (16, 16, 16), (1.0, 1.0, 1.0), tmp_path / "cache", progress=False,
                                   features=FeatureSource("table", own, columns=("vol_hippocampus", "wmh_load")))
    assert prepared.subject_ids == ["sub-01", "sub-02", "sub-06"]  # sub-04's wmh_load is no number
    assert prepared.feature_names[2:] == ["vol_hippocampus", "wmh_load"]
    assert any("wmh_load = 'x' is not a number" in s.reason for s in prepared.skipped)


@pytest.mark.parametrize(("content", "source", "message"), [
    ("participant_id,vol_a\nsub-01,1\nsub-01,2\n", {}, "subject sub-01 has a second row"),
    ("who,vol_a\nsub-01,1\n", {}, "no subject id column"),
    ("who,vol_a\nsub-01,1\n", {"id_column": "name"}, "id_column 'name' is no column"),
])
def test_a_broken_features_table_is_one_line(bids_dataset: Path, tmp_path: Path, content: str, source: dict,
                                             message: str) -> None:
    table = tmp_path / "features.csv"
    table.write_text(content)
    with pytest.raises(MedrobustError, match=message):
        load_prepared(bids_dataset, (16, 16, 16), (1.0, 1.0, 1.0), tmp_path / "cache", progress=False,
                      features=FeatureSource("table", table, **source))


def test_a_features_source_is_checked_before_reading(tmp_path: Path) -> None:
    with pytest.raises(MedrobustError, match="format must be one of freesurfer, synthseg, table"):
        FeatureSource("fsl", tmp_path).validate()
    with pytest.raises(MedrobustError, match="does not exist"):
        FeatureSource("table", tmp_path / "missing.csv").validate()
    with pytest.raises(MedrobustError, match="reads a SUBJECTS_DIR"):
        (tmp_path / "file.csv").write_text("x\n")
        FeatureSource("freesurfer", tmp_path / "file.csv").validate()
