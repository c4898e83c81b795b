"""Cohort manifests and the subject-level corpus split.

A manifest is a CSV or JSONL file with one row per scan and these columns (``MANIFEST_COLUMNS``):

============  ========  ===============================================================================
column        required  meaning
============  ========  ===============================================================================
subject_id    yes       participant id, unique within ``dataset`` (all scans of a person share it)
image_path    yes       NIfTI file or DICOM folder, absolute or relative to the manifest's folder
diagnosis     yes       raw cohort label (CN, NC, HC, MCI, EMCI, LMCI, AD, Dementia, CDR score, ...)
dataset       yes       cohort or site name (the unit held out for zero-shot evaluation)
visit         no        visit code (bl, m12, MR1, ...)
age           no        years at the scan
sex           no        "F" / "M"
education     no        years of schooling
mmse          no        Mini-Mental State Examination, 0-30
cdr           no        Clinical Dementia Rating, global score
apoe4         no        number of APOE e4 alleles, 0/1/2
notes         no        free text appended to the health record
============  ========  ===============================================================================

Other columns (e.g. the synthetic cohort's ``ventricles_ml``) are kept. Each image file appears once (compared
after resolving the path): a repeated file is a duplicate row, a scan under two diagnoses, or one scan under two
subject ids, and is refused with a ``ManifestError`` naming the rows. ``load_corpus`` normalizes ``diagnosis`` to
CN/MCI/AD through ``DIAGNOSIS_TABLE`` (the raw label is kept in ``diagnosis_raw``) and splits by subject, a subject
being the pair (``dataset``, ``subject_id``): a person's scans never land in two splits, no image file lands in two
splits, and whole cohorts can be held out as ``zeroshot``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from labels_medblip import DIAGNOSIS_LABELS, is_missing, normalize_diagnosis, normalize_sex, record_number


logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "image_path", "diagnosis", "dataset")
OPTIONAL_COLUMNS: tuple[str, ...] = ("visit", "age", "sex", "education", "mmse", "cdr", "apoe4", "notes")
MANIFEST_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
TEXT_COLUMNS: tuple[str, ...] = ("subject_id", "image_path", "diagnosis", "dataset", "visit", "sex", "notes")
NUMERIC_COLUMNS: tuple[str, ...] = ("age", "education", "mmse", "cdr", "apoe4")
SPLITS: tuple[str, ...] = ("train", "validation", "test")


class ManifestError(ValueError):
    """A manifest file is malformed; the message names the file, the column and the rows."""


# ---------------------------------------------------------------------------- reading


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    kind = "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "csv"
    try:
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_csv(path, dtype=str, keep_default_na=True)
    except (ValueError, pd.errors.ParserError) as err:
        raise ManifestError(f"{path}: cannot parse as {kind} ({err})") from err


def _blank(series: pd.Series) -> pd.Series:
    return series.map(is_missing).astype(bool)


def _coerce(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Text columns -> str/None, numeric columns -> float/NaN (a non-number raises, naming rows)."""
    for column in TEXT_COLUMNS:
        blank = _blank(frame[column])
        frame[column] = [None if b else str(v).strip() for v, b in zip(frame[column], blank)]
    for column in NUMERIC_COLUMNS:
        values = pd.to_numeric(frame[column].replace("", np.nan), errors="coerce")
        bad = values.isna() & ~_blank(frame[column])
        if bad.any():
            rows = (np.flatnonzero(bad.to_numpy()) + 2).tolist()[:5]
            raise ManifestError(f"{path}: column {column!r} has non-numeric values at rows {rows}")
        frame[column] = values.astype(float)
        _check_range(frame[column], column, path)
    bad_sex = [row + 2 for row, s in enumerate(frame["sex"]) if not is_missing(s) and normalize_sex(s) is None]
    if bad_sex:
        raise ManifestError(f"{path}: column 'sex' is neither F/M nor female/male at rows {bad_sex[:5]}")
    frame["sex"] = [None if is_missing(s) else normalize_sex(s) for s in frame["sex"]]
    return frame


