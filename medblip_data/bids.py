"""BIDS trees (Clinica converters' output), ClinicaDL label TSVs with their BIDS or CAPS root, and BIDS export.

Read with pathlib and pandas (no pybids): the layout needed is four fixed patterns, and pybids would add ~42 MB
of packages (SQLAlchemy, formulaic, bids-validator...) and an SQLite index of the whole tree for them.

BIDS rules (``read_bids``):

- the root has ``dataset_description.json`` (its ``Name`` is the default ``dataset``) and must have
  ``participants.tsv`` with ``participant_id``; per-subject ``sub-<label>/sub-<label>_sessions.tsv`` (with
  ``session_id``) is optional. Cells ``n/a`` (and blanks) are missing values.
- scans are raw T1w images only: ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_<key>-<value>...]
  _T1w.nii[.gz]``. ``derivatives/``, ``sourcedata/``, ``code/`` and every folder not named ``sub-*`` are never
  searched; other NIfTI files in ``anat/`` (T2w, FLAIR, misnamed T1w) are listed in ``report.skipped_files``.
- the record of a session is its ``sessions.tsv`` row over its ``participants.tsv`` row (a session value wins
  unless it is ``n/a``), mapped through ``records.COLUMN_ALIASES``: the session ``diagnosis`` before
  ``diagnosis_bl``, ``age`` before ``age_bl``, ``MMS``/``MMSE`` -> ``mmse``, ``education_level`` -> ``education``,
  ``cdr_global`` -> ``cdr``. Fallbacks used are counted in ``report.fallbacks``.
- ``subject_id`` is the participant label without ``sub-`` (``sub-ADNI002S0295`` -> ``ADNI002S0295``), ``visit``
  the session label without ``ses-``; subjects without session folders (``sub-X/anat/``) have no visit.
- sessions (listed in ``sessions.tsv`` or as folders) without a T1w image are skipped and listed in
  ``report.missing_images``; sessions whose diagnosis and ``diagnosis_bl`` are both ``n/a`` in
  ``report.unlabelled``.

Runs policy (``runs=``): files of one session that differ only by ``run-<n>`` are runs of one acquisition.
``"last"`` (default) keeps the highest run number, as Clinica's ``_select_run`` does (a repeat usually replaces a
failed scan); ``"first"`` keeps the lowest; ``"all"`` keeps every run as its own scan row. A file without ``run``
counts as run 0. Dropped runs are listed in ``report.extra_runs``. Files that differ by another entity
(``acq-``, ``rec-``, ``ce-``) are different acquisitions: each is its own scan row.

ClinicaDL (``read_clinicadl``): a TSV with ``participant_id``, ``session_id``, ``diagnosis`` (and optional record
columns) plus ``root``: a CAPS folder (has ``subjects/``; image ``subjects/sub-X/ses-Y/t1_linear/
sub-X_ses-Y[_T1w]_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz``, both Clinica naming generations) or
a BIDS root (raw T1w, whose participants/sessions records fill the fields the TSV lacks; TSV values win). A row
whose image is missing is listed in ``report.missing_images`` (or raises with ``missing_images="error"``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from labels_medblip import is_missing

from .manifest import ManifestError, read_manifest
from .records import RawRow, SourceReport


logger = logging.getLogger(__name__)

RUN_POLICIES: tuple[str, ...] = ("last", "first", "all")
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
ENTITY = r"_[a-zA-Z]+-[a-zA-Z0-9]+"
BIDS_NAME = re.compile(rf"^sub-(?P<sub>[a-zA-Z0-9]+)(?:_ses-(?P<ses>[a-zA-Z0-9]+))?(?P<entities>(?:{ENTITY})*)"
                       r"_(?P<suffix>[a-zA-Z0-9]+)\.nii(?:\.gz)?$")
CAPS_T1_LINEAR = "{sub}_{ses}*_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz"
PARTICIPANT_COLUMNS: dict[str, str] = {"sex": "sex", "education": "education_level", "apoe4": "apoe4",
                                       "dataset": "dataset"}  # export: manifest -> Clinica participants.tsv
SESSION_COLUMNS: dict[str, str] = {"age": "age", "diagnosis": "diagnosis", "mmse": "MMS", "cdr": "cdr_global",
                                   "notes": "notes"}  # export: manifest -> Clinica sessions.tsv


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def _read_tsv(path: Path, key: str) -> pd.DataFrame:
    """A BIDS TSV as strings (``n/a`` and blanks -> NaN); ``key`` must be a column without blanks or repeats."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=True)
    except (ValueError, pd.errors.ParserError) as err:
        raise ManifestError(f"{path}: cannot parse as TSV ({err})") from err
    if key not in table.columns:
        raise ManifestError(f"{path}: missing column {key!r}; found {list(table.columns)}")
    blank = table[key].isna()
    if blank.any():
        raise ManifestError(f"{path}: column {key!r} is empty at rows {(blank.to_numpy().nonzero()[0] + 2).tolist()}")
    repeated = table[key].duplicated(keep=False)
    if repeated.any():
        raise ManifestError(f"{path}: column {key!r} repeats {sorted(set(table[key][repeated]))} at rows "
                            f"{(repeated.to_numpy().nonzero()[0] + 2).tolist()}")
    return table


