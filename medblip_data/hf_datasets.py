"""Hugging Face ``datasets`` sources: ``save_to_disk`` folders, Parquet, ``niftifolder`` folders, Hub ids, objects.

Each source is opened with the ``datasets`` loader a user would call (``load_from_disk``,
``load_dataset("parquet" | "niftifolder" | hub_id)``), so what MedBLIP reads is what ``datasets`` gives; an
already loaded ``Dataset``/``DatasetDict`` goes straight in. Every split is read (``split=`` picks one); the
split sizes are in the report, and ``load_corpus`` re-splits by subject (predefined splits are not kept).

Image column: ``image_column=``, else the first ``datasets.Nifti()`` column, else the first column named in
``COLUMN_ALIASES["image_path"]`` (string paths, ``{"bytes", "path"}`` structs, or raw bytes). A value with a local
file path is used in place (relative paths are taken from the source folder). A value with bytes (Parquet with
embedded files, Hub datasets) is *materialised*: written unchanged to a content-addressed cache,
``<materialize_dir>/<sha256[:2]>/<sha256>.nii.gz`` (``.nii`` when the bytes are not gzip-compressed), once; a
later read finds the same file with the same size and mtime, so the preprocessing cache (keyed by path, size and
mtime) is reused, and the voxels are those of the original file, bit for bit. The default ``materialize_dir`` is
``$MEDBLIP_NIFTI_CACHE``, else ``~/.cache/medblip/nifti``. Rows without a usable image are listed in
``report.missing_images`` (or raise with ``missing_images="error"``).

Pushable form: ``export_parquet(manifest, out_dir)`` writes ``out_dir/data/train-00000-of-00001.parquet`` (the
Hub's layout) with the images embedded as bytes in a ``datasets.Nifti()`` column named ``image``, so the files
stand alone; ``load_dataset("parquet", data_dir=out_dir)`` reads it back. To publish (not testable offline):
``huggingface_hub.HfApi().upload_folder(folder_path=out_dir, repo_id=..., repo_type="dataset")``, or
``load_dataset("parquet", data_dir=out_dir)["train"].push_to_hub(repo_id)``; use subject-disjoint splits
(``load_corpus``) and one ``export_parquet(..., split=name)`` per split.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from labels_medblip import is_missing

from .manifest import ManifestError, read_manifest
from .records import RawRow, SourceReport, match_columns


logger = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
BATCH_SIZE = 32  # images per batch when reading an image column (bounds memory for embedded bytes)


def default_materialize_dir() -> Path:
    return Path(os.environ.get("MEDBLIP_NIFTI_CACHE") or Path.home() / ".cache" / "medblip" / "nifti")


def materialise(data: bytes, folder: str | Path) -> str:
    """Write NIfTI ``data`` once to ``folder/<sha256[:2]>/<sha256>.nii[.gz]``; returns the path.

    An existing file of the same size is reused untouched (same mtime); a new one is written to a temporary
    name and renamed, so concurrent readers never see a partial file.
    """
    digest = hashlib.sha256(data).hexdigest()
    target = Path(folder) / digest[:2] / f"{digest}{'.nii.gz' if data[:2] == GZIP_MAGIC else '.nii'}"
    if target.is_file() and target.stat().st_size == len(data):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)
    return str(target)


# ---------------------------------------------------------------------------- opening


def open_source(source: Any, fmt: str, split: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Split name -> ``datasets.Dataset`` for a ``datasets`` source of format ``fmt`` (see ``formats``)."""
    import datasets

    if fmt == "datasets":
        loaded = source
    elif fmt == "datasets-disk":
        loaded = datasets.load_from_disk(str(source))
    elif fmt == "parquet":
        path = Path(source)
        loaded = (datasets.load_dataset("parquet", data_files=str(path), cache_dir=cache_dir) if path.is_file()
                  else datasets.load_dataset("parquet", data_dir=str(path), cache_dir=cache_dir))
    elif fmt == "niftifolder":
        loaded = datasets.load_dataset("niftifolder", data_dir=str(source), cache_dir=cache_dir)
    elif fmt == "hub":
        try:  # only the wanted split is downloaded
            loaded = datasets.load_dataset(str(source), split=split, cache_dir=cache_dir)
        except Exception as err:  # offline, unknown id, no access: say what was tried
            raise ManifestError(f"{source}: not a local path, and loading it as a Hub dataset failed: "
                                f"{type(err).__name__}: {err}") from err
    else:
        raise ValueError(f"not a datasets format: {fmt!r}")
    splits = dict(loaded) if isinstance(loaded, Mapping) else {str(loaded.split or split or "data"): loaded}
    if split is not None:
        if split not in splits:
            raise ManifestError(f"{source}: no split {split!r}; splits: {sorted(splits)}")
        splits = {split: splits[split]}
    return splits


