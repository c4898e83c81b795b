"""Adapters from the official metadata of AD cohorts to manifest rows, and image matching.

Each ``<cohort>_records(table)`` turns a metadata table (column names of the public releases)
into *records*: manifest rows without ``image_path`` plus matching keys, ``_subject_token`` (a string that
must occur in an image's path) and ``_visit_tokens`` (strings, one of which must occur when the subject has
several records). ``match_images`` then assigns image files to records; every matched file becomes one
manifest row (one row per scan), and unmatched images and records are reported.

Label policies (explicit, tested):

- ADNI: ``DX`` (CN / MCI / Dementia), falling back to ``DX_bl`` (CN, SMC, EMCI, LMCI, AD) at baseline.
- OASIS-1 / OASIS-2: CDR global score (0 -> CN, 0.5 -> MCI, >= 1 -> AD), written as ``"CDR 0.5"``; rows
  without a CDR (OASIS-1's young controls) are excluded as unlabelled. OASIS-1 ``Educ`` is a 1-5 code,
  converted to years by ``OASIS1_EDUCATION_YEARS``.
- NACC UDS: ``NACCUDSD`` 1 -> "normal" (CN), 3 -> "MCI", 4 -> "dementia" (AD); 2 (impaired, not MCI) is
  excluded, because it is neither a normal control nor MCI. Missing codes (-4, 88, 95-98, 99 for education)
  become missing values.
- AIBL: ``DXCURREN`` 1/2/3 -> CN/MCI/AD; ``PTGENDER`` 1 male, 2 female; age from ``PTDOB`` (``/YYYY``) and
  ``EXAMDATE`` when present; -4 means missing.
- MIRIAD: labels from file names ``miriad_<subject>_<AD|HC>_<M|F>_<visit>_MR_<scan>.nii`` (no MCI class).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from labels_medblip import is_missing, normalize_sex, number_or_none

from .manifest import MANIFEST_COLUMNS


logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".img", ".mgz")
NACC_DIAGNOSIS: dict[int, str | None] = {1: "normal", 2: None, 3: "MCI", 4: "dementia"}
AIBL_DIAGNOSIS: dict[int, str] = {1: "CN", 2: "MCI", 3: "AD"}
OASIS1_EDUCATION_YEARS: dict[int, float] = {1: 10.0, 2: 12.0, 3: 14.0, 4: 16.0, 5: 18.0}
MISSING_CODES: frozenset[float] = frozenset({-4.0, -1.0, 88.0, 95.0, 96.0, 97.0, 98.0, 99.0, 888.0, 999.0})
MIRIAD_PATTERN = re.compile(r"^miriad_(?P<subject>\d+)_(?P<dx>AD|HC)_(?P<sex>[MF])_(?P<visit>\d+)_MR_(?P<scan>\d+)"
                            r"\.nii(\.gz)?$", re.IGNORECASE)
_KEY_COLUMNS: tuple[str, ...] = ("RID", "PTID", "NACCID", "ID", "Subject ID", "VISCODE", "NACCVNUM", "MRI ID")


# ---------------------------------------------------------------------------- value helpers


def _text(value: Any) -> str | None:
    if is_missing(value):
        return None
    text = str(value).strip()
    return text[:-2] if re.fullmatch(r"-?\d+\.0", text) else text


def _date_tokens(value: Any) -> list[str]:
    """``YYYY-MM-DD`` and ``YYYYMMDD`` forms of a date (as found in ADNI/AIBL folder and file names)."""
    if is_missing(value):
        return []
    stamp = pd.to_datetime(str(value), errors="coerce")
    if pd.isna(stamp):
        return []
    return [stamp.strftime("%Y-%m-%d"), stamp.strftime("%Y%m%d")]


def _require(table: pd.DataFrame, columns: Sequence[str], cohort: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{cohort} metadata lacks column(s) {missing}; found {list(table.columns)}")


def _record(dataset: str, subject_id: str, visit: str | None, diagnosis: str, subject_token: str,
            visit_tokens: Sequence[str], **fields: Any) -> dict:
    row = {c: None for c in MANIFEST_COLUMNS if c != "image_path"}
    row.update(subject_id=subject_id, visit=visit, diagnosis=diagnosis, dataset=dataset, **fields)
    row["_subject_token"] = subject_token
    row["_visit_tokens"] = [t for t in visit_tokens if t]
    return row


@dataclass
class AdapterResult:
    """Records from one metadata table, and the rows left out with the reason."""

    records: list[dict]
    excluded: dict[str, int] = field(default_factory=dict)

    def exclude(self, reason: str, record: dict | None = None) -> None:
        """Count an excluded row; its record (if known) is kept so that its images are not given to another
        visit of the same subject but reported as excluded."""
        self.excluded[reason] = self.excluded.get(reason, 0) + 1
        if record is not None:
            self.records.append({**record, "_excluded": reason})

    def add(self, record: dict, label: str | None, reason_if_unlabelled: str) -> None:
        """Keep a labelled record; count an unlabelled one as excluded for the given reason."""
        if label is None:
            self.exclude(reason_if_unlabelled, record)
        else:
            self.records.append(record)


# ---------------------------------------------------------------------------- cohorts


def adni_records(table: pd.DataFrame, dataset: str = "ADNI") -> AdapterResult:
    """ADNIMERGE rows -> records. Subject = PTID; visit = VISCODE; age = AGE (+ Years_bl if present)."""
    _require(table, ("PTID", "VISCODE", "DX", "AGE", "PTGENDER", "PTEDUCAT", "APOE4", "MMSE"), "ADNI")
    result = AdapterResult([])
    for _, r in table.iterrows():
        label = _text(r["DX"])
        if label is None and str(r["VISCODE"]).strip().lower() == "bl" and "DX_bl" in table.columns:
            label = _text(r["DX_bl"])
        age = number_or_none(r["AGE"])
        years = number_or_none(r.get("Years_bl")) if "Years_bl" in table.columns else None
        record = _record(
            dataset, str(r["PTID"]).strip(), _text(r["VISCODE"]), label, str(r["PTID"]).strip(),
            [_text(r["VISCODE"]), *_date_tokens(r.get("EXAMDATE"))],
            age=None if age is None else round(age + (years or 0.0), 1), sex=normalize_sex(r["PTGENDER"]),
            education=number_or_none(r["PTEDUCAT"]), mmse=number_or_none(r["MMSE"], low=0, high=30),
            apoe4=number_or_none(r["APOE4"], low=0, high=2),
            cdrsb=number_or_none(r.get("CDRSB")) if "CDRSB" in table.columns else None)
        result.add(record, label, "no diagnosis (DX/DX_bl)")
    return result


def _cdr_label(value: Any) -> str | None:
    cdr = number_or_none(value, low=0, high=3)
    return None if cdr is None else f"CDR {cdr:g}"


def oasis1_records(table: pd.DataFrame, dataset: str = "OASIS-1") -> AdapterResult:
    """oasis_cross-sectional rows -> records. ID ``OAS1_0001_MR1``: subject ``OAS1_0001``, visit ``MR1``."""
    _require(table, ("ID", "M/F", "Age", "Educ", "MMSE", "CDR"), "OASIS-1")
    result = AdapterResult([])
    for _, r in table.iterrows():
        scan_id = str(r["ID"]).strip()
        match = re.fullmatch(r"(OAS1_\d+)_(MR\d+)", scan_id, re.IGNORECASE)
        label = _cdr_label(r["CDR"])
        if match is None:
            result.exclude("ID not of the form OAS1_xxxx_MRn")
            continue
        educ = number_or_none(r["Educ"])
        cdr = number_or_none(r["CDR"])
        record = _record(
            dataset, match.group(1), match.group(2), label, match.group(1), [scan_id],
            age=number_or_none(r["Age"]), sex=normalize_sex(r["M/F"]),
            education=None if educ is None else OASIS1_EDUCATION_YEARS.get(int(educ)),
            mmse=number_or_none(r["MMSE"], low=0, high=30), cdr=cdr)
        result.add(record, label, "no CDR (unlabelled)")
    return result


def oasis2_records(table: pd.DataFrame, dataset: str = "OASIS-2") -> AdapterResult:
    """oasis_longitudinal rows -> records; label from the visit's CDR (``Group`` kept as ``oasis_group``)."""
    _require(table, ("Subject ID", "MRI ID", "Group", "Visit", "M/F", "Age", "EDUC", "MMSE", "CDR"), "OASIS-2")
    result = AdapterResult([])
    for _, r in table.iterrows():
        label = _cdr_label(r["CDR"])
        mri_id = str(r["MRI ID"]).strip()
        record = _record(
            dataset, str(r["Subject ID"]).strip(), mri_id.rsplit("_", 1)[-1], label, str(r["Subject ID"]).strip(),
            [mri_id], age=number_or_none(r["Age"]), sex=normalize_sex(r["M/F"]), education=number_or_none(r["EDUC"]),
            mmse=number_or_none(r["MMSE"], low=0, high=30), cdr=number_or_none(r["CDR"]), oasis_group=_text(r["Group"]))
        result.add(record, label, "no CDR (unlabelled)")
    return result


