"""Dataset indexing: a BIDS folder or a CSV/TSV manifest becomes a list of subjects with ages and file paths.

Only metadata-level problems (a missing file, an unreadable age) are detected here; problems inside the images
are found when preprocessing (`medrobust.data.preprocess`). A bad subject is skipped with a recorded reason, or,
with `strict=True`, stops the load with a MedrobustError.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medrobust.data.tables import FeatureRowError, FeatureSource, FeatureTable
from medrobust.errors import MedrobustError
from medrobust.files import file_sha256
from medrobust.vocabulary import MISSING_VALUES

# The ages read as plausible by default, in years (the oldest documented human lived 122 years): outside them a
# subject is skipped with that reason, not attacked with an age in months or a typo. A dataset's `age_range`
# narrows or widens them (a paediatric cohort, a cohort in months converted elsewhere).
MAX_AGE = 125.0
AGE_RANGE = (0.0, MAX_AGE)
# BIDS allows `89+` for privacy; ages above it are reported as this value.
_TOP_CODED_AGE = 89.0
_SEX_CODES = {
    "f": "F", "female": "F", "w": "F", "woman": "F", "0": "F",
    "m": "M", "male": "M", "man": "M", "1": "M",
}
# Accepted manifest column names, first match wins.
_MANIFEST_COLUMNS = {
    "image": ("image", "image_path", "t1", "t1_path", "t1w", "path"),
    "age": ("age",),
    "dseg": ("dseg", "dseg_path", "labels", "label_path", "segmentation"),
    "features": ("features", "features_path"),
    "subject_id": ("subject_id", "participant_id", "subject"),
    "sex": ("sex",),
    "field_strength": ("field_strength", "magnetic_field_strength"),
}


class SubjectError(MedrobustError):
    """A subject's files cannot be used (corrupt, wrong shape, non-finite, mismatched grids, bad features).

    Raised by preprocessing and feature reading; `medrobust.data.preprocess.SubjectError` is this class.
    """


@dataclass(frozen=True)
class SubjectRecord:
    """One usable subject: its age and the files that describe it."""

    subject_id: str
    age: float
    t1_path: Path
    dseg_path: Path | None = None
    # Precomputed context features: a one-row CSV/TSV whose header holds the feature names.
    features_path: Path | None = None
    sex: str | None = None  # "F", "M" or None when unknown
    field_strength: float | None = None  # tesla


@dataclass(frozen=True)
class SkippedSubject:
    """A subject left out of the dataset, and why."""

    subject_id: str
    reason: str


@dataclass
class DatasetIndex:
    """The subjects of one dataset, those skipped, and the names of the segmentation labels."""

    root: Path
    subjects: list[SubjectRecord]
    skipped: list[SkippedSubject] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)
    # Context features read by name (FreeSurfer stats, SynthSeg, a table: `medrobust.data.tables`), or None: the
    # regional volumes are then measured on each subject's label map.
    features: FeatureTable | None = None

    def fingerprint(self) -> str:
        """Content hash of the dataset: subjects, ages, covariates, the bytes of every file and the features read
        by name."""
        digest = hashlib.sha256()
        if self.features is not None:
            digest.update(self.features.fingerprint().encode())
        for record in sorted(self.subjects, key=lambda r: r.subject_id):
            files = [record.t1_path, record.dseg_path, record.features_path]
            entry = [
                record.subject_id,
                record.age,
                record.sex,
                record.field_strength,
                [file_sha256(path) if path is not None else None for path in files],
            ]
            digest.update(json.dumps(entry).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def load_dataset_index(path: str | Path, strict: bool = False, features: FeatureSource | None = None,
                       age_range: tuple[float, float] = AGE_RANGE) -> DatasetIndex:
    """Index a dataset: a folder is read as BIDS, a .csv/.tsv file as a manifest; with ``features``, each subject's
    context features are read by name from there (`medrobust.data.tables`).

    Subjects with a missing file, an unusable age (or one outside ``age_range``) or no readable features are
    recorded in `skipped`; with `strict=True` the first such subject raises MedrobustError instead. A dataset
    with no usable subject always raises.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MedrobustError(f"{path}: dataset not found; pass a BIDS folder or a .csv/.tsv manifest")
    if path.is_dir():
        index = _load_bids(path, strict, age_range)
        where = f"BIDS folder {path}"
    elif path.suffix.lower() in (".csv", ".tsv"):
        index = _load_manifest(path, strict, age_range)
        where = f"manifest {path}"
    else:
        raise MedrobustError(f"{path}: not a folder or a .csv/.tsv file; pass a BIDS folder or a manifest")
    if features is not None:
        index.features = FeatureTable(features)
        usable = []
        for record in index.subjects:
            try:
                index.features.read(record.subject_id)
            except FeatureRowError as problem:
                _skip(index.skipped, record.subject_id, f"features: {problem}", Path(features.path), strict)
                continue
            usable.append(record)
        index.subjects = usable
    if not index.subjects:
        reasons = "; ".join(f"{s.subject_id}: {s.reason}" for s in index.skipped[:5])
        more = f" (first skips: {reasons})" if reasons else ""
        raise MedrobustError(f"{where}: no usable subject (needs a T1w image and an age per subject){more}")
    index.subjects.sort(key=lambda r: r.subject_id)
    return index