def _label(value: str, prefix: str) -> str:
    value = str(value).strip()
    return value.removeprefix(prefix)


def _indexed(table: pd.DataFrame, key: str, prefix: str, path: Path) -> dict[str, tuple[dict, str]]:
    """Label (prefix stripped) -> (row as a dict, "file row n")."""
    return {_label(v, prefix): (row, f"{path} row {i + 2}")
            for i, (v, row) in enumerate(zip(table[key], table.to_dict(orient="records"), strict=True))}


def dataset_name(root: Path) -> str | None:
    """``Name`` of ``root/dataset_description.json`` (None when the file or the field is absent)."""
    path = root / "dataset_description.json"
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text()).get("Name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ManifestError(f"{path}: not a JSON object ({err})") from err
    if name is None or not str(name).strip():
        return None
    return str(name).strip()


# ---------------------------------------------------------------------------- images and runs


def _run(entities: str) -> int:
    match = re.search(r"_run-(\d+)", entities)
    return int(match.group(1)) if match else 0


def select_runs(files: list[Path], runs: str, report: SourceReport) -> list[Path]:
    """Apply the runs policy to candidate files of one session; dropped runs go to ``report.extra_runs``."""
    if runs not in RUN_POLICIES:
        raise ValueError(f"runs must be one of {RUN_POLICIES}, got {runs!r}")
    groups: dict[str, list[tuple[int, Path]]] = {}
    for path in files:  # same name once run and extension are removed: runs of one acquisition
        entities = re.sub(r"_run-\d+|\.nii(\.gz)?$", "", path.name)
        groups.setdefault(entities, []).append((_run(path.name), path))
    kept = []
    for _, members in sorted(groups.items()):
        members.sort(key=lambda m: (m[0], m[1].name))
        chosen = members if runs == "all" else [members[-1] if runs == "last" else members[0]]
        kept.extend(p for _, p in chosen)
        for number, path in members:
            if (number, path) not in chosen:
                report.add("extra_runs", path, f"run {number} dropped: runs={runs!r} keeps run "
                                               f"{chosen[0][0]} ({chosen[0][1].name})")
    return kept


def t1w_images(anat: Path, sub: str, ses: str | None, runs: str, report: SourceReport) -> list[Path]:
    """Raw T1w images of one subject/session in ``anat``; other NIfTI files are listed as skipped."""
    if not anat.is_dir():
        return []
    found = []
    for path in sorted(p for p in anat.iterdir() if _is_nifti(p)):
        match = BIDS_NAME.match(path.name)
        if match is None or match["sub"] != sub or match["ses"] != ses:
            report.add("skipped_files", path, f"name does not match its folder (sub-{sub}"
                                              f"{'' if ses is None else f', ses-{ses}'}) or BIDS naming")
        elif match["suffix"] != "T1w":
            report.add("skipped_files", path, f"suffix {match['suffix']}, not T1w")
        else:
            found.append(path)
    return select_runs(found, runs, report)


def caps_t1_linear(root: Path, sub: str, ses: str, runs: str, report: SourceReport) -> list[Path]:
    """Cropped ``t1-linear`` images of one session in a CAPS folder (runs policy applied)."""
    folder = root / "subjects" / f"sub-{sub}" / f"ses-{ses}" / "t1_linear"
    files = sorted(folder.glob(CAPS_T1_LINEAR.format(sub=f"sub-{sub}", ses=f"ses-{ses}"))) if folder.is_dir() else []
    return select_runs(files, runs, report)


# ---------------------------------------------------------------------------- BIDS


@dataclass
class BidsTables:
    """The clinical tables of a BIDS root: participants (label -> row, origin), sessions per subject."""

    participants: dict[str, tuple[dict, str]]
    sessions: dict[str, dict[str, tuple[dict, str]]]


def read_bids_tables(root: Path) -> BidsTables:
    """``participants.tsv`` and every ``sub-*/sub-*_sessions.tsv`` of a BIDS root.

    Raises:
        ManifestError: no ``participants.tsv``; a table lacks its key column or has blank/repeated keys.
    """
    path = root / "participants.tsv"
    if not path.is_file():
        raise ManifestError(f"{root}: BIDS root has no participants.tsv (needed for the participants' records: "
                            f"participant_id, sex, education_level, age_bl, diagnosis_bl, ...)")
    participants = _indexed(_read_tsv(path, "participant_id"), "participant_id", "sub-", path)
    sessions = {}
    for folder in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        table = folder / f"{folder.name}_sessions.tsv"
        if table.is_file():
            sessions[_label(folder.name, "sub-")] = _indexed(_read_tsv(table, "session_id"), "session_id", "ses-",
                                                             table)
    return BidsTables(participants, sessions)


def _record(tables: BidsTables, sub: str, ses: str | None) -> tuple[dict, str | None]:
    """Participant row overlaid with the session row (non-missing session values win), and its origin."""
    participant, p_origin = tables.participants.get(sub, ({}, None))
    session, s_origin = tables.sessions.get(sub, {}).get(ses, ({}, None)) if ses is not None else ({}, None)
    values = dict(participant)
    values.update({k: v for k, v in session.items() if not is_missing(v) or k not in values})
    values["participant_id"] = f"sub-{sub}"
    if ses is not None:
        values["session_id"] = f"ses-{ses}"
    else:
        values.pop("session_id", None)
    return values, s_origin or p_origin


def read_bids(root: str | Path, report: SourceReport, runs: str = "last") -> list[RawRow]:
    """One raw row per selected raw T1w image of a BIDS root (see the module docstring for the rules)."""
    root = Path(root).resolve()
    tables = read_bids_tables(root)
    rows: list[RawRow] = []
    folders = {_label(p.name, "sub-"): p for p in sorted(root.glob("sub-*")) if p.is_dir()}
    for sub in sorted(set(tables.participants) - set(folders)):
        report.add("missing_images", f"sub-{sub}", f"in participants.tsv ({tables.participants[sub][1]}) but no "
                                                   f"sub-{sub} folder")
    unknown = sorted(set(folders) - set(tables.participants))
    if unknown:
        report.notes.append(f"subjects with a folder but no participants.tsv row (session records only): {unknown}")
    unlisted = 0
    for sub, folder in folders.items():
        listed = tables.sessions.get(sub, {})
        session_dirs = {_label(p.name, "ses-"): p for p in sorted(folder.glob("ses-*")) if p.is_dir()}
        groups: dict[str | None, Path] = {ses: path / "anat" for ses, path in session_dirs.items()}
        if (folder / "anat").is_dir():
            groups[None] = folder / "anat"
        for ses in sorted(set(listed) - set(session_dirs)):
            report.add("missing_images", f"sub-{sub} ses-{ses}", f"in {listed[ses][1]} but no ses-{ses} folder")
        for ses, anat in sorted(groups.items(), key=lambda g: (g[0] is not None, g[0] or "")):
            images = t1w_images(anat, sub, ses, runs, report)
            values, origin = _record(tables, sub, ses)
            origin = origin or str(anat.parent)
            if not images:
                report.add("missing_images", f"sub-{sub}" + (f" ses-{ses}" if ses else ""),
                           f"no raw T1w image in {anat} ({origin})")
                continue
            unlisted += ses is not None and ses not in listed
            rows.extend(RawRow(dict(values), str(image), origin) for image in images)
    if unlisted:
        report.notes.append(f"{unlisted} session folder(s) with a T1w but no sessions.tsv row "
                            f"(records from participants.tsv only)")
    ignored = [name for name in ("derivatives", "sourcedata", "code") if (root / name).exists()]
    if ignored:
        report.notes.append(f"not searched: {ignored}")
    return rows


# ---------------------------------------------------------------------------- ClinicaDL


def root_kind(root: Path) -> str:
    """``"caps"`` (has ``subjects/``) or ``"bids"`` (has ``dataset_description.json`` or ``sub-*`` folders)."""
    if (root / "subjects").is_dir():
        return "caps"
    if (root / "dataset_description.json").is_file() or any(p.is_dir() for p in root.glob("sub-*")):
        return "bids"
    raise ManifestError(f"{root}: neither a CAPS folder (subjects/) nor a BIDS root (dataset_description.json, "
                        f"sub-*/)")


def read_clinicadl(tsv: str | Path, root: str | Path | None, report: SourceReport, runs: str = "last",
                   missing_images: str = "skip") -> list[RawRow]:
    """One raw row per image of a ClinicaDL TSV row (see the module docstring)."""
    tsv = Path(tsv).resolve()
    if root is None:
        raise ManifestError(f"{tsv}: a ClinicaDL TSV needs root= (its BIDS or CAPS folder; train.py: --data_root)")
    root = Path(root).resolve()
    kind = root_kind(root)
    report.root = str(root)
    try:
        table = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=True)
    except (ValueError, pd.errors.ParserError) as err:
        raise ManifestError(f"{tsv}: cannot parse as TSV ({err})") from err
    missing = [c for c in ("participant_id", "session_id") if c not in table.columns]
    if missing:
        raise ManifestError(f"{tsv}: missing column(s) {missing}; found {list(table.columns)}")
    repeated = table.duplicated(["participant_id", "session_id"], keep=False)
    if repeated.any():
        raise ManifestError(f"{tsv}: participant_id/session_id pairs repeat at rows "
                            f"{(repeated.to_numpy().nonzero()[0] + 2).tolist()[:10]}")
    tables = read_bids_tables(root) if kind == "bids" and (root / "participants.tsv").is_file() else None
    if kind == "bids" and tables is None:
        report.notes.append(f"{root} has no participants.tsv: records come from the TSV alone")
    rows = []
    for i, row in enumerate(table.to_dict(orient="records")):
        origin = f"{tsv} row {i + 2}"
        if is_missing(row["participant_id"]) or is_missing(row["session_id"]):
            raise ManifestError(f"{origin}: participant_id and session_id must not be empty")
        sub, ses = _label(row["participant_id"], "sub-"), _label(row["session_id"], "ses-")
        if kind == "caps":
            images = caps_t1_linear(root, sub, ses, runs, report)
            expected = root / "subjects" / f"sub-{sub}" / f"ses-{ses}" / "t1_linear" / CAPS_T1_LINEAR.format(
                sub=f"sub-{sub}", ses=f"ses-{ses}")
        else:
            expected = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
            images = t1w_images(expected, sub, ses, runs, report)
            expected = expected / f"sub-{sub}_ses-{ses}*_T1w.nii[.gz]"
        if not images:
            if missing_images == "error":
                raise ManifestError(f"{origin} (sub-{sub} ses-{ses}): image missing: no {expected}")
            report.add("missing_images", f"{origin} (sub-{sub} ses-{ses})", f"no {expected}")
            continue
        values = _record(tables, sub, ses)[0] if tables is not None else {}
        values.update({k: v for k, v in row.items() if not is_missing(v) or k not in values})
        rows.extend(RawRow(dict(values), str(image), origin) for image in images)
    return rows


