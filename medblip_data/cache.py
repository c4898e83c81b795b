"""Preprocessing cache: the image processor applied once per scan, patches stored as float16 in Arrow.

``build_cache(dataset, image_processor, cache_dir)`` maps ``image_processor(images=[path], return_tensors="np")``
over the ``image_path`` column with ``datasets.map`` (``num_proc`` processes, a progress bar) and adds:

- ``pixel_values``: ``(N, P)`` float16 patches (``N`` patches of ``P = C * pd * ph * pw`` values);
- ``patch_grid``: ``(3,)`` int64 patch grid.

The cache lives in ``cache_dir/<name>-<key>`` where ``key`` hashes the format version, the processor settings
(``image_processor.to_dict()``), the dataset rows and the size, mtime and ctime of every file the loader reads (the
file itself, or every file of a DICOM folder: a rewritten slice changes the key, and so does a file put back with
its old mtime, since that sets a new ctime). A matching cache is reused, anything else gets a new folder.

Integrity: ``cache.json`` records the SHA-256 of every file of ``dataset/``; opening a cache checks them (``verify``),
so bytes changed on disk are never loaded. A cache whose ``cache.json`` is missing or unreadable, whose ``dataset/``
is missing or whose checksums disagree is rebuilt, with a warning naming the problem.

Concurrency: a build holds the file lock ``<name>-<key>.lock`` (``filelock``), writes into a unique hidden folder
``.<name>-<key>.tmp-<pid>-<random>`` and renames it into place when complete, so a folder under the final name is
always complete, and a process that finds the lock taken waits and then reuses what the other one built.

Bad scans (unreadable, truncated, 2D, missing, constant, complex/RGB voxels...: every ``VolumeError`` of the
processor, which names the file and the reason) are dropped and listed in ``bad_scans.csv`` beside the cached
data and counted in the log; with ``fatal=True`` the first bad scan raises, naming the file. ``streaming=True``
writes nothing to disk but the report: it returns an ``IterableDataset`` that processes scans lazily as they are
read (bad scans are skipped and appended to ``<name>-<key>-streaming/bad_scans.csv`` as they are met), for corpora
larger than the disk.

Layout of a cache folder::

    <name>-<key>/dataset/      datasets.save_to_disk output (memory-mapped Arrow)
    <name>-<key>/bad_scans.csv image_path, subject_id, reason
    <name>-<key>/cache.json    key, processor settings, counts, SHA-256 of every dataset/ file
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from volume_medblip import VolumeError, dicom_files


logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: keys on every file read, checksums in cache.json
ERROR_COLUMN = "cache_error"
BAD_SCANS_FILE = "bad_scans.csv"
META_FILE = "cache.json"


class BadScanError(ValueError):
    """A scan failed preprocessing with ``fatal=True``; the message names the file and the reason."""


# ---------------------------------------------------------------------------- keys


# Keys that saving and reloading adds to `to_dict()` without changing what the processor computes.
_LOADER_KEYS = ("auto_map", "processor_class", "_processor_class")


def processor_settings(image_processor: Any) -> dict:
    """JSON form of the processor's settings (``to_dict()`` less loader bookkeeping), used in the cache key."""
    settings = {key: value for key, value in image_processor.to_dict().items() if key not in _LOADER_KEYS}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _file_stamp(path: str) -> list | None:
    """Size, mtime and ctime of every file read for `path`: the file, or each file of a DICOM folder (by name)."""
    location = Path(path)
    try:
        if location.is_dir():
            return [[file.name, *_stat(file)] for file in dicom_files(location)]
        return _stat(location)
    except OSError:
        return None