def _image_column(ds: Any, aliases: Sequence[str], forced: bool, where: str) -> str:
    import datasets

    columns = list(ds.features)
    if forced:
        if aliases[0] not in columns:
            raise ManifestError(f"{where}: image column {aliases[0]!r} not found; columns: {columns}")
        return aliases[0]
    nifti = [c for c, f in ds.features.items() if isinstance(f, datasets.Nifti)]
    if nifti:
        return nifti[0]
    named = match_columns(columns, {"image_path": aliases}).get("image_path")
    if not named:
        raise ManifestError(f"{where}: no image column: no datasets.Nifti() column and none of {list(aliases)}; "
                            f"columns: {columns} (pass image_column=)")
    return named[0]


def _image_path(value: Any, base: Path | None, folder: Path, report: SourceReport) -> tuple[str | None, str]:
    """(local image path or None, reason when None) of one image cell."""
    if isinstance(value, (bytes, bytearray)):
        report.materialised += 1
        return materialise(bytes(value), folder), ""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            report.materialised += 1
            return materialise(value["bytes"], folder), ""
        value = value.get("path")
    if is_missing(value):
        return None, "no image (empty cell)"
    path = Path(str(value))
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        return None, f"image file not found: {value}"
    return str(path.resolve()), ""


def _scalar_table(ds: Any, image: str, report: SourceReport) -> list[dict]:
    """The non-image columns as Python values; ClassLabel ints become names, non-scalar features are skipped."""
    import datasets

    keep, labels = [], {}
    for column, feature in ds.features.items():
        if column == image:
            continue
        if isinstance(feature, datasets.ClassLabel):
            labels[column] = feature
        elif not isinstance(feature, datasets.Value):
            if column not in report.skipped_columns:
                report.skipped_columns.append(column)
            continue
        keep.append(column)
    records = ds.select_columns(keep).to_list() if keep else [{} for _ in range(len(ds))]
    for record in records:
        for column, feature in labels.items():
            if record[column] is not None and record[column] >= 0:
                record[column] = feature.int2str(record[column])
    return records


def read_datasets(splits: Mapping[str, Any], where: str, aliases: Mapping[str, Sequence[str]], forced_image: bool,
                  report: SourceReport, base: Path | None = None, materialize_dir: str | Path | None = None,
                  missing_images: str = "skip") -> list[RawRow]:
    """One raw row per example of every split, with its image as a local file."""
    import datasets

    folder = Path(materialize_dir) if materialize_dir else default_materialize_dir()
    rows: list[RawRow] = []
    for name, ds in splits.items():
        ds = ds.with_format(None)  # plain Python values, whatever format the caller set
        report.splits[name] = len(ds)
        image = _image_column(ds, aliases["image_path"], forced_image, where)
        report.columns["image_path"] = [image]
        records = _scalar_table(ds, image, report)
        images = ds.select_columns([image])
        if isinstance(ds.features[image], datasets.Nifti):
            images = images.cast_column(image, datasets.Nifti(decode=False))
        index = 0
        for batch in images.iter(batch_size=BATCH_SIZE):
            for value in batch[image]:
                origin = f"{where} [{name}] row {index}"
                path, reason = _image_path(value, base, folder, report)
                if path is None:
                    if missing_images == "error":
                        raise ManifestError(f"{origin}: column {image!r}: {reason}")
                    report.add("missing_images", origin, reason)
                else:
                    rows.append(RawRow(records[index], path, origin))
                index += 1
    if report.materialised:
        report.notes.append(f"{report.materialised} image(s) from bytes, materialised under {folder}")
    return rows


# ---------------------------------------------------------------------------- export


def export_parquet(manifest: str | Path | pd.DataFrame, out_dir: str | Path, split: str = "train",
                   num_shards: int = 1) -> list[Path]:
    """Write a manifest as a pushable Parquet dataset with the NIfTI files embedded; returns the files written.

    The table has an ``image`` column (``datasets.Nifti()``, bytes embedded, ``path`` = the file's base name)
    and every manifest column except ``image_path`` (numbers as float64, text as strings), in
    ``out_dir/data/<split>-0000i-of-0000n.parquet`` (the Hub's layout). One shard's images are held in memory
    while it is written: raise ``num_shards`` for a large cohort (the Hub suggests shards of about 500 MB).
    """
    import datasets
    from datasets.table import embed_table_storage

    frame = read_manifest(manifest) if isinstance(manifest, (str, Path)) else manifest.copy()
    table = frame.drop(columns=["image_path"]).astype(object)
    records = {"image": [str(Path(p).resolve()) for p in frame["image_path"]],
               **table.where(table.notna(), None).to_dict(orient="list")}
    ds = datasets.Dataset.from_dict(records).cast_column("image", datasets.Nifti())
    folder = Path(out_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(num_shards):
        shard = ds.shard(num_shards, index, contiguous=True).with_format("arrow")
        shard = shard.map(embed_table_storage, batched=True, keep_in_memory=True).with_format(None)
        written.append(folder / f"{split}-{index:05d}-of-{num_shards:05d}.parquet")
        shard.to_parquet(str(written[-1]))
    logger.info("wrote %d scans with embedded images to %s (%d shard(s))", len(frame), folder, num_shards)
    return written