class _Skip(Exception):
    """A subject-level problem found while indexing."""


def _skip(skipped: list[SkippedSubject], subject_id: str, reason: str, source: Path, strict: bool) -> None:
    if strict:
        raise MedrobustError(f"{source}: subject {subject_id}: {reason} (fix it, or load without strict)")
    skipped.append(SkippedSubject(subject_id, reason))


def parse_age(value: object, age_range: tuple[float, float] = AGE_RANGE) -> float:
    """Read an age in years: `89+` is read as 89 (with a warning) and a decimal comma is accepted; an age outside
    ``age_range`` (years, both ends included) is refused with that reason."""
    text = str(value).strip()
    if text.lower() in MISSING_VALUES:
        raise _Skip("age is missing (n/a)")
    if text.endswith("+"):
        text = text[:-1].strip()
        warnings.warn(f"age {value!r} is top-coded; read as {text}", stacklevel=3)
    try:
        age = float(text.replace(",", "."))
    except ValueError:
        raise _Skip(f"age {value!r} is not a number") from None
    if not math.isfinite(age) or age < 0:
        raise _Skip(f"age {value!r} is not a non-negative number")
    low, high = age_range
    if age > high:  # a typo (300 for 30), months or days for years: not a human age in years
        raise _Skip(f"age {value!r} is above {high:g} years (months or a typo?); fix it in the table, or widen "
                    f"the dataset's age_range")
    if age < low:
        raise _Skip(f"age {value!r} is below {low:g} years, outside the dataset's age_range")
    return age


def parse_sex(value: object) -> str | None:
    """Map a sex code to "F" or "M" (f/female/0 and m/male/1, any case); anything else is unknown."""
    if value is None:
        return None
    return _SEX_CODES.get(str(value).strip().lower())


def _parse_field_strength(value: object) -> float | None:
    text = "" if value is None else str(value).strip().lower().removesuffix("t").strip()
    if text in MISSING_VALUES:
        return None
    try:
        tesla = float(text.replace(",", "."))
    except ValueError:
        return None
    return tesla if math.isfinite(tesla) and tesla > 0 else None


def _read_table(path: Path) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        # Everything as text: ages like `89+` and `34,5` are parsed by hand, `n/a` must stay visible.
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise MedrobustError(f"{path}: cannot read the table ({error}); fix or replace the file") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _subject_label(text: str) -> str:
    text = text.strip()
    return text if text.startswith("sub-") else f"sub-{text}"


def _first_file(folders: list[Path], pattern: str) -> Path | None:
    matches = sorted(p for folder in folders for p in folder.glob(pattern) if p.is_file())
    return matches[0] if matches else None


def _anat_folders(subject_dir: Path) -> list[Path]:
    # Sessions sorted so that the first session is used when a subject has several.
    return [subject_dir / "anat"] + sorted(subject_dir.glob("ses-*/anat"))


def _sidecar_field_strength(t1_path: Path) -> float | None:
    sidecar = t1_path.with_name(t1_path.name.split(".nii")[0] + ".json")
    if not sidecar.is_file():
        return None
    try:
        return _parse_field_strength(json.loads(sidecar.read_text()).get("MagneticFieldStrength"))
    except (OSError, ValueError, AttributeError):
        return None


def _read_label_names(path: Path) -> dict[int, str]:
    table = _read_table(path)
    if "index" not in table.columns or "name" not in table.columns:
        raise MedrobustError(f"{path}: needs columns `index` and `name` (BIDS dseg.tsv); fix or remove it")
    names = {}
    for row in table.itertuples(index=False):
        try:
            label = int(str(row.index).strip())
        except ValueError:
            raise MedrobustError(f"{path}: index {row.index!r} is not an integer; fix the file") from None
        if label != 0:
            names[label] = str(row.name).strip()
    return names


