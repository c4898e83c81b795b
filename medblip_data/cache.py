"""Preprocessing cache: the image processor applied once per scan, patches stored as float16 in Arrow.

``build_cache(dataset, image_processor, cache_dir)`` maps ``image_processor(images=[path], return_tensors="np")``
over the ``image_path`` column with ``datasets.map`` (``num_proc`` processes, a progress bar) and adds:

- ``pixel_values``: ``(N, P)`` float16 patches (``N`` patches of ``P = C * pd * ph * pw`` values);
- ``patch_grid``: ``(3,)`` int64 patch grid.

The cache lives in ``cache_dir/<name>-<key>`` where ``key`` hashes the processor settings
(``image_processor.to_dict()``), the dataset rows and the size/mtime of every image file; it is reused when the
key matches and rebuilt otherwise. Bad scans (unreadable, truncated, 2D, missing, constant...) are dropped and
listed with the reason in ``bad_scans.csv`` beside the cached data and counted in the log; with ``fatal=True``
the first bad scan raises, naming the file. ``streaming=True`` writes nothing to disk: it returns an
``IterableDataset`` that processes scans lazily as they are read (bad scans are skipped and appended to the
report as they are met), for corpora larger than the disk.

Layout of a cache folder::

    <name>-<key>/dataset/      datasets.save_to_disk output (memory-mapped Arrow)
    <name>-<key>/bad_scans.csv image_path, subject_id, reason
    <name>-<key>/cache.json    key, processor settings, counts (written last: marks a complete cache)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
ERROR_COLUMN = "cache_error"
BAD_SCANS_FILE = "bad_scans.csv"
META_FILE = "cache.json"


class BadScanError(ValueError):
    """A scan failed preprocessing with ``fatal=True``; the message names the file and the reason."""


# ---------------------------------------------------------------------------- keys


def processor_settings(image_processor: Any) -> dict:
    """JSON form of the processor's settings (``to_dict()``), used in the cache key."""
    return json.loads(json.dumps(image_processor.to_dict(), sort_keys=True, default=str))


def _file_stamp(path: str) -> list:
    try:
        stat = os.stat(path)
    except OSError:
        return [None, None]
    return [stat.st_size, stat.st_mtime_ns]


def cache_key(dataset: Any, image_processor: Any, image_column: str = "image_path") -> str:
    """SHA-256 (hex, 16 chars) of the format version, processor settings, rows, and image sizes/mtimes."""
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
                raise ValueError("non-finite values after preprocessing (beyond float16 range?)")
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
                streaming: bool = False, image_column: str = "image_path", name: str = "medblip") -> Any:
    """Preprocess every scan once and cache the patches; see the module docstring for the layout.

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
                                                        image_column, f"{name}-{split}")
                                     for split, ds in dataset.items()})
    if image_column not in dataset.column_names:
        raise KeyError(f"dataset has no column {image_column!r}; columns: {dataset.column_names}")
    key = cache_key(dataset, image_processor, image_column)
    folder = Path(cache_dir) / f"{name}-{key}"
    if streaming:
        return _streaming(dataset, image_processor, folder, fatal, image_column)
    if (folder / META_FILE).is_file():
        meta = json.loads((folder / META_FILE).read_text())
        logger.info("reusing preprocessing cache %s (%d scans, %d bad)", folder, meta["cached"], meta["bad"])
        return datasets.load_from_disk(str(folder / "dataset"))
    return _build(dataset, image_processor, folder, key, num_proc, fatal, image_column)


def _build(dataset: Any, image_processor: Any, folder: Path, key: str, num_proc: int, fatal: bool,
           image_column: str) -> Any:
    import datasets

    if folder.exists():
        shutil.rmtree(folder)  # an incomplete earlier attempt (no cache.json)
    folder.mkdir(parents=True)
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
    meta = {"key": key, "format_version": CACHE_FORMAT_VERSION, "processor": processor_settings(image_processor),
            "rows": len(dataset), "cached": len(good), "bad": len(bad), "pixel_dtype": "float16"}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    logger.info("preprocessing cache %s: %d scans cached, %d bad scans skipped (listed in %s)",
                folder, len(good), len(bad), folder / BAD_SCANS_FILE)
    for path, _, reason in bad[:5]:
        logger.warning("bad scan %s: %s", path, reason)
    return datasets.load_from_disk(str(folder / "dataset"))


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
