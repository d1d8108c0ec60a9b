"""Context features of real data, read by name from what neuroimaging pipelines write: FreeSurfer's (and
FastSurfer's) ``stats`` files, SynthSeg's volumes CSV, or a table of one's own (a subject id column and named
columns). The label-map path (``_dseg`` images, features keyed by label id) stays beside it.

Names: a volume is ``vol_<name as the pipeline writes it>`` in mL (FreeSurfer and SynthSeg write mm^3): an aseg row
``Left-Hippocampus`` is ``vol_Left-Hippocampus``, a measure ``# Measure EstimatedTotalIntraCranialVol, eTIV, ...``
is ``vol_eTIV``, an aparc row of ``lh.aparc.stats`` is ``vol_lh_superiorfrontal`` (its ``GrayVol``), a SynthSeg
column ``left hippocampus`` is ``vol_left hippocampus``. A table of one's own keeps its column names and values as
they are (a column named ``vol_*`` is a regional volume, which the ``perturbed`` threat model moves).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medrobust.errors import MedrobustError
from medrobust.vocabulary import COVARIATE_NAMES, MISSING_VALUES, VOLUME_PREFIX

FEATURE_FORMATS = ("freesurfer", "synthseg", "table")
# A table's subject id column, first match wins (case aside), unless `id_column` names it.
_ID_COLUMNS = ("subject_id", "participant_id", "subject", "id")
_MM3_PER_ML = 1000.0


class FeatureRowError(Exception):
    """One subject's features cannot be read (no entry, a value that is no number): the subject is skipped."""


@dataclass(frozen=True)
class FeatureSource:
    """Where a dataset's context features are read by name (``[dataset.features]`` of a config).

    ``freesurfer``: ``path`` is a SUBJECTS_DIR; each subject's ``<path>/<subject>/stats/<file>`` for the files of
    ``stats`` (FastSurfer: ``aseg+DKT.stats``). ``synthseg``: ``path`` is the CSV of ``mri_synthseg --vol``.
    ``table``: ``path`` is a CSV/TSV with one row per subject. ``columns``: keep only these features (named as
    above); default all that were read."""

    format: str
    path: Path
    stats: tuple[str, ...] = ("aseg.stats",)
    id_column: str | None = None
    columns: tuple[str, ...] | None = None

    def validate(self) -> FeatureSource:
        if self.format not in FEATURE_FORMATS:
            raise MedrobustError(f"dataset.features.format must be one of {', '.join(FEATURE_FORMATS)}, "
                                 f"got {self.format!r}")
        if not Path(self.path).exists():
            raise MedrobustError(f"dataset.features.path {str(self.path)!r} does not exist")
        if self.format == "freesurfer" and not Path(self.path).is_dir():
            raise MedrobustError(f"dataset.features.path {str(self.path)!r}: format 'freesurfer' reads a "
                                 f"SUBJECTS_DIR, a folder with one folder per subject")
        if self.format != "freesurfer" and not Path(self.path).is_file():
            raise MedrobustError(f"dataset.features.path {str(self.path)!r}: format {self.format!r} reads one "
                                 f"CSV/TSV file")
        return self

    def files(self) -> list[Path]:
        """The files this source reads (what a cached plan must notice changing)."""
        if self.format != "freesurfer":
            return [Path(self.path)]
        return sorted(path for name in self.stats for path in Path(self.path).glob(f"*/stats/{name}"))