def nacc_records(table: pd.DataFrame, dataset: str = "NACC") -> AdapterResult:
    """NACC UDS rows -> records. Subject = NACCID; visit = ``v<NACCVNUM>``; NACCUDSD 2 excluded."""
    _require(table, ("NACCID", "NACCVNUM", "NACCUDSD", "NACCAGE", "SEX", "EDUC", "NACCMMSE"), "NACC")
    result = AdapterResult([])
    for _, r in table.iterrows():
        code = number_or_none(r["NACCUDSD"])
        label = None if code is None else NACC_DIAGNOSIS.get(int(code))
        visit = _text(r["NACCVNUM"])
        record = _record(
            dataset, str(r["NACCID"]).strip(), f"v{visit}", label, str(r["NACCID"]).strip(),
            [f"v{visit}", f"visit{visit}", f"visit_{visit}", f"visit-{visit}"],
            age=number_or_none(r["NACCAGE"], (-4.0,), 18, 120), sex=normalize_sex(r["SEX"], {"1": "M", "2": "F"}),
            education=number_or_none(r["EDUC"], (-4.0, 99.0), 0, 36),
            mmse=number_or_none(r["NACCMMSE"], MISSING_CODES, 0, 30), naccudsd=None if code is None else int(code))
        result.add(record, label, "NACCUDSD 2 (impaired, not MCI)" if code == 2 else "NACCUDSD missing or unknown")
    return result


