"""One entry point for every corpus format: CSV/JSONL manifests, BIDS, ClinicaDL TSVs and ``datasets`` sources.

``read_corpus_source(source, ...)`` returns ``(frame, report)``: the frame is exactly what ``read_manifest``
returns for the equivalent CSV manifest (``MANIFEST_COLUMNS`` first, extra columns after, ``image_path``
absolute, raw ``diagnosis`` kept, numeric columns float, ``sex`` F/M), and the report (``records.SourceReport``)
says which format and source the rows came from and lists everything left out. ``load_corpus`` accepts the same
sources (and ``CorpusSource`` objects carrying options). The format is detected (``detect_format``):

==============  ======================================================================  =========================
format          detected by                                                             read by
==============  ======================================================================  =========================
manifest        a ``.csv``/``.jsonl``/``.json``/``.ndjson`` file                         ``read_manifest``
bids            a folder with ``dataset_description.json`` (and no ``subjects/``)       ``bids.read_bids``
clinicadl       a ``.tsv`` file (needs ``root=``: its BIDS or CAPS folder)               ``bids.read_clinicadl``
datasets-disk   a folder with ``dataset_dict.json`` or ``state.json``                   ``datasets.load_from_disk``
niftifolder     a folder with ``metadata.csv``/``.jsonl``/``.parquet``                   ``load_dataset("niftifolder")``
parquet         a ``.parquet`` file, or a folder holding ``*.parquet`` files             ``load_dataset("parquet")``
hub             ``owner/name`` that is not a local path (``hf://datasets/`` stripped)   ``load_dataset(id)``
datasets        a ``datasets.Dataset`` / ``DatasetDict`` object                         used as is
==============  ======================================================================  =========================

Examples::

    frame, report = read_corpus_source("data/bids")                                   # BIDS root
    frame, report = read_corpus_source("labels/train.tsv", root="caps")               # ClinicaDL + CAPS
    frame, report = read_corpus_source("data/synthetic")                               # niftifolder
    frame, report = read_corpus_source("me/adni-t1", split="test", label_column="DX")  # Hub dataset
    corpus = load_corpus([CorpusSource("labels.tsv", root="bids"), "extra.csv"])

Column names map through ``records.COLUMN_ALIASES`` (documented there); ``image_column``, ``label_column`` and
``column_map`` override it. ``train.py`` takes the reading options as flags (``CorpusArguments``: ``--data_root``,
``--image_column``, ``--label_column``, ``--column_map`` as JSON, ``--bids_runs``, ``--eval_split``).
A CSV/JSONL manifest without overrides is read by ``read_manifest`` unchanged; with
overrides, its columns go through the same mapping as every other source. Labels are checked against the label
table at read time for every format except a plain manifest (``load_corpus`` checks those): an unknown label
raises ``ManifestError`` naming the file, the row and the source column.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from labels_medblip import is_missing

from .manifest import ManifestError, _read_table, read_manifest
from .records import (
    RawRow,
    SourceReport,
    count_fallbacks,
    finalise,
    map_rows,
    match_columns,
    resolve_aliases,
)


logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("manifest", "bids", "clinicadl", "datasets-disk", "niftifolder", "parquet", "hub",
                            "datasets")
MANIFEST_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".json", ".ndjson")
NIFTIFOLDER_METADATA: tuple[str, ...] = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
HUB_ID = re.compile(r"^(?:hf://datasets/)?(?P<id>[A-Za-z0-9][\w.-]*/[\w.-]+)$")


@dataclass(frozen=True)
class CorpusSource:
    """A corpus source with its reading options, for ``load_corpus`` (fields: ``read_corpus_source``'s args)."""

    source: Any
    root: str | Path | None = None
    image_column: str | None = None
    label_column: str | None = None
    column_map: Mapping[str, str] | None = None
    dataset: str | None = None
    split: str | None = None
    runs: str = "last"
    missing_images: str = "skip"
    materialize_dir: str | Path | None = None
    cache_dir: str | None = None
    format: str | None = None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}