def feature_value(text: object) -> float:
    """A feature's value as a table writes it: NaN where it is missing (``n/a``...), a decimal comma accepted;
    ValueError for anything that is not a finite number."""
    text = str(text).strip()
    if text.lower() in MISSING_VALUES:
        return float("nan")
    value = float(text.replace(",", "."))
    if math.isinf(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def _number(text: str, what: str) -> float:
    try:
        return feature_value(text)
    except ValueError:
        raise FeatureRowError(f"{what} = {str(text).strip()!r} is not a number") from None


def read_freesurfer_stats(path: Path) -> dict[str, float]:
    """The volumes of one FreeSurfer/FastSurfer stats file, in mL: the ``# Measure`` lines in mm^3 and one row per
    structure (``Volume_mm3`` of an aseg-like file, ``GrayVol`` of an aparc-like one, whose names take the
    hemisphere of the file name, ``lh.`` or ``rh.``)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as error:
        raise FeatureRowError(f"{path}: cannot be read ({error.strerror})") from None
    hemisphere = next((h for h in ("lh", "rh") if Path(path).name.startswith(f"{h}.")), None)
    prefix = f"{VOLUME_PREFIX}{hemisphere}_" if hemisphere else VOLUME_PREFIX
    values: dict[str, float] = {}
    headers: list[str] | None = None
    for number, line in enumerate(lines, start=1):
        if line.startswith("# Measure "):
            parts = [part.strip() for part in line[len("# Measure "):].split(",")]
            if len(parts) >= 5 and parts[4] == "mm^3":
                values[f"{prefix}{parts[1]}"] = _number(parts[3], f"{path}:{number} {parts[1]}") / _MM3_PER_ML
        elif line.startswith("# ColHeaders"):
            headers = line.split()[2:]
        elif line.strip() and not line.startswith("#"):
            if headers is None:
                raise FeatureRowError(f"{path}: a table row before its '# ColHeaders' line; not a stats file")
            row = dict(zip(headers, line.split(), strict=False))
            column = "Volume_mm3" if "Volume_mm3" in headers else "GrayVol" if "GrayVol" in headers else None
            if column is None or "StructName" not in row:
                raise FeatureRowError(f"{path}: its columns {headers} hold neither Volume_mm3 nor GrayVol")
            values[f"{prefix}{row['StructName']}"] = _number(row.get(column, ""), f"{path}:{number}") / _MM3_PER_ML
    if not values:
        raise FeatureRowError(f"{path}: no volume in it (no '# Measure ... mm^3' line and no table row)")
    return values


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise MedrobustError(f"{path}: cannot read the features table ({error}); fix or replace it") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _subject_of(text: str) -> str:
    """A subject id from a table's entry: its BIDS ``sub-`` token where it has one (SynthSeg writes image paths),
    else the entry itself with ``sub-`` put in front."""
    text = str(text).strip()
    match = re.search(r"(sub-[A-Za-z0-9]+)", Path(text).name) or re.search(r"(sub-[A-Za-z0-9]+)", text)
    return match.group(1) if match else f"sub-{text}"


def _table_rows(source: FeatureSource) -> dict[str, dict[str, float | str]]:
    """Subject id -> its row of a SynthSeg or own table (the values still text); one row per subject."""
    table = _read_csv(source.path)
    lowered = {c.lower(): c for c in table.columns}
    if source.id_column is not None:
        if source.id_column not in table.columns:
            raise MedrobustError(f"{source.path}: dataset.features.id_column {source.id_column!r} is no column "
                                 f"(columns: {', '.join(table.columns[:8])})")
        id_column = source.id_column
    else:
        id_column = next((lowered[c] for c in _ID_COLUMNS if c in lowered), None)
        if id_column is None:
            raise MedrobustError(f"{source.path}: no subject id column ({', '.join(_ID_COLUMNS)}); name it with "
                                 f"dataset.features.id_column")
    rows: dict[str, dict] = {}
    for number, row in enumerate(table.to_dict("records"), start=2):
        subject = _subject_of(row.pop(id_column))
        if subject in rows:
            raise MedrobustError(f"{source.path}: line {number}: subject {subject} has a second row; keep one")
        rows[subject] = row
    return rows


class FeatureTable:
    """The named context features of a dataset's subjects, read once from a `FeatureSource`."""

    def __init__(self, source: FeatureSource) -> None:
        self.source = source.validate()
        self._rows = _table_rows(source) if source.format != "freesurfer" else None
        self.values: dict[str, dict[str, float]] = {}

    def read(self, subject_id: str) -> dict[str, float]:
        """The features of one subject, name -> value (mL for a pipeline's volumes); FeatureRowError says why not."""
        source = self.source
        if source.format == "freesurfer":
            folders = [Path(source.path) / subject_id, Path(source.path) / subject_id.removeprefix("sub-")]
            folder = next((f for f in folders if f.is_dir()), None)
            if folder is None:
                raise FeatureRowError(f"no FreeSurfer folder {folders[0]} (nor {folders[1].name})")
            values: dict[str, float] = {}
            for name in source.stats:
                path = folder / "stats" / name
                if not path.is_file():
                    raise FeatureRowError(f"{path} is missing")
                values.update(read_freesurfer_stats(path))
        else:
            if subject_id not in self._rows:
                raise FeatureRowError(f"no row for {subject_id} in {source.path}")
            scale = _MM3_PER_ML if source.format == "synthseg" else 1.0
            prefix = VOLUME_PREFIX if source.format == "synthseg" else ""
            values = {f"{prefix}{name}": _number(text, f"{source.path} {subject_id} {name}") / scale
                      for name, text in self._rows[subject_id].items() if name not in COVARIATE_NAMES}
        if source.columns is not None:
            missing = [name for name in source.columns if name not in values]
            if missing:
                raise FeatureRowError(f"dataset.features.columns {missing[:5]} not among the features read "
                                      f"({', '.join(list(values)[:8])} ...)")
            values = {name: values[name] for name in source.columns}
        self.values[subject_id] = values
        return values

    @property
    def names(self) -> list[str]:
        """Every feature name read, in the order first seen (a subject lacking one has NaN there)."""
        return list(dict.fromkeys(name for values in self.values.values() for name in values))

    def fingerprint(self) -> str:
        """A hash of every value read: part of the dataset's fingerprint, so cells follow their features."""
        content = json.dumps({s: self.values[s] for s in sorted(self.values)}, sort_keys=True, default=str)
        return hashlib.sha256(content.encode()).hexdigest()
