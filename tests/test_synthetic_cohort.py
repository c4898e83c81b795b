"""The built-in synthetic cohort: files, orientation, determinism and class effects."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

import synthetic_cohort as sc


N_PER_CLASS, SIZE = 3, 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    manifest = sc.generate_cohort(out, n_per_class=N_PER_CLASS, size=SIZE, seed=3, num_workers=1, progress=False)
    with manifest.open(newline="") as f:
        return manifest, list(csv.DictReader(f))


def test_manifest_schema_and_values(cohort):
    manifest, rows = cohort
    with manifest.open(newline="") as f:
        assert tuple(next(csv.reader(f))) == sc.COHORT_COLUMNS
    assert len(rows) == 3 * N_PER_CLASS
    assert {r["diagnosis"] for r in rows} == set(sc.DIAGNOSIS_LABELS)
    assert {r["sex"] for r in rows} <= {"F", "M"}
    assert all(r["dataset"] in sc.DEFAULT_SITES for r in rows)
    assert all(0 <= int(r["mmse"]) <= 30 and int(r["apoe4"]) in (0, 1, 2) for r in rows)
    assert all(float(r["cdr"]) == 0.0 for r in rows if r["diagnosis"] == "CN")
    assert all(float(r["cdr"]) >= 0.5 for r in rows if r["diagnosis"] != "CN")
    assert len({r["subject_id"] for r in rows}) == len(rows)


def test_images_load_with_site_orientation(cohort):
    manifest, rows = cohort
    sites = {s.name: s for s in sc.make_sites()}
    for row in rows:
        img = nib.load(manifest.parent / row["image_path"])
        assert img.ndim == 3 and min(img.shape) >= 8
        assert "".join(nib.aff2axcodes(img.affine)) == sites[row["dataset"]].axcodes
        assert np.isfinite(img.get_fdata()).all() and img.get_fdata().max() > 0


def test_orientation_keeps_world_anatomy():
    """The same RAS array stored in every site orientation resamples to the same canonical image."""
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    for site in sc.make_sites():
        float_site = sc.Site(**{**site.__dict__, "dtype": "float32"})
        img = nib.as_closest_canonical(sc._store(data, affine, float_site))
        np.testing.assert_allclose(img.affine, affine)
        np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)


def test_deterministic_per_seed(cohort, tmp_path):
    manifest, rows = cohort
    again = sc.generate_cohort(tmp_path, n_per_class=N_PER_CLASS, size=SIZE, seed=3, num_workers=1, progress=False)
    assert again.read_bytes() == manifest.read_bytes()
    for row in rows[:2]:
        assert (tmp_path / row["image_path"]).read_bytes() == (manifest.parent / row["image_path"]).read_bytes()
    other = sc.draw_subjects(N_PER_CLASS, seed=4, sites=sc.DEFAULT_SITES)
    assert [s.age for s in other] != [float(r["age"]) for r in rows]


def test_reuses_existing_cohort(cohort):
    manifest, _ = cohort
    stamp = manifest.stat().st_mtime_ns
    assert sc.generate_cohort(manifest.parent, n_per_class=N_PER_CLASS, size=SIZE, seed=3,
                              num_workers=1, progress=False) == manifest
    assert manifest.stat().st_mtime_ns == stamp
    assert json.loads((manifest.parent / "cohort.json").read_text())["settings"]["seed"] == 3


def test_volumes_move_with_diagnosis():
    """Ventricles grow and hippocampi shrink from CN to AD (same seeds for anatomy noise)."""
    atlas = sc.load_atlas()
    base = sc.draw_subjects(1, seed=0, sites=sc.DEFAULT_SITES)[0]
    volumes = {}
    for diagnosis, severity in (("CN", 0.0), ("MCI", 0.5), ("AD", 1.0)):
        spec = sc.SubjectSpec(**{**base.__dict__, "diagnosis": diagnosis, "severity": severity})
        warp = sc.subject_warp(spec, atlas, np.random.default_rng(7))
        volumes[diagnosis] = (sc.structure_volume_ml(atlas.masks["ventricles"], atlas, warp),
                              sc.structure_volume_ml(atlas.masks["hippocampi"], atlas, warp))
    assert volumes["CN"][0] < volumes["MCI"][0] < volumes["AD"][0]
    assert volumes["CN"][1] > volumes["MCI"][1] > volumes["AD"][1]
    assert volumes["AD"][0] > 1.3 * volumes["CN"][0]


def test_class_means_in_manifest(cohort):
    _, rows = cohort
    mean = {c: np.mean([float(r["ventricles_ml"]) for r in rows if r["diagnosis"] == c]) for c in ("CN", "AD")}
    assert mean["AD"] > mean["CN"]


def test_exponentiate_is_invertible_map():
    """A small curl-free velocity gives a displacement whose Jacobian determinant stays positive."""
    rng = np.random.default_rng(0)
    log_jac = 0.5 * sc.smooth_random_field((16, 16, 16), 2.0, rng)
    disp = sc.exponentiate(sc.velocity_from_log_jacobian(log_jac))
    grads = np.stack([np.stack(np.gradient(disp[i]), 0) for i in range(3)], 0)  # (3, 3, X, Y, Z)
    jac = grads + np.eye(3)[:, :, None, None, None]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    assert det.min() > 0
    assert np.corrcoef(np.log(det).ravel(), log_jac.ravel())[0, 1] > 0.5  # div v = log-Jacobian


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_per_class"):
        sc.generate_cohort(tmp_path, n_per_class=0)
    with pytest.raises(ValueError, match="unique"):
        sc.make_sites(["a", "a"])


def test_follow_up_visits_share_subject_and_progress(tmp_path):
    """visits=2: same subjects at m12, a year older, same site, ventricles larger and hippocampi smaller."""
    manifest = sc.generate_cohort(tmp_path, n_per_class=1, size=16, seed=5, num_workers=1, progress=False, visits=2)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["subject_id"], r["visit"]): r for r in rows}
    subjects = {r["subject_id"] for r in rows}
    assert len(rows) == 6 and {r["visit"] for r in rows} == {"bl", "m12"}
    for s in subjects:
        bl, fu = by[(s, "bl")], by[(s, "m12")]
        assert bl["dataset"] == fu["dataset"] and bl["diagnosis"] == fu["diagnosis"]
        assert float(fu["age"]) == pytest.approx(float(bl["age"]) + 1)
        assert float(fu["ventricles_ml"]) > float(bl["ventricles_ml"])
        assert float(fu["hippocampi_ml"]) < float(bl["hippocampi_ml"])
    baseline_only = sc.draw_subjects(1, seed=5, sites=sc.DEFAULT_SITES)
    assert sc.draw_subjects(1, seed=5, sites=sc.DEFAULT_SITES, visits=2)[:3] == baseline_only


def test_longitudinal_cohort_splits_by_subject(tmp_path):
    from medblip_data import check_subject_disjoint, load_corpus

    specs = sc.draw_subjects(6, seed=0, sites=sc.DEFAULT_SITES, visits=3)
    rows = [sc._manifest_row(s, f"images/{s.subject_id}_{s.visit}.nii.gz", {"ventricles_ml": 1.0,
                                                                             "hippocampi_ml": 1.0}) for s in specs]
    sc._write_manifest(tmp_path / "manifest.csv", rows)
    corpus = load_corpus([tmp_path / "manifest.csv"], holdout_datasets=["site_E"], val_fraction=0.2,
                         test_fraction=0.2)
    check_subject_disjoint(corpus)
    assert set(corpus["zeroshot"]["dataset"]) == {"site_E"}
    assert sum(len(d) for d in corpus.values()) == 54
