"""The external Colin27 cohort: manifest, files, determinism, reuse, atrophy model, orientation, missing data."""

import csv
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from external import colin27_cohort as ec


N_PER_CLASS, SIZE, SEED = 2, 32, 5


def _rows(manifest):
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def _arrays(manifest):
    return {row["subject_id"]: np.asarray(nib.load(manifest.parent / row["image_path"]).dataobj)
            for row in _rows(manifest)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("external")
    return ec.generate_external_cohort(out, n_per_class=N_PER_CLASS, size=SIZE, seed=SEED, num_workers=1)


def test_manifest_columns_and_values(cohort):
    with cohort.open(newline="") as f:
        assert tuple(next(csv.reader(f))) == ec.MANIFEST_COLUMNS
    rows = _rows(cohort)
    assert len(rows) == 3 * N_PER_CLASS and len({r["subject_id"] for r in rows}) == len(rows)
    assert [r["diagnosis"] for r in rows] == [c for c in ec.CLASSES for _ in range(N_PER_CLASS)]
    cdr_allowed = {"CN": {0.0}, "MCI": {0.5}, "AD": {0.5, 1.0, 2.0}}
    for r in rows:
        assert r["dataset"] == ec.DATASET_NAME and r["visit"] == "bl" and r["sex"] in ("F", "M")
        assert 55.0 <= float(r["age"]) <= 95.0 and 4 <= int(r["education"]) <= 22
        assert 0 <= int(r["mmse"]) <= 30 and int(r["apoe4"]) in (0, 1, 2)
        assert float(r["cdr"]) in cdr_allowed[r["diagnosis"]]
        assert 5.0 < float(r["ventricles_ml"]) < 120.0 and 5.0 < float(r["hippocampi_ml"]) < 25.0
        assert r["image_path"] == f"images/{r['subject_id']}.nii.gz"


def test_images_load_with_valid_affines(cohort):
    for row in _rows(cohort):
        img = nib.load(cohort.parent / row["image_path"])
        header = img.header
        assert img.ndim == 3 and max(img.shape) == SIZE and img.get_data_dtype() == np.int16
        assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
        np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-4)
        assert np.isfinite(img.affine).all() and abs(np.linalg.det(img.affine[:3, :3])) > 1.0
        assert header.get_xyzt_units()[0] == "mm"
        assert np.isfinite(img.dataobj.slope) and img.dataobj.slope > 0  # nibabel moves scl_slope to the proxy
        assert row["notes"].endswith("stored " + "".join(nib.aff2axcodes(img.affine)))
        data = img.get_fdata(dtype=np.float32)
        low, high = np.percentile(data, [1, 99])
        assert np.isfinite(data).all() and high > low
        assert 0.05 < np.mean(data > (low + high) / 2) < 0.8  # a head in a field of view with air around it
        zooms = np.array(header.get_zooms())
        protocol = ec.PROTOCOLS_BY_NAME[row["notes"].split("protocol ")[1].split(";")[0]]
        assert 4.0 < zooms.min() < 10.0
        if protocol.slice_axis is not None:
            assert zooms.max() > 1.3 * zooms.min()  # thick slices


def test_volumes_are_those_of_the_subject_model(cohort):
    subjects = ec.draw_subjects(N_PER_CLASS, SEED)
    for row, subject in zip(_rows(cohort)[::N_PER_CLASS], subjects[::N_PER_CLASS]):  # one subject per class
        volumes = ec.subject_volumes(subject)
        assert float(row["ventricles_ml"]) == pytest.approx(volumes["ventricles_ml"], abs=2e-3)
        assert float(row["hippocampi_ml"]) == pytest.approx(volumes["hippocampi_ml"], abs=2e-3)


def test_same_seed_same_arrays_whatever_the_workers(cohort, tmp_path):
    again = ec.generate_external_cohort(tmp_path / "two_workers", n_per_class=N_PER_CLASS, size=SIZE, seed=SEED,
                                        num_workers=2)
    assert _rows(again) == _rows(cohort)
    first, second = _arrays(cohort), _arrays(again)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    other = ec.render_subject(replace(ec.draw_subjects(1, SEED + 1)[0], subject_id="EXT00000"), SIZE)[0]
    assert other.shape != first["EXT00000"].shape or not np.array_equal(np.asarray(other.dataobj),
                                                                      first["EXT00000"])