# ---------------------------------------------------------------------------- export


def _bids_label(value: Any, what: str) -> str:
    label = re.sub(r"[^a-zA-Z0-9]", "", str(value))
    if not label:
        raise ManifestError(f"{what} {value!r} has no letter or digit to make a BIDS label")
    return label


def _cell(value: Any) -> str:
    """A TSV cell: ``n/a`` for missing, integer-valued floats without ``.0``."""
    if is_missing(value):
        return "n/a"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)  # same file, same size and mtime: the preprocessing cache key is unchanged
    except OSError:
        shutil.copy2(src, dst)


def export_bids(manifest: str | Path | pd.DataFrame, out_dir: str | Path, name: str | None = None) -> Path:
    """Write a manifest's scans as a Clinica-style BIDS tree; returns ``out_dir``.

    Writes ``dataset_description.json`` (``Name``: ``name``, else the one dataset's name), ``participants.tsv``
    (``participant_id``, ``alternative_id_1`` when a subject id had to be reduced to letters and digits, and
    ``sex``, ``education_level``, ``apoe4``, ``dataset`` when constant per subject, plus ``age_bl``,
    ``diagnosis_bl`` from the subject's first row), ``sub-X/sub-X_sessions.tsv`` (``session_id``, ``age``,
    ``diagnosis``, ``MMS``, ``cdr_global``, ``notes``, extra columns) and hard links (else copies) of the images
    as ``sub-X/ses-Y/anat/sub-X_ses-Y_T1w.nii[.gz]``. Reading it back with ``read_corpus_source`` gives the
    manifest's rows. Without any visit (and one scan per subject) the layout has no session level.

    Raises:
        ManifestError: an image is not a NIfTI file, labels collide after reduction, two rows share a subject
            and visit, or some rows lack a visit.
    """
    frame = read_manifest(manifest) if isinstance(manifest, (str, Path)) else manifest.copy()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame["_sub"] = [_bids_label(s, "subject_id") for s in frame["subject_id"]]
    clash = frame.groupby("_sub")["subject_id"].nunique()
    if (clash > 1).any():
        raise ManifestError(f"subject ids collide as BIDS labels: {sorted(clash[clash > 1].index)}")
    no_visit = frame["visit"].map(is_missing)
    if no_visit.any() and not (no_visit.all() and frame["_sub"].is_unique):
        raise ManifestError(f"rows without a visit: {frame.loc[no_visit, 'subject_id'].tolist()[:5]} (needed "
                            f"unless every subject has one scan and no row has a visit)")
    sessions = not no_visit.all()
    frame["_ses"] = [_bids_label(v, "visit") if sessions else None for v in frame["visit"]]
    repeated = frame.duplicated(["_sub", "_ses"], keep=False)
    if repeated.any():
        raise ManifestError(f"several scans for one subject and visit: "
                            f"{frame.loc[repeated, ['subject_id', 'visit']].values.tolist()[:5]}")
    extras = [c for c in frame.columns if c not in (*PARTICIPANT_COLUMNS, *SESSION_COLUMNS, "subject_id",
                                                    "image_path", "visit", "_sub", "_ses")]
    constant = [c for c in PARTICIPANT_COLUMNS
                if frame.groupby("_sub")[c].agg(lambda s: s.map(_cell).nunique()).max() <= 1]
    per_session = {**{c: c for c in PARTICIPANT_COLUMNS if c not in constant}, **SESSION_COLUMNS,
                   **{c: c for c in extras}}
    participants = []
    for sub, rows in frame.groupby("_sub", sort=True):
        first = rows.iloc[0]
        record = {"participant_id": f"sub-{sub}"}
        if (frame["_sub"] != frame["subject_id"].astype(str)).any():
            record["alternative_id_1"] = first["subject_id"]
        record.update({PARTICIPANT_COLUMNS[c]: first[c] for c in constant})
        if sessions:
            record.update(age_bl=first["age"], diagnosis_bl=first["diagnosis"])
            table = pd.DataFrame({"session_id": [f"ses-{s}" for s in rows["_ses"]],
                                  **{new: rows[old].tolist() for old, new in per_session.items()}})
            (out / f"sub-{sub}").mkdir(parents=True, exist_ok=True)
            table.map(_cell).to_csv(out / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", sep="\t", index=False)
        else:
            record.update({new: first[old] for old, new in per_session.items()})
        participants.append(record)
        for _, row in rows.iterrows():
            src = Path(row["image_path"])
            if not src.name.lower().endswith(NIFTI_SUFFIXES):
                raise ManifestError(f"{src}: BIDS export needs NIfTI images (.nii / .nii.gz)")
            stem = f"sub-{sub}" + (f"_ses-{row['_ses']}" if sessions else "")
            folder = out / f"sub-{sub}" / (f"ses-{row['_ses']}" if sessions else "") / "anat"
            _link(src, folder / f"{stem}_T1w{'.nii.gz' if src.name.lower().endswith('.gz') else '.nii'}")
    pd.DataFrame(participants).map(_cell).to_csv(out / "participants.tsv", sep="\t", index=False)
    names = sorted(set(frame["dataset"]))
    description = {"Name": name or (names[0] if len(names) == 1 else "MedBLIP corpus"), "BIDSVersion": "1.9.0",
                   "DatasetType": "raw", "GeneratedBy": [{"Name": "MedBLIP medblip_data.bids.export_bids"}]}
    (out / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    logger.info("wrote BIDS tree %s: %d subjects, %d scans", out, len(participants), len(frame))
    return out
