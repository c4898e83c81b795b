"""Preprocessing cache with the real MedBlipImageProcessor: float16 patches, keys, bad-scan reports."""

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import datasets
import nibabel as nib
import numpy as np
import pytest
from conftest import REPO_ROOT

from image_processing_medblip import MedBlipImageProcessor
from medblip_data.cache import BadScanError, build_cache, cache_folder_of, cache_key, read_bad_scans


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


def test_cache_reused_by_a_processor_reloaded_from_a_saved_model(good_dataset, processor, tmp_path):
    # Saving adds `auto_map` to `to_dict()`; evaluating a saved model must reuse the training run's caches.
    key_at_training = cache_key(good_dataset, processor)
    assert "auto_map" not in processor.to_dict()
    processor.save_pretrained(str(tmp_path / "model"))
    reloaded = MedBlipImageProcessor.from_pretrained(str(tmp_path / "model"))
    assert "auto_map" in reloaded.to_dict()
    assert cache_key(good_dataset, reloaded) == key_at_training


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


# ---------------------------------------------------------------------------------------------------------------
# issue 12: stale data (case 5), integrity and concurrency (case 6), exotic dtypes (case 7)


def _pixels(cached):
    return np.asarray(cached.with_format("numpy")["pixel_values"], dtype=np.float32)


def _dicom_series(folder):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    folder.mkdir()
    for index in range(4):
        ds = template.copy()
        ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 0.8 * index]
        ds.SOPInstanceUID = f"{template.SOPInstanceUID}.{index}"
        ds.save_as(str(folder / f"slice{index}.dcm"))
    return pydicom