def test_existing_cohort_is_reused(cohort, tmp_path):
    out = tmp_path / "reuse"
    manifest = ec.generate_external_cohort(out, n_per_class=1, size=SIZE, seed=SEED, num_workers=1)
    image = out / _rows(manifest)[0]["image_path"]
    stamp = image.stat().st_mtime_ns
    assert ec.generate_external_cohort(out, n_per_class=1, size=SIZE, seed=SEED, num_workers=1) == manifest
    assert image.stat().st_mtime_ns == stamp
    ec.generate_external_cohort(out, n_per_class=1, size=SIZE + 4, seed=SEED, num_workers=1)  # settings changed
    assert max(nib.load(image).shape) == SIZE + 4


def test_atrophy_grows_ventricles_and_shrinks_hippocampi_with_class():
    subjects = ec.draw_subjects(6, 0)
    volumes = {c: [ec.subject_volumes(s) for s in subjects if s.diagnosis == c] for c in ("CN", "AD")}
    ventricles = {c: np.mean([v["ventricles_ml"] for v in vs]) for c, vs in volumes.items()}
    hippocampi = {c: np.mean([v["hippocampi_ml"] for v in vs]) for c, vs in volumes.items()}
    assert ventricles["AD"] > ventricles["CN"] + 5.0
    assert hippocampi["AD"] < hippocampi["CN"] - 0.5
    low = ec.atrophy_amplitudes(75.0, 0.1, 0, np.random.default_rng(1))
    high = ec.atrophy_amplitudes(75.0, 0.8, 0, np.random.default_rng(1))
    assert all(high[name] > low[name] for name in ec.ATROPHY)


def test_most_severe_deformation_does_not_fold():
    anatomy = ec.load_anatomy()
    shape = ec.draw_shape(ec.draw_subjects(1, 0)[0], anatomy, np.random.default_rng(0))
    shape.amplitudes = {name: effect.limits[1] for name, effect in ec.ATROPHY.items()}
    field = ec.displacement_field(shape, anatomy)
    gradients = [np.gradient(field[i], ec.FIELD_MM) for i in range(3)]
    jacobian = np.stack([np.stack([gradients[i][j] + (i == j) for j in range(3)], -1) for i in range(3)], -2)
    assert np.linalg.det(jacobian).min() > 0.0


def test_stored_orientation_keeps_world_anatomy():
    subject = ec.draw_subjects(1, SEED)[0]
    centres = []
    for axcodes in ("LAS", "PSR", "LPS"):
        img, _ = ec.render_subject(replace(subject, axcodes=axcodes), SIZE)
        assert "".join(nib.aff2axcodes(img.affine)) == axcodes
        weights = img.get_fdata(dtype=np.float64).clip(min=0)
        centre = np.array([(np.indices(weights.shape)[a] * weights).sum() / weights.sum() for a in range(3)])
        centres.append(img.affine[:3, :3] @ centre + img.affine[:3, 3])
    for centre in centres[1:]:
        np.testing.assert_allclose(centre, centres[0], atol=1e-3)  # mm; far below a voxel (> 4 mm here)


def test_missing_mricron_data_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="mricron-data") as error:
        ec.template_paths(tmp_path)
    assert "ch2.nii.gz" in str(error.value) and "aal.nii.gz" in str(error.value)
    with pytest.raises(FileNotFoundError, match="install the Debian package mricron-data"):
        ec.generate_external_cohort(tmp_path / "out", n_per_class=1, template_dir=tmp_path)


def test_reference_scores_read_the_manifest(tmp_path):
    from external.reference_scores import reference_scores

    manifest = tmp_path / "manifest.csv"
    rng = np.random.default_rng(0)
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ec.MANIFEST_COLUMNS))
        writer.writeheader()
        for c, diagnosis in enumerate(ec.CLASSES):
            for i in range(10):  # ventricles separate the classes perfectly; the record fields are noise
                writer.writerow({"subject_id": f"S{c}{i}", "diagnosis": diagnosis, "ventricles_ml": 20 + 20 * c + i,
                                 "hippocampi_ml": 14.0, "age": 70 + i, "sex": "FM"[i % 2],
                                 "education": int(rng.integers(8, 20)), "mmse": int(rng.integers(20, 31)),
                                 "apoe4": int(rng.integers(0, 3))})
    scores = reference_scores(manifest, folds=5)
    assert scores["image"] == 1.0 and scores["text"] < 0.8
    with pytest.raises(ValueError, match="at least folds=20"):
        reference_scores(manifest, folds=20)