def _load_bids(root: Path, strict: bool, age_range: tuple[float, float]) -> DatasetIndex:
    participants_path = root / "participants.tsv"
    if not participants_path.is_file():
        raise MedrobustError(f"{participants_path}: missing; a BIDS dataset needs it, with an age column")
    table = _read_table(participants_path)
    if "participant_id" not in table.columns or "age" not in table.columns:
        raise MedrobustError(f"{participants_path}: needs columns `participant_id` and `age`; add them")
    derivative_dirs = sorted(p for p in (root / "derivatives").glob("*") if p.is_dir())
    label_file = root / "dseg.tsv"
    if not label_file.is_file():
        label_file = next((d / "dseg.tsv" for d in derivative_dirs if (d / "dseg.tsv").is_file()), label_file)
    label_names = _read_label_names(label_file) if label_file.is_file() else {}

    subjects: list[SubjectRecord] = []
    skipped: list[SkippedSubject] = []
    listed: set[str] = set()
    for row in table.to_dict("records"):
        subject_id = _subject_label(row["participant_id"])
        if subject_id in listed:
            _skip(skipped, subject_id, "listed twice; later row ignored", participants_path, strict)
            continue
        listed.add(subject_id)
        subject_dir = root / subject_id
        t1_path = _first_file(_anat_folders(subject_dir), f"{subject_id}*_T1w.nii*")
        if t1_path is None:
            reason = f"no T1w image under {subject_dir}/[ses-*/]anat/"
            _skip(skipped, subject_id, reason, participants_path, strict)
            continue
        try:
            age = parse_age(row["age"], age_range)
        except _Skip as problem:
            _skip(skipped, subject_id, str(problem), participants_path, strict)
            continue
        dseg_folders = [f for d in derivative_dirs for f in _anat_folders(d / subject_id)]
        dseg_path = _first_file(dseg_folders + _anat_folders(subject_dir), f"{subject_id}*_dseg.nii*")
        field_strength = _parse_field_strength(row.get("field_strength"))
        if field_strength is None:
            field_strength = _sidecar_field_strength(t1_path)
        subjects.append(SubjectRecord(
            subject_id=subject_id,
            age=age,
            t1_path=t1_path,
            dseg_path=dseg_path,
            sex=parse_sex(row.get("sex")),
            field_strength=field_strength,
        ))
    # Images without a participants.tsv row have no age: report them rather than ignore them silently.
    for subject_dir in sorted(root.glob("sub-*")):
        if subject_dir.is_dir() and subject_dir.name not in listed:
            _skip(skipped, subject_dir.name, "not listed (no age)", participants_path, strict)
    return DatasetIndex(root=root, subjects=subjects, skipped=skipped, label_names=label_names)


def _column(table: pd.DataFrame, name: str) -> str | None:
    lowered = {c.lower(): c for c in table.columns}
    return next((lowered[c] for c in _MANIFEST_COLUMNS[name] if c in lowered), None)


def _subject_from_path(path: str) -> str:
    stem = Path(path).name.split(".")[0]
    match = re.match(r"(sub-[A-Za-z0-9]+)", stem)
    return match.group(1) if match else stem.removesuffix("_T1w")


def _load_manifest(manifest: Path, strict: bool, age_range: tuple[float, float]) -> DatasetIndex:
    table = _read_table(manifest)
    columns = {name: _column(table, name) for name in _MANIFEST_COLUMNS}
    for required in ("image", "age"):
        if columns[required] is None:
            accepted = ", ".join(_MANIFEST_COLUMNS[required])
            raise MedrobustError(f"{manifest}: no {required} column; name one of: {accepted}")
    root = manifest.parent

    def cell(row: dict, name: str) -> str | None:
        value = row.get(columns[name]) if columns[name] is not None else None
        return None if value is None or str(value).strip().lower() in MISSING_VALUES else str(value).strip()

    def resolve(text: str | None) -> Path | None:
        if text is None:
            return None
        file_path = Path(text).expanduser()
        return file_path if file_path.is_absolute() else root / file_path

    subjects: list[SubjectRecord] = []
    skipped: list[SkippedSubject] = []
    seen: set[str] = set()
    for number, row in enumerate(table.to_dict("records"), start=2):
        image = cell(row, "image")
        subject_id = cell(row, "subject_id") or (_subject_from_path(image) if image else f"row-{number}")
        if subject_id in seen:
            _skip(skipped, subject_id, f"line {number}: subject_id repeated; row ignored", manifest, strict)
            continue
        seen.add(subject_id)
        try:
            if image is None:
                raise _Skip(f"line {number}: no image path")
            age = parse_age(row[columns["age"]], age_range)
            paths = {"image": resolve(image), "dseg": resolve(cell(row, "dseg")),
                     "features": resolve(cell(row, "features"))}
            for name, file_path in paths.items():
                if file_path is not None and not file_path.is_file():
                    raise _Skip(f"{name} file not found: {file_path}")
        except _Skip as problem:
            _skip(skipped, subject_id, str(problem), manifest, strict)
            continue
        subjects.append(SubjectRecord(
            subject_id=subject_id,
            age=age,
            t1_path=paths["image"],
            dseg_path=paths["dseg"],
            features_path=paths["features"],
            sex=parse_sex(cell(row, "sex")),
            field_strength=_parse_field_strength(cell(row, "field_strength")),
        ))
    label_file = root / "dseg.tsv"
    label_names = _read_label_names(label_file) if label_file.is_file() else {}
    return DatasetIndex(root=root, subjects=subjects, skipped=skipped, label_names=label_names)
