"""Source columns -> manifest columns: one alias table, the per-source report, and the final validation.

Every reader in ``medblip_data.formats`` (BIDS, ClinicaDL, ``datasets``) produces *raw rows*: dicts keyed by the
source's own column names, each with the image file and an origin (file and row) for messages. ``map_rows`` turns
them into manifest rows through ``COLUMN_ALIASES``; ``finalise`` validates them and converts them exactly as
``read_manifest`` converts a CSV (the same ``_coerce``), so a source and its equivalent CSV give equal frames.

``COLUMN_ALIASES`` (manifest column <- source columns, in priority order; names match exactly first, then
ignoring case; the first *non-missing* value wins, so later names are per-value fallbacks):

============  =====================================================  ==========================================
manifest      source columns                                         notes
============  =====================================================  ==========================================
subject_id    subject_id, participant_id, subject                    ``sub-`` is stripped from participant_id
image_path    image_path, image, nifti, file_name, path, t1w, mri     a ``datasets.Nifti()`` column is preferred
diagnosis     diagnosis, label, dx, diagnosis_bl, diagnosis_sc       BIDS: session value, then baseline
dataset       dataset, cohort                                        else the source's name (BIDS ``Name``)
visit         visit, session_id, session                             ``ses-`` is stripped from session_id
age           age, age_bl                                            BIDS: session age, then age at baseline
sex           sex, gender                                            M/F, male/female, ... (``normalize_sex``)
education     education, education_level                             years
mmse          mmse, MMS, mmse_score                                  Clinica: ``MMS`` (generic), ``MMSE`` (ADNI)
cdr           cdr, cdr_global                                        global CDR
apoe4         apoe4                                                  number of e4 alleles
notes         notes                                                  free text
============  =====================================================  ==========================================

Of these, ``diagnosis_bl``, ``diagnosis_sc`` and ``age_bl`` are baseline values (``FALLBACK_COLUMNS``); rows that
used one are counted in ``SourceReport.fallbacks``. ``mmse_bl`` / ``cdr_bl`` are *not* fallbacks: a baseline score
shown for a later session would misstate the record (MMSE nearly gives the label away), so they stay as extra
columns. Missing values (``n/a``, blanks, NaN) and sex codes are those of ``labels_medblip`` (``is_missing``,
``normalize_sex``, as in ``read_manifest``). Overrides replace a column's aliases:
``image_column="scan"``, ``label_column="DX"``, and ``column_map={"PTEDUCAT": "education", ...}`` (source name
-> manifest name, like ``DataFrame.rename``; several source names for one manifest column keep their order).
Columns matched by an alias are consumed; every other scalar column is kept under its own name (as a CSV
manifest keeps extra columns); non-scalar ones (arrays, other images) are skipped and listed in the report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labels_medblip import is_missing, normalize_diagnosis

from .manifest import MANIFEST_COLUMNS, NUMERIC_COLUMNS, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, ManifestError, _coerce


COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "subject_id": ("subject_id", "participant_id", "subject"),
    "image_path": ("image_path", "image", "nifti", "file_name", "path", "t1w", "mri"),
    "diagnosis": ("diagnosis", "label", "dx", "diagnosis_bl", "diagnosis_sc"),
    "dataset": ("dataset", "cohort"),
    "visit": ("visit", "session_id", "session"),
    "age": ("age", "age_bl"),
    "sex": ("sex", "gender"),
    "education": ("education", "education_level"),
    "mmse": ("mmse", "MMS", "mmse_score"),
    "cdr": ("cdr", "cdr_global"),
    "apoe4": ("apoe4",),
    "notes": ("notes",),
}
PREFIXES: dict[str, str] = {"participant_id": "sub-", "session_id": "ses-"}  # BIDS entity prefixes stripped
FALLBACK_COLUMNS: frozenset[str] = frozenset({"diagnosis_bl", "diagnosis_sc", "age_bl"})  # baseline values


def resolve_aliases(image_column: str | None = None, label_column: str | None = None,
                    column_map: Mapping[str, str] | None = None) -> dict[str, tuple[str, ...]]:
    """``COLUMN_ALIASES`` with the overrides applied (each override replaces that column's alias list)."""
    aliases = dict(COLUMN_ALIASES)
    by_target: dict[str, list[str]] = {}
    for source, target in (column_map or {}).items():
        if target not in MANIFEST_COLUMNS:
            raise ValueError(f"column_map: {source!r} -> {target!r}: target must be one of {MANIFEST_COLUMNS}")
        by_target.setdefault(target, []).append(source)
    aliases.update({target: tuple(sources) for target, sources in by_target.items()})
    if image_column:
        aliases["image_path"] = (image_column,)
    if label_column:
        aliases["diagnosis"] = (label_column,)
    return aliases


def match_columns(columns: Iterable[str], aliases: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Manifest column -> the source columns present, in alias order (exact name first, then ignoring case)."""
    columns = list(columns)
    lower: dict[str, list[str]] = {}
    for column in columns:
        lower.setdefault(column.lower(), []).append(column)
    matched: dict[str, list[str]] = {}
    for target, names in aliases.items():
        found: list[str] = []
        for name in names:
            hits = [name] if name in columns else lower.get(name.lower(), [])[:1]
            found.extend(h for h in hits if h not in found)
        if found:
            matched[target] = found
    return matched


def as_text(value: Any) -> Any:
    """A source value in the form a CSV cell takes: NaN when missing, else a string (numbers via ``repr``)."""
    if is_missing(value):
        return np.nan
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, np.generic))


# ---------------------------------------------------------------------------- report


@dataclass
class SourceReport:
    """What a corpus source gave, and everything left out (nothing is dropped without being listed here).

    ``format``: ``manifest``, ``bids``, ``clinicadl``, ``datasets-disk``, ``parquet``, ``niftifolder``, ``hub``
    or ``datasets`` (an in-memory ``Dataset``/``DatasetDict``); ``source``: resolved path, Hub id or repr;
    ``root``: the BIDS/CAPS root of a ClinicaDL TSV. ``columns``: manifest column -> source columns used.
    Lists hold ``{"item": ..., "reason": ...}`` dicts. ``to_dict()`` is what evaluation results record.
    """

    format: str
    source: str
    root: str | None = None
    datasets: list[str] = field(default_factory=list)
    scans: int = 0
    subjects: int = 0
    columns: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    missing_images: list[dict] = field(default_factory=list)
    unlabelled: list[dict] = field(default_factory=list)
    skipped_files: list[dict] = field(default_factory=list)
    extra_runs: list[dict] = field(default_factory=list)
    skipped_columns: list[str] = field(default_factory=list)
    fallbacks: dict[str, int] = field(default_factory=dict)
    materialised: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, item: Any, reason: str) -> None:
        """List one left-out item under ``kind`` (``missing_images``, ``unlabelled``, ``skipped_files``...)."""
        getattr(self, kind).append({"item": str(item), "reason": reason})

    def counts(self) -> dict[str, int]:
        return {"scans": self.scans, "subjects": self.subjects, "missing_images": len(self.missing_images),
                "unlabelled": len(self.unlabelled), "skipped_files": len(self.skipped_files),
                "extra_runs": len(self.extra_runs), "materialised": self.materialised}

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))

    def describe(self) -> str:
        """One line for logs and model cards: format, source and the counts that are not zero."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items() if v)
        return f"{self.format} {self.source}" + (f" (root {self.root})" if self.root else "") + f": {counts}"


# ---------------------------------------------------------------------------- mapping and validation


@dataclass
class RawRow:
    """One scan from a source: its columns under the source's names, the image, and where it came from."""

    values: dict[str, Any]
    image: str | None
    origin: str


def map_rows(rows: Sequence[RawRow], aliases: Mapping[str, Sequence[str]], report: SourceReport,
             dataset: str | None = None) -> tuple[list[dict], list[dict[str, tuple[str, str]]]]:
    """Raw rows -> (manifest rows, per row ``{manifest column: (origin, source column)}`` for messages).

    ``dataset`` fills the ``dataset`` column where no source column gives one; the image comes from
    ``RawRow.image``. ``count_fallbacks`` counts the baseline values used (``FALLBACK_COLUMNS``).
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row.values if c not in columns)
    aliases = {k: v for k, v in aliases.items() if k != "image_path"}
    matched = match_columns(columns, aliases)
    report.columns.update(matched)
    consumed = {c for names in matched.values() for c in names}
    extras = [c for c in columns if c not in consumed]
    skipped = {c for c in extras if not all(is_scalar(r.values.get(c)) for r in rows)}
    report.skipped_columns.extend(sorted(skipped - set(report.skipped_columns)))
    extras = [c for c in extras if c not in skipped]
    out, sources = [], []
    for row in rows:
        mapped: dict[str, Any] = {c: np.nan for c in MANIFEST_COLUMNS}
        where: dict[str, tuple[str, str]] = {}
        for target, names in matched.items():
            for name in names:
                value = row.values.get(name)
                if is_missing(value):
                    continue
                text = as_text(value)
                prefix = PREFIXES.get(name)
                mapped[target] = text.removeprefix(prefix) if prefix else text
                where[target] = (row.origin, name)
                break
        if is_missing(mapped["dataset"]) and dataset is not None:
            mapped["dataset"], where["dataset"] = dataset, (row.origin, "<source name>")
        mapped["image_path"] = row.image
        mapped.update({c: as_text(row.values.get(c)) for c in extras})
        out.append(mapped)
        sources.append(where)
    return out, sources


def count_fallbacks(sources: Sequence[Mapping[str, tuple[str, str]]], report: SourceReport) -> None:
    """Count, per ``"diagnosis<-diagnosis_bl"``, the rows whose value came from a baseline column."""
    for where in sources:
        for target, (_, name) in where.items():
            if name in FALLBACK_COLUMNS:
                key = f"{target}<-{name}"
                report.fallbacks[key] = report.fallbacks.get(key, 0) + 1


def finalise(rows: list[dict], sources: list[dict[str, tuple[str, str]]], origins: Sequence[str], where: str,
             aliases: Mapping[str, Sequence[str]], check_labels: bool = True) -> pd.DataFrame:
    """Validated manifest frame of mapped rows, converted exactly as ``read_manifest`` converts a CSV.

    ``where`` names the source in messages; ``origins`` give each row's file and row.

    Raises:
        ManifestError: a required column has no source column (names the columns looked for and found), a
            required value is empty, a numeric value is not a number, or (``check_labels``) a diagnosis is not
            in the label table; each message names the file, the row and the source column.
    """
    frame = pd.DataFrame.from_records(rows, columns=list(dict.fromkeys(
        [*MANIFEST_COLUMNS, *(c for r in rows[:1] for c in r)]))) if rows else pd.DataFrame(columns=MANIFEST_COLUMNS)
    for column in REQUIRED_COLUMNS:
        blank = [i for i, v in enumerate(frame[column]) if is_missing(v)]
        if blank and column != "image_path" and not any(column in s for s in sources):
            raise ManifestError(f"{where}: no value for required column {column!r}: looked for source columns "
                                f"{list(aliases.get(column, ()))} (pass image_column=/label_column=/column_map=)")
        if blank:
            raise ManifestError(f"{origins[blank[0]]}: required column {column!r} is empty "
                                f"({len(blank)} row(s); first rows: {[origins[i] for i in blank[:3]]})")
    for column in NUMERIC_COLUMNS:
        for i, value in enumerate(frame[column]):
            if not is_missing(value) and pd.isna(pd.to_numeric(value, errors="coerce")):
                origin, name = sources[i].get(column, (origins[i], column))
                raise ManifestError(f"{origin}: column {name!r} ({column}) is not a number: {value!r}")
    if check_labels:
        for i, value in enumerate(frame["diagnosis"]):
            try:
                normalize_diagnosis(value)
            except ValueError as err:
                origin, name = sources[i].get("diagnosis", (origins[i], "diagnosis"))
                raise ManifestError(f"{origin}: column {name!r}, subject {frame['subject_id'].iat[i]!r}: "
                                    f"{err}") from None
    for column in OPTIONAL_COLUMNS:
        frame[column] = frame[column].where(frame[column].notna(), None)
    frame = _coerce(frame.astype(object), Path(where))
    frame["image_path"] = [p if Path(p).is_absolute() else str(Path(p).resolve()) for p in frame["image_path"]]
    return frame.reset_index(drop=True)