def _birth_year(value: Any) -> float | None:
    match = re.search(r"(\d{4})", str(value)) if not is_missing(value) else None
    return float(match.group(1)) if match else None


def aibl_records(table: pd.DataFrame, dataset: str = "AIBL") -> AdapterResult:
    """AIBL rows (diagnosis merged with demographics/MMSE on RID, VISCODE) -> records. Subject ``AIBL_<RID>``."""
    _require(table, ("RID", "VISCODE", "DXCURREN"), "AIBL")
    result = AdapterResult([])
    for _, r in table.iterrows():
        code = number_or_none(r["DXCURREN"])
        label = None if code is None else AIBL_DIAGNOSIS.get(int(code))
        rid = _text(r["RID"])
        dates = _date_tokens(r.get("EXAMDATE"))
        birth = _birth_year(r.get("PTDOB"))
        age = float(dates[0][:4]) - birth if dates and birth else None
        record = _record(
            dataset, rid, _text(r["VISCODE"]), label, f"AIBL_{rid}",
            [_text(r["VISCODE"]), *dates], age=age, sex=normalize_sex(r.get("PTGENDER"), {"1": "M", "2": "F"}),
            mmse=number_or_none(r.get("MMSCORE"), MISSING_CODES, 0, 30))
        result.add(record, label, "DXCURREN missing or unknown")
    return result


def miriad_rows(images: Sequence[Path]) -> tuple[list[dict], list[Path]]:
    """MIRIAD rows from file names alone; returns (rows with ``image_path``, files that do not parse)."""
    rows, unmatched = [], []
    for path in images:
        match = MIRIAD_PATTERN.match(path.name)
        if match is None:
            unmatched.append(path)
            continue
        row = {c: None for c in MANIFEST_COLUMNS}
        row.update(subject_id=match["subject"], image_path=str(path), diagnosis=match["dx"].upper(),
                   dataset="MIRIAD", visit=match["visit"], sex=match["sex"].upper(),
                   notes=None, scan=match["scan"])
        rows.append(row)
    return rows, unmatched


ADAPTERS: dict[str, Callable[..., AdapterResult]] = {
    "adni": adni_records, "oasis1": oasis1_records, "oasis2": oasis2_records,
    "nacc": nacc_records, "aibl": aibl_records,
}
COHORTS: tuple[str, ...] = (*ADAPTERS, "miriad")


# ---------------------------------------------------------------------------- tables and images