def parse_column_map(value: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """``--column_map``: a JSON object ``{"source column": "manifest column"}`` (``json.loads``, never ``eval``),
    or a mapping already (from a YAML/JSON config file). Targets are checked against ``MANIFEST_COLUMNS``.

    Raises:
        ValueError: not JSON, not an object of strings, or a target that is not a manifest column.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--column_map must be a JSON object such as '{{\"PTEDUCAT\": \"education\"}}', "
                             f"got {value!r} ({err})") from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"--column_map must map source column names to manifest column names, got {value!r}")
    resolve_aliases(column_map=value)  # unknown targets raise now, before any data is read
    return dict(value)


@dataclass
class CorpusArguments:
    """Command-line options of ``read_corpus_source`` shared by every ``--manifests`` / ``--eval_manifest`` source
    (``train.py``'s ``DataArguments`` extends this class; ``HfArgumentParser`` reads the help strings)."""

    data_root: str | None = field(default=None, metadata={
        "aliases": ["--caps_directory", "--bids_directory"],
        "help": "BIDS or CAPS folder that ClinicaDL TSV sources point into"})
    image_column: str | None = field(default=None, metadata={
        "help": "image column of the sources (default: a datasets.Nifti() column, else image_path, image, nifti, "
                "file_name, path, t1w or mri)"})
    label_column: str | None = field(default=None, metadata={
        "help": "diagnosis column of the sources (default: diagnosis, label, dx, then diagnosis_bl, diagnosis_sc)"})
    column_map: str | None = field(default=None, metadata={
        "help": 'other source column names, as JSON {"source column": "manifest column"}, e.g. '
                '\'{"PTEDUCAT": "education", "MMSE": "mmse"}\''})
    bids_runs: Literal["last", "first", "all"] = field(default="last", metadata={
        "help": "several runs of one BIDS/CAPS session: keep the last (Clinica's rule), the first, or all"})
    eval_split: str | None = field(default=None, metadata={
        "help": "--eval_only: the split of a datasets source to evaluate (default: every split)"})

    def __post_init__(self) -> None:
        parse_column_map(self.column_map)  # a bad --column_map fails at parsing, not after the model is built

    def source_options(self) -> dict[str, Any]:
        """Keyword arguments of ``read_corpus_source`` / ``CorpusSource`` (every one except ``split``)."""
        return {"root": self.data_root, "image_column": self.image_column, "label_column": self.label_column,
                "column_map": parse_column_map(self.column_map), "runs": self.bids_runs}

    def corpus_sources(self, sources: list[Any]) -> list[CorpusSource]:
        """The training sources (``--manifests``) with these options, for ``load_corpus``."""
        return [CorpusSource(source, **self.source_options()) for source in sources]


def is_dataset_object(source: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (checked without importing ``datasets``)."""
    return type(source).__module__.startswith("datasets.") and hasattr(source, "column_names")


def detect_format(source: Any) -> str:
    """The format of ``source`` (one of ``FORMATS``; see the module docstring).

    Raises:
        ManifestError: a path that exists but matches no format, or neither a path nor a Hub id.
    """
    if isinstance(source, CorpusSource):
        return source.format or detect_format(source.source)
    if is_dataset_object(source):
        return "datasets"
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in MANIFEST_SUFFIXES:
            return "manifest"
        if suffix == ".tsv":
            return "clinicadl"
        if suffix == ".parquet":
            return "parquet"
        raise ManifestError(f"{path}: unknown corpus file type {suffix!r}: expected a manifest "
                            f"({', '.join(MANIFEST_SUFFIXES)}), a ClinicaDL .tsv or a .parquet file")
    if path.is_dir():
        if (path / "subjects").is_dir():
            raise ManifestError(f"{path}: a CAPS folder holds no labels: pass the ClinicaDL TSV as the source "
                                f"and this folder as root= (train.py: --data_root)")
        if (path / "dataset_description.json").is_file():
            return "bids"
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "datasets-disk"
        if any((path / name).is_file() for name in NIFTIFOLDER_METADATA):
            return "niftifolder"
        if next(path.rglob("*.parquet"), None) is not None:
            return "parquet"
        raise ManifestError(f"{path}: folder of no known corpus format: looked for dataset_description.json "
                            f"(BIDS), dataset_dict.json/state.json (save_to_disk), {NIFTIFOLDER_METADATA} "
                            f"(niftifolder), *.parquet")
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"  # read_manifest names the missing file
    if isinstance(source, str) and HUB_ID.match(source) and path.suffix.lower() not in (".tsv", ".parquet"):
        return "hub"
    raise ManifestError(f"{source}: not found (neither a local file or folder nor a Hub dataset id owner/name)")


def read_eval_dataset(source: Any, **options: Any) -> tuple[Any, SourceReport]:
    """``read_corpus_source`` as a ``datasets.Dataset`` in (dataset, subject, visit) order, for ``--eval_only``:
    the evaluation batches, and so the numbers, do not depend on the order in which a source lists its scans."""
    import datasets

    frame, report = read_corpus_source(source, **options)
    frame = frame.sort_values(["dataset", "subject_id", "visit"], kind="stable")
    return datasets.Dataset.from_pandas(frame, preserve_index=False), report


def _where(source: Any, fmt: str) -> str:
    if fmt == "datasets":
        return f"<in-memory {type(source).__name__}>"
    if fmt == "hub":
        return HUB_ID.match(source)["id"]
    return str(Path(source).resolve())


def _default_name(source: Any, fmt: str, where: str, root: str | Path | None = None) -> str:
    """Dataset name where no column gives one: the BIDS (ClinicaDL: root's) ``Name`` or folder name, the Hub
    id's name, the ``datasets`` info's name, or the source's folder name / file stem."""
    from .bids import dataset_name

    if fmt in ("bids", "clinicadl"):
        folder = Path(where if fmt == "bids" else root).resolve()
        return dataset_name(folder) or folder.name
    if fmt == "hub":
        return where.split("/")[-1]
    if fmt == "datasets":
        name = next((d.info.dataset_name for d in (source.values() if hasattr(source, "values") else [source])
                     if d.info.dataset_name), None)
        return name or "dataset"
    path = Path(where)
    return path.stem if path.is_file() else path.name


def _manifest_rows(path: Path, aliases: Mapping, report: SourceReport) -> list[RawRow]:
    """A CSV/JSONL manifest read with column overrides (relative image paths from the file's folder)."""
    frame = _read_table(path)
    image = match_columns(frame.columns, {"image_path": aliases["image_path"]}).get("image_path")
    if not image:
        raise ManifestError(f"{path}: no image column: none of {list(aliases['image_path'])}; found "
                            f"{list(frame.columns)} (pass image_column=)")
    report.columns["image_path"] = image[:1]
    rows = []
    for i, record in enumerate(frame.astype(object).to_dict(orient="records")):
        value = record.pop(image[0])
        rows.append(RawRow(record, None if is_missing(value) else str(
            value if Path(value).is_absolute() else (path.parent / value).resolve()), f"{path} row {i + 2}"))
    return rows


def read_corpus_source(source: Any, *, root: str | Path | None = None, image_column: str | None = None,
                       label_column: str | None = None, column_map: Mapping[str, str] | None = None,
                       dataset: str | None = None, split: str | None = None, runs: str = "last",
                       missing_images: str = "skip", materialize_dir: str | Path | None = None,
                       cache_dir: str | None = None, format: str | None = None) -> tuple[pd.DataFrame, SourceReport]:
    """Read any corpus source into manifest rows and a report of what was read and left out.

    Args:
        source: a path, a Hub id, a ``datasets.Dataset``/``DatasetDict``, or a ``CorpusSource`` (its options
            are used; keyword arguments given here are ignored then).
        root: BIDS or CAPS folder of a ClinicaDL TSV.
        image_column, label_column, column_map: column overrides (``records.COLUMN_ALIASES``).
        dataset: the ``dataset`` value of every row (default: a dataset column, else the source's name).
        split: read only this split of a ``datasets`` source.
        runs: BIDS/CAPS runs policy, ``"last"`` (Clinica's), ``"first"`` or ``"all"`` (``bids`` module).
        missing_images: ``"skip"`` (list in the report) or ``"error"``, for rows whose image is missing.
        materialize_dir: where images given as bytes are written (``hf_datasets``).
        cache_dir: ``datasets`` cache folder for ``load_dataset``.
        format: force a format instead of detecting it.

    Returns:
        ``(frame, report)``: the frame ``read_manifest`` would give for the equivalent CSV; the
        ``SourceReport``.

    Raises:
        ManifestError: unreadable or malformed source, missing required column, non-numeric value, unknown
            label, no scan at all; the message names the file, the row and the column.
    """
    if isinstance(source, CorpusSource):
        return read_corpus_source(source.source, **source.options())
    if missing_images not in ("skip", "error"):
        raise ValueError(f"missing_images must be 'skip' or 'error', got {missing_images!r}")
    fmt = format or detect_format(source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if split is not None and fmt in ("manifest", "bids", "clinicadl"):
        raise ValueError(f"{source}: split={split!r} (--eval_split) applies to datasets sources; a {fmt} has no splits")
    where = _where(source, fmt)
    report = SourceReport(format=fmt, source=where)
    overrides = image_column or label_column or column_map or dataset
    if fmt == "manifest" and not overrides:
        frame = read_manifest(source)
        return frame, _summarise(frame, report)
    aliases = resolve_aliases(image_column, label_column, column_map)
    rows = _read_rows(source, fmt, where, aliases, report, root=root, split=split, runs=runs,
                      missing_images=missing_images, materialize_dir=materialize_dir, cache_dir=cache_dir,
                      forced_image=image_column is not None)
    mapped, sources = map_rows(rows, aliases, report, dataset=_default_name(source, fmt, where, root))
    if dataset is not None:
        for row in mapped:
            row["dataset"] = dataset
    origins = [r.origin for r in rows]
    if fmt == "bids":  # clinical rows without any label are expected in BIDS trees: list them, keep the rest
        labelled = [i for i, row in enumerate(mapped) if not is_missing(row["diagnosis"])]
        for i in sorted(set(range(len(mapped))) - set(labelled)):
            report.add("unlabelled", f"{origins[i]} ({Path(rows[i].image).name})",
                       f"no diagnosis (none of {report.columns.get('diagnosis') or aliases['diagnosis']} is set)")
        mapped, sources, origins = ([seq[i] for i in labelled] for seq in (mapped, sources, origins))
    count_fallbacks(sources, report)
    if not mapped:
        raise ManifestError(f"{where}: no scan with an image and a label ({report.describe()}; "
                            f"missing images: {report.missing_images[:3]}, unlabelled: {report.unlabelled[:3]})")
    frame = finalise(mapped, sources, origins, where, aliases)
    return frame, _summarise(frame, report)


def _read_rows(source: Any, fmt: str, where: str, aliases: Mapping, report: SourceReport, *, root, split, runs,
               missing_images, materialize_dir, cache_dir, forced_image: bool) -> list[RawRow]:
    from . import bids, hf_datasets

    if fmt == "manifest":
        return _manifest_rows(Path(where), aliases, report)
    if fmt == "bids":
        return bids.read_bids(where, report, runs=runs)
    if fmt == "clinicadl":
        return bids.read_clinicadl(where, root, report, runs=runs, missing_images=missing_images)
    splits = hf_datasets.open_source(source if fmt == "datasets" else where, fmt, split=split, cache_dir=cache_dir)
    base = Path(where) if fmt in ("datasets-disk", "niftifolder", "parquet") else None
    if base is not None and base.is_file():
        base = base.parent
    return hf_datasets.read_datasets(splits, where, aliases, forced_image, report, base=base,
                                     materialize_dir=materialize_dir, missing_images=missing_images)


def _summarise(frame: pd.DataFrame, report: SourceReport) -> SourceReport:
    report.scans = len(frame)
    report.subjects = len(set(zip(frame["dataset"], frame["subject_id"], strict=True)))
    report.datasets = sorted(set(frame["dataset"]))
    left_out = {k: v for k, v in report.counts().items() if k not in ("scans", "subjects", "materialised") and v}
    logger.info("%s", report.describe())
    if left_out:
        logger.warning("%s: left out %s (listed in the source report)", report.source, left_out)
    return report