def _repeated_image(path: str, part: pd.DataFrame, rows: str) -> str:
    """What is wrong with several rows (`part`) listing one image file."""
    subjects = sorted(set(zip(part["dataset"], part["subject_id"])))
    if len(subjects) > 1:
        return f"image {path} under {len(subjects)} subject ids {subjects} (rows {rows}): one scan, one person"
    diagnoses = sorted(set(map(str, part["diagnosis"])))
    if len(diagnoses) > 1:
        return f"image {path} under {len(diagnoses)} diagnoses {diagnoses} (rows {rows})"
    differing = [c for c in part.columns if not c.startswith("_") and part[c].astype(str).nunique() > 1]
    if not differing:
        return f"duplicate rows {rows} (image {path})"
    return f"image {path} listed twice with different {differing} (rows {rows})"


def refuse_repeated_images(frame: pd.DataFrame, rows: Sequence[str], where: str) -> None:
    """Raise ``ManifestError`` if an image file (compared after resolving the path) is in two rows; `rows` names
    each row of `frame` in the message."""
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, image in enumerate(frame["image_path"]):
        by_image[str(Path(image).resolve())].append(i)
    problems = [_repeated_image(image, frame.iloc[idx], ", ".join(rows[i] for i in idx))
                for image, idx in by_image.items() if len(idx) > 1]
    if problems:
        raise ManifestError(f"{where}: {len(problems)} image file(s) listed more than once: "
                            + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))