def read_metadata(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Read one or more metadata tables (CSV/TSV/XLSX) and merge them on shared key columns.

    A later table that has one row per subject (e.g. AIBL demographics) is merged on the subject key
    only; otherwise on every shared key (e.g. ``RID`` and ``VISCODE``). Values are kept as strings.
    """
    tables = [_read_one(Path(p)) for p in paths]
    merged = tables[0]
    for path, table in zip(paths[1:], tables[1:]):
        keys = [k for k in _KEY_COLUMNS if k in merged.columns and k in table.columns]
        if not keys:
            raise ValueError(f"{path}: shares no key column ({_KEY_COLUMNS}) with the previous tables")
        if table[keys[0]].is_unique:
            keys = keys[:1]
        extra = [c for c in table.columns if c not in merged.columns or c in keys]
        merged = merged.merge(table[extra], on=keys, how="left")
    return merged


def _read_one(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metadata file not found")
    if path.suffix.lower() in (".xlsx", ".xls"):
        return pd.read_excel(path, dtype=str)
    return pd.read_csv(path, dtype=str, sep=None if path.suffix.lower() == ".tsv" else ",", engine="python")


def find_images(folder: str | Path) -> list[Path]:
    """Image files (``IMAGE_SUFFIXES``) under ``folder``, sorted; Analyze ``.hdr`` companions are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def path_tokens(path: str, max_parts: int = 5) -> set[str]:
    """Lower-case runs of 1..max_parts alphanumeric parts of ``path`` with their separators kept.

    ``"ADNI/002_S_0295/x.nii"`` gives ``{"adni", "002", "002_s_0295", "adni/002", ...}``; a token matches only
    whole parts, so ``MR1`` never matches inside ``MR10``.
    """
    pieces = re.split(r"([^A-Za-z0-9]+)", path.lower())
    words, seps = pieces[0::2], pieces[1::2] + [""]
    tokens = set()
    for i in range(len(words)):
        text = words[i]
        for n in range(1, max_parts + 1):
            if i + n > len(words):
                break
            if n > 1:
                text = text + seps[i + n - 2] + words[i + n - 1]
            if text:
                tokens.add(text)
    return tokens


@dataclass
class MatchReport:
    """Outcome of matching images to metadata records."""

    rows: list[dict]
    unmatched_images: list[tuple[str, str]]  # (path, reason)
    unmatched_records: list[tuple[str, str]]  # (subject_id, visit)
    excluded: dict[str, int]


def match_images(result: AdapterResult, images: Sequence[Path], root: Path) -> MatchReport:
    """Assign each image to the record whose subject token (and, if needed, visit token) its path contains."""
    by_subject: dict[str, list[int]] = {}
    for i, record in enumerate(result.records):
        by_subject.setdefault(record["_subject_token"].lower(), []).append(i)
    used = np.zeros(len(result.records), dtype=bool)
    rows, unmatched = [], []
    for image in images:
        tokens = path_tokens(str(image.relative_to(root)))
        subjects = [s for s in by_subject if s in tokens]
        if len(subjects) != 1:
            unmatched.append((str(image), "no subject in path" if not subjects else f"several subjects {subjects}"))
            continue
        candidates = by_subject[subjects[0]]
        if len(candidates) > 1:
            candidates = [i for i in candidates
                          if any(t.lower() in tokens for t in result.records[i]["_visit_tokens"])]
        if len(candidates) != 1:
            unmatched.append((str(image), "no visit in path" if not candidates else "several visits match"))
            continue
        record = result.records[candidates[0]]
        if record.get("_excluded"):
            unmatched.append((str(image), f"visit excluded: {record['_excluded']}"))
            continue
        used[candidates[0]] = True
        row = {k: v for k, v in record.items() if not k.startswith("_")}
        rows.append({**row, "image_path": str(image)})
    missing = [(r["subject_id"], r["visit"]) for r, u in zip(result.records, used)
               if not u and not r.get("_excluded")]
    return MatchReport(rows, unmatched, missing, dict(result.excluded))


def build_manifest(cohort: str, metadata: Sequence[str | Path], images: str | Path,
                   dataset: str | None = None) -> MatchReport:
    """Manifest rows of ``cohort`` (one of ``COHORTS``) from metadata tables and an image folder.

    Rows have ``MANIFEST_COLUMNS`` (``image_path`` absolute) plus cohort extras; MIRIAD needs no metadata.

    Raises:
        ValueError: unknown cohort, or a metadata table lacks the cohort's columns (the message lists them).
        FileNotFoundError: a metadata file or the image folder is missing.
    """
    cohort = cohort.lower()
    if cohort not in COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; expected one of {COHORTS}")
    root = Path(images).resolve()
    files = find_images(root)
    if cohort == "miriad":
        rows, bad = miriad_rows(files)
        if dataset:
            for row in rows:
                row["dataset"] = dataset
        return MatchReport(rows, [(str(p), "name does not follow the MIRIAD pattern") for p in bad], [], {})
    if not metadata:
        raise ValueError(f"cohort {cohort!r} needs --metadata")
    table = read_metadata(metadata)
    adapter = ADAPTERS[cohort]
    result = adapter(table, dataset) if dataset else adapter(table)
    report = match_images(result, files, root)
    logger.info("%s: %d scans matched, %d images unmatched, %d records without image, excluded %s",
                cohort, len(report.rows), len(report.unmatched_images), len(report.unmatched_records),
                report.excluded or "none")
    return report


def write_manifest(rows: Sequence[dict], out: str | Path) -> Path:
    """Write rows as CSV: ``MANIFEST_COLUMNS`` first, extras after; image paths relative to the file's folder."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame.from_records(list(rows))
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    if len(frame):
        frame["image_path"] = [Path(p).resolve().relative_to(out.parent).as_posix()
                               if Path(p).resolve().is_relative_to(out.parent) else str(Path(p).resolve())
                               for p in frame["image_path"]]
    extras = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    frame[list(MANIFEST_COLUMNS) + extras].to_csv(out, index=False)
    return out
