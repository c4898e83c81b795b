"""Preprocessing cache with the real MedBlipImageProcessor: float16 patches, keys, bad-scan reports."""

import gzip
import logging

import datasets
import nibabel as nib
import numpy as np
import pytest

from image_processing_medblip import MedBlipImageProcessor
from medblip_data.cache import BadScanError, build_cache, cache_folder_of, read_bad_scans


def write_scan(path, shape=(20, 24, 20), seed=0, axcodes_flip=False):
    data = np.random.default_rng(seed).random(shape).astype(np.float32) * 100
    affine = np.diag([-2.0 if axcodes_flip else 2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


@pytest.fixture
def processor():
    return MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8), target_spacing=(4.0, 4.0, 4.0))


@pytest.fixture
def good_dataset(tmp_path):
    paths = [write_scan(tmp_path / f"s{i}.nii.gz", seed=i, axcodes_flip=i % 2 == 1) for i in range(3)]
    return datasets.Dataset.from_dict({"subject_id": ["a", "b", "c"], "image_path": paths,
                                       "diagnosis": ["CN", "MCI", "AD"]})


@pytest.fixture
def bad_dataset(tmp_path):
    good = write_scan(tmp_path / "good.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    raw = gzip.compress(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)).to_bytes())
    truncated.write_bytes(raw[: len(raw) // 2])
    flat = tmp_path / "flat2d.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20)).astype(np.float32), np.eye(4)), flat)
    paths = [good, str(truncated), str(flat), str(tmp_path / "missing.nii.gz")]
    return datasets.Dataset.from_dict({"subject_id": ["g", "t", "f", "m"], "image_path": paths})


def test_cache_stores_float16_patches(good_dataset, processor, tmp_path):
    cached = build_cache(good_dataset, processor, tmp_path / "cache")
    assert len(cached) == 3 and cached.features["pixel_values"].dtype == "float16"
    row = cached.with_format("numpy")[0]
    assert row["pixel_values"].shape == (8, 512)
    assert "halffloat" in str(cached.data.schema.field("pixel_values").type.storage_type)  # float16 in Arrow
    assert list(row["patch_grid"]) == [2, 2, 2] and row["diagnosis"] == "CN"
    direct = processor(images=[good_dataset[0]["image_path"]], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(row["pixel_values"].astype(np.float32), direct, atol=2e-3)
    assert cache_folder_of(cached).parent == tmp_path / "cache"


def test_cache_reused_and_rebuilt_on_settings_change(good_dataset, processor, tmp_path, caplog):
    first = cache_folder_of(build_cache(good_dataset, processor, tmp_path / "cache"))
    stamp = (first / "cache.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="medblip_data.cache"):
        again = cache_folder_of(build_cache(good_dataset, processor, tmp_path / "cache"))
    assert again == first and (first / "cache.json").stat().st_mtime_ns == stamp
    assert "reusing" in caplog.text
    changed = MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8), target_spacing=(3.0, 3.0, 3.0))
    other = cache_folder_of(build_cache(good_dataset, changed, tmp_path / "cache"))
    assert other != first
    rows = cache_folder_of(build_cache(good_dataset.select([0, 1]), processor, tmp_path / "cache"))
    assert rows not in (first, other)  # manifest content is part of the key


def test_bad_scans_skipped_and_reported(bad_dataset, processor, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="medblip_data.cache"):
        cached = build_cache(bad_dataset, processor, tmp_path / "cache")
    assert cached["subject_id"] == ["g"]
    report = {r["subject_id"]: r for r in read_bad_scans(cache_folder_of(cached))}
    assert set(report) == {"t", "f", "m"}
    assert "2D" in report["f"]["reason"] and "not found" in report["m"]["reason"]
    assert report["t"]["image_path"].endswith("truncated.nii.gz")
    assert "3 bad scans skipped" in caplog.text


@pytest.mark.parametrize("index, name", [(1, "truncated.nii.gz"), (2, "flat2d.nii.gz"), (3, "missing.nii.gz")])
def test_bad_scan_fatal_names_file(bad_dataset, processor, tmp_path, index, name):
    with pytest.raises(BadScanError, match=name):
        build_cache(bad_dataset.select([0, index]), processor, tmp_path / "cache", fatal=True)


def test_streaming_is_lazy_and_skips_bad(bad_dataset, processor, tmp_path):
    stream = build_cache(bad_dataset, processor, tmp_path / "cache", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    rows = list(stream)
    assert [r["subject_id"] for r in rows] == ["g"]
    assert np.asarray(rows[0]["pixel_values"]).shape == (8, 512)
    folders = list((tmp_path / "cache").iterdir())
    assert len(read_bad_scans(folders[0])) == 3 and not (folders[0] / "dataset").exists()


def test_dataset_dict_cached_per_split(good_dataset, processor, tmp_path):
    corpus = datasets.DatasetDict({"train": good_dataset.select([0, 1]), "test": good_dataset.select([2])})
    cached = build_cache(corpus, processor, tmp_path / "cache")
    assert {k: len(v) for k, v in cached.items()} == {"train": 2, "test": 1}


def test_empty_split_gives_empty_cache(processor, tmp_path):
    empty = datasets.Dataset.from_dict({"subject_id": [], "image_path": []},
                                       features=datasets.Features({"subject_id": datasets.Value("string"),
                                                                   "image_path": datasets.Value("string")}))
    cached = build_cache(empty, processor, tmp_path / "cache")
    assert len(cached) == 0 and "pixel_values" in cached.column_names
    assert list(build_cache(empty, processor, tmp_path / "cache", streaming=True)) == []


@pytest.mark.slow
def test_cache_with_two_processes(good_dataset, processor, tmp_path):
    cached = build_cache(good_dataset, processor, tmp_path / "cache", num_proc=2)
    assert len(cached) == 3