def test_stale_data_rewritten_dicom_slice_invalidates_the_cache(tmp_path):
    series = tmp_path / "series"
    pydicom = _dicom_series(series)
    dataset = datasets.Dataset.from_dict({"subject_id": ["d"], "image_path": [str(series)]})
    processor = MedBlipImageProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8), target_spacing=None)
    first = build_cache(dataset, processor, tmp_path / "cache")
    before = _pixels(first)
    folder_stat, slice_stat = series.stat(), (series / "slice2.dcm").stat()
    ds = pydicom.dcmread(str(series / "slice2.dcm"))  # rewrite one slice in place: same size, new pixels
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
    ds.save_as(str(series / "slice2.dcm"))
    os.utime(series / "slice2.dcm", ns=(slice_stat.st_atime_ns, slice_stat.st_mtime_ns))  # even the old mtime
    os.utime(series, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    assert (series.stat().st_size, series.stat().st_mtime_ns) == (folder_stat.st_size, folder_stat.st_mtime_ns)
    assert (series / "slice2.dcm").stat().st_size == slice_stat.st_size
    second = build_cache(dataset, processor, tmp_path / "cache")
    assert cache_folder_of(second) != cache_folder_of(first)
    after = _pixels(second)
    assert not np.allclose(after, before, atol=1e-2)
    direct = processor(images=[str(series)], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(after, direct, atol=2e-3)


def test_integrity_random_bytes_in_the_arrow_file_are_detected_and_rebuilt(good_dataset, processor, tmp_path, caplog):
    cached = build_cache(good_dataset, processor, tmp_path / "cache")
    folder, reference = cache_folder_of(cached), _pixels(cached)
    del cached
    arrow = next((folder / "dataset").glob("*.arrow"))
    with arrow.open("r+b") as handle:  # in place, size unchanged, as a disk or a stray writer would
        handle.seek(arrow.stat().st_size // 2)
        handle.write(np.random.default_rng(0).bytes(4096))
    corrupt = shutil.copytree(folder / "dataset", tmp_path / "corrupt")
    unchecked = _pixels(datasets.load_from_disk(str(corrupt)))  # what loading without a check gives
    assert not np.isfinite(unchecked).all() and not np.array_equal(unchecked, reference)
    with caplog.at_level(logging.WARNING, logger="medblip_data.cache"):
        rebuilt = build_cache(good_dataset, processor, tmp_path / "cache")
    assert f"preprocessing cache {folder} is broken (dataset/{arrow.name} does not match its SHA-256" in caplog.text
    assert cache_folder_of(rebuilt) == folder
    np.testing.assert_array_equal(_pixels(rebuilt), reference)


@pytest.mark.parametrize("damage, problem", [
    ("corrupt cache.json", "cache.json missing or unreadable (JSONDecodeError"),
    ("cache.json of another key", "cache.json lacks ['key', 'cached', 'bad', 'checksums'] or is for another key"),
    ("missing dataset/", "its dataset/ folder is missing"),
])
def test_integrity_broken_cache_rebuilds_with_a_warning(good_dataset, processor, tmp_path, caplog, damage, problem):
    cached = build_cache(good_dataset, processor, tmp_path / "cache")
    folder, reference = cache_folder_of(cached), _pixels(cached)
    del cached
    if damage == "corrupt cache.json":
        (folder / "cache.json").write_text('{"key": "trunc')
    elif damage == "cache.json of another key":
        meta = json.loads((folder / "cache.json").read_text())
        (folder / "cache.json").write_text(json.dumps({**meta, "key": "0" * 16}))
    else:
        shutil.rmtree(folder / "dataset")
    killed = tmp_path / "cache" / f".{folder.name}.tmp-999-deadbeef"  # the staging folder of a killed build
    killed.mkdir()
    with caplog.at_level(logging.WARNING, logger="medblip_data.cache"):
        rebuilt = build_cache(good_dataset, processor, tmp_path / "cache")
    assert f"preprocessing cache {folder} is broken ({problem}" in caplog.text and "rebuilding it" in caplog.text
    np.testing.assert_array_equal(_pixels(rebuilt), reference)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name, f"{folder.name}.lock"]


CONCURRENT_BUILD = textwrap.dedent("""
    import json, logging, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    import datasets
    import numpy as np
    from image_processing_medblip import MedBlipImageProcessor
    from medblip_data.cache import build_cache, cache_folder_of

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    cache_dir, rows, flags = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    calls = []

    class GatedProcessor(MedBlipImageProcessor):
        # holds the build, and so its lock, open until the test lets it go
        def __call__(self, images, **kwargs):
            calls.append(images)
            (flags / "building").touch()
            deadline = time.monotonic() + 120
            while not (flags / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return super().__call__(images, **kwargs)

    processor = GatedProcessor(volume_size=(16, 16, 16), patch_size=(8, 8, 8), target_spacing=(4.0, 4.0, 4.0))
    cached = build_cache(datasets.Dataset.from_dict(rows), processor, cache_dir)
    pixels = np.asarray(cached.with_format("numpy")["pixel_values"], dtype=np.float64)
    print(json.dumps({"folder": str(cache_folder_of(cached)), "calls": len(calls), "pixels": pixels.tolist()}))
""")


def _wait_for(path, process, seconds=240):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_concurrency_two_processes_build_the_cache_once(good_dataset, tmp_path):
    script, flags = tmp_path / "build.py", tmp_path / "flags"
    script.write_text(CONCURRENT_BUILD)
    flags.mkdir()
    command = [sys.executable, str(script), str(tmp_path / "cache"), json.dumps(good_dataset.to_dict()), str(flags),
               str(REPO_ROOT)]
    options = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    first = subprocess.Popen(command, **options)
    _wait_for(flags / "building", first)  # the first process is building and holds the lock
    second = subprocess.Popen(command, **options)
    waited = next((line for line in second.stderr if "another process is building" in line), None)
    (flags / "release").touch()  # reached only once the second process waits for the lock (or has exited)
    out_first, err_first = first.communicate(timeout=240)
    out_second, err_second = second.communicate(timeout=240)
    assert first.returncode == 0 and second.returncode == 0, (err_first[-3000:], err_second[-3000:])
    assert waited, err_second[-3000:]
    built, reused = json.loads(out_first.splitlines()[-1]), json.loads(out_second.splitlines()[-1])
    assert built["calls"] == 3 and reused["calls"] == 0  # the second process processed nothing
    assert reused["folder"] == built["folder"] and reused["pixels"] == built["pixels"]
    assert np.isfinite(built["pixels"]).all() and np.asarray(built["pixels"]).shape == (3, 8, 512)
    assert "reusing preprocessing cache" in err_second
    folder = os.path.basename(built["folder"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder, f"{folder}.lock"]  # nothing staged


def test_exotic_dtypes_land_in_bad_scans_and_never_abort_the_build(tmp_path, processor):
    good = write_scan(tmp_path / "good.nii.gz")
    rgb = np.zeros((20, 24, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.random.default_rng(0).integers(0, 255, rgb.shape)
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb24.nii.gz")
    spectrum = (np.random.default_rng(1).random((20, 24, 20)) * (1 + 1j)).astype(np.complex64)
    nib.save(nib.Nifti1Image(spectrum, np.eye(4)), tmp_path / "complex64.nii.gz")
    paths = [good, str(tmp_path / "rgb24.nii.gz"), str(tmp_path / "complex64.nii.gz")]
    dataset = datasets.Dataset.from_dict({"subject_id": ["g", "r", "c"], "image_path": paths})
    cached = build_cache(dataset, processor, tmp_path / "cache")
    assert cached["subject_id"] == ["g"]
    report = {row["subject_id"]: row["reason"] for row in read_bad_scans(cache_folder_of(cached))}
    assert report["r"].startswith(f"VolumeError: item 0 of the batch ('{paths[1]}'): unsupported dtype "
                                  "[('R', 'u1'), ('G', 'u1'), ('B', 'u1')] (RGB or structured voxels)")
    assert report["c"] == f"VolumeError: item 0 of the batch ('{paths[2]}'): unsupported dtype complex64 " \
                          "(complex values); expected real-valued intensities"
    with pytest.raises(BadScanError, match=r"rgb24\.nii\.gz: bad scan \(VolumeError: .*unsupported dtype"):
        build_cache(dataset, processor, tmp_path / "fatal", fatal=True)