def cache_key(dataset: Any, image_processor: Any, image_column: str = "image_path") -> str:
    """SHA-256 (hex, 16 chars) of the format version, processor settings, rows, and the stats of every file read."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT_VERSION, processor_settings(image_processor)]).encode())
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(json.dumps(_file_stamp(str(row[image_column]))).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- per-scan processing


def _patch_shape(image_processor: Any) -> tuple[int, int] | None:
    """(N, P) from the processor's ``volume_size``/``patch_size``/``num_channels``, when it has them."""
    try:
        volume, patch = np.asarray(image_processor.volume_size), np.asarray(image_processor.patch_size)
        channels = int(getattr(image_processor, "num_channels", 1))
        return int(np.prod(volume // patch)), int(channels * np.prod(patch))
    except (AttributeError, TypeError, ValueError):
        return None


def _bad_scan_types() -> tuple[type[BaseException], ...]:
    """Errors that mark a scan as bad: the processor's VolumeError (a ValueError), I/O and decoding errors."""
    import gzip
    import zlib

    return (ValueError, OSError, EOFError, gzip.BadGzipFile, zlib.error)


class _ScanProcessor:
    """Picklable ``datasets.map`` function: one example in, its patches (or the error) out."""

    def __init__(self, image_processor: Any, image_column: str, fatal: bool, shape: tuple[int, int] | None,
                 report_path: Path | None = None) -> None:
        self.image_processor = image_processor
        self.image_column = image_column
        self.fatal = fatal
        self.shape = shape
        self.report_path = report_path
        self.parent_pid = os.getpid()

    def __call__(self, example: dict) -> dict:
        if os.getpid() != self.parent_pid and torch.get_num_threads() > 1:
            # a forked worker inherits the parent's OpenMP pool in a broken state: a parallel op would hang
            torch.set_num_threads(1)
        path = str(example[self.image_column])
        try:
            out = self.image_processor(images=[path], return_tensors="np")
            pixels = np.asarray(out["pixel_values"][0], dtype=np.float16)
            if not np.isfinite(pixels).all():
                raise VolumeError(f"{path}: non-finite values after preprocessing (beyond float16 range?)")
            return {"pixel_values": pixels, "patch_grid": np.asarray(out["patch_grid"][0], dtype=np.int64),
                    ERROR_COLUMN: None}
        except _bad_scan_types() as err:
            reason = f"{type(err).__name__}: {err}"
            if self.fatal:
                raise BadScanError(f"{path}: bad scan ({reason})") from err
            if self.report_path is not None:  # streaming: report as met
                _append_bad_scans(self.report_path, [(path, example.get("subject_id"), reason)])
            logger.debug("bad scan %s: %s", path, reason)
            placeholder = np.zeros(self.shape if self.shape else (1, 1), dtype=np.float16)
            return {"pixel_values": placeholder, "patch_grid": np.zeros(3, dtype=np.int64), ERROR_COLUMN: reason}


def _append_bad_scans(path: Path, rows: list[tuple[str, Any, str]]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["image_path", "subject_id", "reason"])
        writer.writerows(rows)


def _features(dataset: Any, shape: tuple[int, int] | None) -> Any:
    import datasets

    features = dataset.features.copy()
    features["pixel_values"] = (datasets.Array2D(shape=shape, dtype="float16") if shape
                                else datasets.List(datasets.List(datasets.Value("float16"))))
    features["patch_grid"] = datasets.List(datasets.Value("int64"), length=3)
    features[ERROR_COLUMN] = datasets.Value("string")
    return features


# ---------------------------------------------------------------------------- build


def build_cache(dataset: Any, image_processor: Any, cache_dir: str | Path, num_proc: int = 1, fatal: bool = False,
                streaming: bool = False, image_column: str = "image_path", name: str = "medblip",
                verify: bool = True) -> Any:
    """Preprocess every scan once and cache the patches; see the module docstring for the layout and guarantees.

    Args:
        dataset: ``datasets.Dataset`` (or ``DatasetDict``: each split is cached on its own) with ``image_column``.
        image_processor: callable as ``image_processor(images=[path], return_tensors="np")`` returning
            ``pixel_values`` ``(1, N, P)`` and ``patch_grid`` ``(1, 3)``, with ``to_dict()`` (its settings).
        cache_dir: parent folder of the cache folders.
        num_proc: processes for ``datasets.map``.
        fatal: raise ``BadScanError`` on the first bad scan instead of skipping it.
        streaming: return a lazily processed ``IterableDataset`` (nothing cached on disk but the bad-scan report).
        image_column: the column holding image paths.
        name: prefix of the cache folder.
        verify: check the SHA-256 of the cached files when reusing a cache (reads it once; a broken cache is
            rebuilt). ``False`` trusts the disk, for caches too large to read at every start.

    Returns:
        The cached ``Dataset`` (memory-mapped, bad scans removed) with ``pixel_values`` and ``patch_grid``;
        a ``DatasetDict`` for a ``DatasetDict``; an ``IterableDataset`` when ``streaming``.
        ``.cache_files`` of the result point into the cache folder; the report is ``<folder>/bad_scans.csv``.

    Raises:
        BadScanError: with ``fatal=True``, naming the first bad file and the reason.
        KeyError: ``image_column`` is not a column of the dataset.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({split: build_cache(ds, image_processor, cache_dir, num_proc, fatal, streaming,
                                                        image_column, f"{name}-{split}", verify)
                                     for split, ds in dataset.items()})
    if image_column not in dataset.column_names:
        raise KeyError(f"dataset has no column {image_column!r}; columns: {dataset.column_names}")
    key = cache_key(dataset, image_processor, image_column)
    folder = Path(cache_dir) / f"{name}-{key}"
    if streaming:
        return _streaming(dataset, image_processor, folder.with_name(f"{folder.name}-streaming"), fatal, image_column)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is building %s: waiting for it", folder)
        lock.acquire()
    try:
        cached = _open_cache(folder, key, verify)
        if cached is None:
            cached = _build(dataset, image_processor, folder, key, num_proc, fatal, image_column)
        return cached
    finally:
        lock.release()


def _open_cache(folder: Path, key: str, verify: bool) -> Any | None:
    """The cached dataset in `folder` when it is complete and intact; None (with a warning) when it must be built."""
    import datasets

    if not folder.exists():
        return None
    problem, meta = _cache_problem(folder, key, verify)
    if problem is None:
        try:
            cached = datasets.load_from_disk(str(folder / "dataset"))
        except Exception as err:  # a damaged state.json / dataset_info.json that the checksums did not cover
            problem = f"dataset/ does not load ({type(err).__name__}: {err})"
    if problem is not None:
        logger.warning("preprocessing cache %s is broken (%s): rebuilding it", folder, problem)
        return None
    logger.info("reusing preprocessing cache %s (%d scans, %d bad)", folder, meta["cached"], meta["bad"])
    return cached


def _cache_problem(folder: Path, key: str, verify: bool) -> tuple[str | None, dict]:
    """What is wrong with a cache folder (None when nothing is), and its cache.json."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"{META_FILE} missing or unreadable ({type(err).__name__}: {err})", {}
    fields = ("key", "cached", "bad", "checksums")
    if not isinstance(meta, dict) or not all(field in meta for field in fields) or meta["key"] != key:
        return f"{META_FILE} lacks {list(fields)} or is for another key", {}
    if not (folder / "dataset").is_dir():
        return "its dataset/ folder is missing", meta
    for relative, digest in dict(meta["checksums"]).items():
        path = folder / "dataset" / relative
        if not path.is_file():
            return f"dataset/{relative} is missing", meta
        if verify and _sha256(path) != digest:
            return f"dataset/{relative} does not match its SHA-256 in {META_FILE}", meta
    return None, meta


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _build(dataset: Any, image_processor: Any, folder: Path, key: str, num_proc: int, fatal: bool,
           image_column: str) -> Any:
    """Build into a unique hidden folder, then rename it to `folder` (the caller holds the lock)."""
    import datasets

    for stale in folder.parent.glob(f".{folder.name}.*"):  # left by killed builds: only the lock holder builds
        shutil.rmtree(stale, ignore_errors=True)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        meta = _write_cache(dataset, image_processor, staging, key, num_proc, fatal, image_column)
        if folder.exists():  # broken (checked under the lock): moved aside first, so `folder` is never half-deleted
            broken = folder.with_name(f".{folder.name}.broken-{uuid.uuid4().hex[:8]}")
            folder.rename(broken)
            shutil.rmtree(broken, ignore_errors=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("preprocessing cache %s: %d scans cached, %d bad scans skipped (listed in %s)",
                folder, meta["cached"], meta["bad"], folder / BAD_SCANS_FILE)
    return datasets.load_from_disk(str(folder / "dataset"))


def _write_cache(dataset: Any, image_processor: Any, folder: Path, key: str, num_proc: int, fatal: bool,
                 image_column: str) -> dict:
    """Process every scan and write dataset/, bad_scans.csv and cache.json (with checksums) into `folder`."""
    import datasets

    shape = _patch_shape(image_processor)
    features = _features(dataset, shape)
    if len(dataset) == 0:  # map adds no columns to an empty dataset
        mapped = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    else:
        mapped = dataset.map(_ScanProcessor(image_processor, image_column, fatal, shape), features=features,
                             num_proc=min(num_proc, len(dataset)) if num_proc > 1 else None,
                             desc="preprocessing scans", load_from_cache_file=False)
    errors = mapped[ERROR_COLUMN]
    bad = [(p, s, e) for p, s, e in zip(mapped[image_column], _column(mapped, "subject_id"), errors) if e]
    _write_bad_scans(folder / BAD_SCANS_FILE, bad)
    good = mapped.filter(lambda e: e is None, input_columns=ERROR_COLUMN).remove_columns(ERROR_COLUMN)
    good.save_to_disk(str(folder / "dataset"), num_shards=1 if len(good) == 0 else None)  # 0 shards won't load
    checksums = {path.relative_to(folder / "dataset").as_posix(): _sha256(path)
                 for path in sorted((folder / "dataset").rglob("*")) if path.is_file()}
    meta = {"key": key, "format_version": CACHE_FORMAT_VERSION, "processor": processor_settings(image_processor),
            "rows": len(dataset), "cached": len(good), "bad": len(bad), "pixel_dtype": "float16",
            "checksums": checksums}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    for path, _, reason in bad[:5]:
        logger.warning("bad scan %s: %s", path, reason)
    return meta


def _column(dataset: Any, name: str) -> list:
    return dataset[name] if name in dataset.column_names else [None] * len(dataset)


def _write_bad_scans(path: Path, rows: list[tuple[str, Any, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "subject_id", "reason"])
        writer.writerows(rows)


def _streaming(dataset: Any, image_processor: Any, folder: Path, fatal: bool, image_column: str) -> Any:
    """Lazy pipeline: IterableDataset -> map (process on read) -> filter out bad scans."""
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / BAD_SCANS_FILE
    if report.exists():
        report.unlink()
    shape = _patch_shape(image_processor)
    if len(dataset) == 0:  # to_iterable_dataset refuses an empty dataset
        import datasets

        features = _features(dataset, shape)
        del features[ERROR_COLUMN]
        return datasets.IterableDataset.from_generator(_nothing, features=features)
    iterable = dataset.to_iterable_dataset()
    mapped = iterable.map(_ScanProcessor(image_processor, image_column, fatal, shape, report),
                          features=_features(dataset, shape))
    logger.info("streaming preprocessing of %d scans; bad scans are appended to %s", len(dataset), report)
    return mapped.filter(lambda e: e is None, input_columns=ERROR_COLUMN).remove_columns(ERROR_COLUMN)


def _nothing() -> Any:
    yield from ()


def read_bad_scans(cache_folder: str | Path) -> list[dict[str, str]]:
    """Rows of a cache folder's ``bad_scans.csv`` (empty list when there is none)."""
    path = Path(cache_folder) / BAD_SCANS_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def cache_folder_of(cached: Any) -> Path:
    """The cache folder of a dataset returned by ``build_cache`` (from its Arrow files)."""
    return Path(cached.cache_files[0]["filename"]).parent.parent