def _check_range(values: pd.Series, column: str, path: Path) -> None:
    """Refuse values a health record may not hold (labels_medblip.record_number), naming the rows: caught here,
    not at the first training batch that renders them."""
    bad = []
    for row, value in enumerate(values):
        try:
            if not math.isnan(value):
                record_number(value, column)
        except ValueError as err:
            bad.append((row + 2, err))
    if bad:
        raise ManifestError(f"{path}: column {column!r} is out of range at rows {[r for r, _ in bad][:5]} "
                            f"(first: {bad[0][1]})")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate one manifest (CSV, or JSONL for ``.jsonl``/``.json``/``.ndjson``).

    Returns a DataFrame with every ``MANIFEST_COLUMNS`` column (missing optional ones filled with None/NaN),
    any extra columns, and ``image_path`` resolved to an absolute path (relative paths are taken from the
    manifest's folder). The raw ``diagnosis`` is not normalized here.

    Raises:
        ManifestError: file missing or unparsable, a required column absent, empty values in a required
            column (the message names the file, the column and the first rows, counted from 2 = first data row),
            or an image file in two rows (duplicate rows, two diagnoses or two subject ids for one scan).
    """
    path = Path(path).resolve()
    frame = _read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; found {list(frame.columns)}")
    for column in REQUIRED_COLUMNS:
        blank = _blank(frame[column])
        if blank.any():
            rows = (np.flatnonzero(blank.to_numpy()) + 2).tolist()[:5]
            raise ManifestError(f"{path}: column {column!r} is empty at rows {rows}")
    for column in OPTIONAL_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    frame = _coerce(frame.astype(object), path)
    frame["image_path"] = [str(p) if Path(p).is_absolute() else str((path.parent / p).resolve())
                           for p in frame["image_path"]]
    refuse_repeated_images(frame, [str(i + 2) for i in range(len(frame))], str(path))
    return frame


# ---------------------------------------------------------------------------- splitting


def subject_key(dataset: str, subject_id: str) -> tuple[str, str]:
    """Identity used for splitting: subject ids are unique only within a dataset. A pair, never a joined string
    (``a/b`` + ``c`` and ``a`` + ``b/c`` are two people)."""
    return (dataset, subject_id)


def _subject_labels(frame: pd.DataFrame) -> pd.Series:
    """One label per subject for stratification: the most severe class among the subject's scans."""
    order = {c: i for i, c in enumerate(DIAGNOSIS_LABELS)}
    rank = frame["diagnosis"].map(order)
    worst = rank.groupby([frame["dataset"], frame["subject_id"]]).max()
    return pd.Series([DIAGNOSIS_LABELS[r] for r in worst], index=[subject_key(*key) for key in worst.index],
                     dtype=object)


def assign_splits(frame: pd.DataFrame, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[tuple[str, str], str]:
    """Subject key -> split, stratified by (dataset, subject label).

    Within each stratum subjects are shuffled with ``np.random.default_rng(seed)`` and placed by systematic
    sampling with a random start, so expected split sizes are exact even for small strata.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"need 0 <= val_fraction, test_fraction and their sum < 1; got "
                         f"{val_fraction}, {test_fraction}")
    rng = np.random.default_rng(seed)
    labels = _subject_labels(frame)
    strata: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for key in sorted(labels.index):
        strata[(key[0], labels[key])].append(key)
    assignment: dict[tuple[str, str], str] = {}
    for stratum in sorted(strata):
        keys = [strata[stratum][i] for i in rng.permutation(len(strata[stratum]))]
        offset = rng.random()
        for i, key in enumerate(keys):
            u = (i + offset) / len(keys)
            assignment[key] = "test" if u < test_fraction else (
                "validation" if u < test_fraction + val_fraction else "train")
    return assignment


def split_report(dataset_dict: Any) -> pd.DataFrame:
    """Subjects and scans per split and class (rows: split x class, plus an 'all' class per split)."""
    records = []
    for split, ds in dataset_dict.items():
        table = pd.DataFrame({"subject": [subject_key(d, s) for d, s in zip(ds["dataset"], ds["subject_id"])],
                              "diagnosis": ds["diagnosis"]})
        for cls in (*DIAGNOSIS_LABELS, "all"):
            part = table if cls == "all" else table[table["diagnosis"] == cls]
            records.append({"split": split, "class": cls, "subjects": part["subject"].nunique(),
                            "scans": len(part)})
    return pd.DataFrame.from_records(records, columns=["split", "class", "subjects", "scans"])


def check_subject_disjoint(dataset_dict: Any) -> None:
    """Raise ``ValueError`` if any subject (dataset, subject_id) has scans in two splits, or one image file (after
    resolving its path) is in two splits, naming it."""
    seen: dict[tuple[str, str], str] = {}
    seen_images: dict[str, str] = {}
    for split, ds in dataset_dict.items():
        for key in {subject_key(d, s) for d, s in zip(ds["dataset"], ds["subject_id"])}:
            if key in seen:
                raise ValueError(f"subject leak: dataset {key[0]!r}, subject {key[1]!r} has scans in both "
                                 f"{seen[key]!r} and {split!r}")
            seen[key] = split
        for image in {str(Path(p).resolve()) for p in ds["image_path"]}:
            if image in seen_images:
                raise ValueError(f"image leak: {image} is in both {seen_images[image]!r} and {split!r}")
            seen_images[image] = split


def _normalize_labels(frame: pd.DataFrame) -> pd.DataFrame:
    frame["diagnosis_raw"] = frame["diagnosis"].astype(str)
    labels = []
    for i, raw in enumerate(frame["diagnosis"]):
        try:
            labels.append(normalize_diagnosis(raw))
        except ValueError as err:
            raise ManifestError(f"{frame['_manifest'].iat[i]}: column 'diagnosis', subject "
                                f"{frame['subject_id'].iat[i]!r}: {err}") from None
    frame["diagnosis"] = labels
    return frame


def _to_dataset(frame: pd.DataFrame) -> Any:
    import datasets

    records = frame.drop(columns=["_subject", "_manifest", "_row"]).to_dict(orient="list")
    for column in NUMERIC_COLUMNS:
        records[column] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                           for v in records[column]]
    features = {c: datasets.Value("string") for c in (*TEXT_COLUMNS, "diagnosis_raw")}
    features.update({c: datasets.Value("float64") for c in NUMERIC_COLUMNS})
    for column, values in records.items():
        if column not in features:
            series = pd.Series(values)
            numeric = pd.to_numeric(series, errors="coerce")
            if numeric.notna().sum() == series.notna().sum():
                records[column] = [None if math.isnan(v) else float(v) for v in numeric]
                features[column] = datasets.Value("float64")
            else:
                records[column] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                                   for v in values]
                features[column] = datasets.Value("string")
    return datasets.Dataset.from_dict(records, features=datasets.Features(features))


def load_corpus(manifests: Sequence[Any] | Any, holdout_datasets: Iterable[str] = (),
                val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> Any:
    """Read manifests (or any corpus source: BIDS, ClinicaDL, ``datasets``; ``medblip_data.formats``) into a
    ``datasets.DatasetDict`` split by subject. Sources that need options go in as ``formats.CorpusSource``.

    Splits: ``train``, ``validation``, ``test`` (subjects of the non-held-out datasets, stratified by dataset
    and subject class) and, if ``holdout_datasets`` is given, ``zeroshot`` (every scan of those datasets).
    Each row has the manifest columns (``image_path`` absolute, ``diagnosis`` in CN/MCI/AD), ``diagnosis_raw``
    and any extra columns. The split report (``split_report``) is logged and stored as ``.split_report``; the
    source reports (``formats.SourceReport``, one per source) as ``.source_reports``.

    Raises:
        ManifestError: a manifest is malformed or has an unknown diagnosis label, or an image file is listed
            twice (within or across manifests).
        ValueError: a held-out dataset is absent, fractions are invalid, or a subject leaks (never expected).
    """
    import datasets

    from .formats import CorpusSource, is_dataset_object, read_corpus_source

    single = isinstance(manifests, (str, Path, CorpusSource)) or is_dataset_object(manifests)
    paths = [manifests] if single else list(manifests)
    if not paths:
        raise ValueError("load_corpus needs at least one manifest")
    frames, reports = [], []
    for path in paths:  # any corpus source (formats.detect_format); a CSV/JSONL manifest goes to read_manifest
        frame, report = read_corpus_source(path)
        frame["_manifest"] = report.source
        name = Path(report.source).name
        frame["_row"] = [f"{name}:{i + 2}" if report.format == "manifest" else f"{name} row {i}"
                         for i in range(len(frame))]
        frames.append(frame)
        reports.append(report)
    frame = pd.concat(frames, ignore_index=True)
    refuse_repeated_images(frame, list(frame["_row"]), f"sources {[report.source for report in reports]}")
    frame = _normalize_labels(frame)
    frame["_subject"] = [subject_key(d, s) for d, s in zip(frame["dataset"], frame["subject_id"])]
    holdout = set(holdout_datasets)
    unknown = sorted(holdout - set(frame["dataset"]))
    if unknown:
        raise ValueError(f"holdout dataset(s) {unknown} not in the manifests; datasets: "
                         f"{sorted(set(frame['dataset']))}")
    is_holdout = frame["dataset"].isin(holdout)
    assignment = assign_splits(frame[~is_holdout], val_fraction, test_fraction, seed)
    split_of = pd.Series(["zeroshot" if held else assignment[key] for key, held in zip(frame["_subject"], is_holdout)],
                         index=frame.index)
    full = _to_dataset(frame)
    names = SPLITS + (("zeroshot",) if holdout else ())
    corpus = datasets.DatasetDict({name: full.select(np.flatnonzero((split_of == name).to_numpy()))
                                   for name in names})
    check_subject_disjoint(corpus)
    report = split_report(corpus)
    corpus.split_report = report
    corpus.source_reports = reports  # formats.SourceReport per source: format, source, counts, what was left out
    logger.info("corpus split (seed %d, held out: %s):\n%s", seed, sorted(holdout) or "none",
                report.to_string(index=False))
    return corpus
