"""Corpus formats: BIDS, ClinicaDL (BIDS / CAPS root), Parquet with embedded NIfTI, niftifolder, save_to_disk, Hub.

Every reader is checked against the equivalent CSV manifest: the same rows and records (``read_manifest``'s
frame), the same voxels where images had to be materialised from bytes, and the same ``load_corpus`` splits.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT

import synthetic_cohort as sc
from medblip_data import MANIFEST_COLUMNS, ManifestError, load_corpus, read_manifest
from medblip_data.bids import export_bids
from medblip_data.formats import CorpusSource, detect_format, read_corpus_source
from medblip_data.hf_datasets import export_parquet
from medblip_data.records import COLUMN_ALIASES, SourceReport


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 synthetic subjects x 2 visits (bl, m12): manifest.csv, metadata.csv (niftifolder) and images/."""
    out = tmp_path_factory.mktemp("cohort")
    return sc.generate_cohort(out, n_per_class=2, size=32, seed=0, num_workers=1, progress=False, visits=2)


@pytest.fixture(scope="module")
def expected(cohort):
    return read_manifest(cohort)


@pytest.fixture(scope="module")
def bids_root(cohort, tmp_path_factory):
    return export_bids(cohort, tmp_path_factory.mktemp("bids") / "bids", name="synthetic")


@pytest.fixture(autouse=True)
def nifti_cache(tmp_path, monkeypatch):
    """Images materialised from bytes without an explicit folder land in the test's folder, not in ~/.cache."""
    monkeypatch.setenv("MEDBLIP_NIFTI_CACHE", str(tmp_path / "default_nifti_cache"))


def _sorted(frame, by=("dataset", "subject_id", "visit")):
    return frame.sort_values(list(by), na_position="first").reset_index(drop=True)


def assert_same_records(frame, expected, same_paths=True):
    """Equal frames (columns as sets, rows by subject and visit); images equal voxel for voxel otherwise."""
    assert set(frame.columns) == set(expected.columns)
    got, want = _sorted(frame[list(expected.columns)]), _sorted(expected)
    if same_paths:
        pd.testing.assert_frame_equal(got, want)
        return
    pd.testing.assert_frame_equal(got.drop(columns="image_path"), want.drop(columns="image_path"))
    for a, b in zip(got["image_path"], want["image_path"], strict=True):
        assert a != b and Path(a).is_absolute()
        img_a, img_b = nib.load(a), nib.load(b)
        np.testing.assert_array_equal(np.asarray(img_a.dataobj), np.asarray(img_b.dataobj))
        np.testing.assert_array_equal(img_a.affine, img_b.affine)


def assert_same_splits(source, manifest, same_paths=True):
    """``load_corpus`` puts the same scans (and records) in the same splits for both inputs."""
    a = load_corpus([source], val_fraction=0.25, test_fraction=0.25, seed=1)
    b = load_corpus([manifest], val_fraction=0.25, test_fraction=0.25, seed=1)
    assert set(a) == set(b) == {"train", "validation", "test"}
    for split in b:
        columns = [c for c in b[split].column_names if same_paths or c != "image_path"]
        assert sorted(a[split].column_names) == sorted(b[split].column_names)
        assert _sorted(a[split].to_pandas()[columns]).equals(_sorted(b[split].to_pandas()[columns]))
    return a


def _copy(src, dst):
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return str(Path(dst).resolve())


def _tsv(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


# ---------------------------------------------------------------------------- detection and manifests


def test_detect_format(cohort, bids_root, tmp_path):
    (tmp_path / "caps" / "subjects").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "labels.tsv").write_text("participant_id\tsession_id\tdiagnosis\n")
    (tmp_path / "x.parquet").write_bytes(b"")
    (tmp_path / "x.txt").write_text("")
    assert detect_format(cohort) == "manifest" and detect_format(tmp_path / "missing.csv") == "manifest"
    assert detect_format(bids_root) == "bids" and detect_format(cohort.parent) == "niftifolder"
    assert detect_format(tmp_path / "labels.tsv") == "clinicadl" and detect_format(tmp_path / "x.parquet") == "parquet"
    assert detect_format("someone/adni-t1") == "hub" and detect_format("hf://datasets/someone/adni-t1") == "hub"
    with pytest.raises(ManifestError, match="CAPS folder holds no labels"):
        detect_format(tmp_path / "caps")
    with pytest.raises(ManifestError, match="no known corpus format"):
        detect_format(tmp_path / "empty")
    with pytest.raises(ManifestError, match=r"x\.txt: unknown corpus file type"):
        detect_format(tmp_path / "x.txt")


def test_manifest_source_is_read_manifest(cohort, expected):
    frame, report = read_corpus_source(cohort)
    pd.testing.assert_frame_equal(frame, expected)
    assert report.format == "manifest" and report.source == str(cohort.resolve()) and report.scans == 12
    assert report.subjects == 6 and json.loads(json.dumps(report.to_dict()))["format"] == "manifest"


def test_manifest_with_column_overrides(cohort, expected, tmp_path):
    """A CSV with other column names reads like the manifest with image_column / label_column / column_map."""
    table = pd.read_csv(cohort, dtype=str).rename(columns={"image_path": "scan", "diagnosis": "DX",
                                                           "education": "PTEDUCAT", "mmse": "MMSE_score"})
    table["scan"] = [str(cohort.parent / p) for p in table["scan"]]
    table.to_csv(tmp_path / "other.csv", index=False)
    frame, report = read_corpus_source(tmp_path / "other.csv", image_column="scan", label_column="DX",
                                       column_map={"PTEDUCAT": "education", "MMSE_score": "mmse"})
    assert_same_records(frame, expected)
    assert report.columns["diagnosis"] == ["DX"] and report.columns["education"] == ["PTEDUCAT"]
    with pytest.raises(ManifestError, match=r"other\.csv: no image column"):
        read_corpus_source(tmp_path / "other.csv", label_column="DX")
    with pytest.raises(ValueError, match="target must be one of"):
        read_corpus_source(tmp_path / "other.csv", column_map={"DX": "label"})


# ---------------------------------------------------------------------------- BIDS


def test_bids_export_round_trip(cohort, expected, bids_root):
    """export_bids writes Clinica's columns; reading the tree back gives the manifest's rows and splits."""
    participants = pd.read_csv(bids_root / "participants.tsv", sep="\t")
    assert {"participant_id", "sex", "education_level", "apoe4", "age_bl", "diagnosis_bl"} <= set(participants)
    sessions = pd.read_csv(bids_root / "sub-SYN00000" / "sub-SYN00000_sessions.tsv", sep="\t")
    assert list(sessions["session_id"]) == ["ses-bl", "ses-m12"] and {"MMS", "cdr_global", "diagnosis"} <= set(sessions)
    assert (bids_root / "sub-SYN00000" / "ses-m12" / "anat" / "sub-SYN00000_ses-m12_T1w.nii.gz").is_file()
    frame, report = read_corpus_source(bids_root)
    assert report.format == "bids" and report.scans == 12 and not report.missing_images and not report.fallbacks
    assert_same_records(frame, expected, same_paths=False)
    assert_same_splits(bids_root, cohort, same_paths=False)


@pytest.fixture(scope="module")
def trap_tree(cohort, expected, anatomical_nii, tmp_path_factory):
    """A Clinica-style BIDS tree with every trap, and the CSV manifest it is equivalent to."""
    root = tmp_path_factory.mktemp("traps") / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "TrapCohort", "BIDSVersion": "1.9.0"}))
    rows = {(r.subject_id, r.visit): r for r in expected.itertuples()}
    want = []  # the equivalent manifest rows

    def scan(sub, ses, src, name=None):
        name = name or f"sub-{sub}_ses-{ses}_T1w.nii.gz"
        return _copy(src, root / f"sub-{sub}" / f"ses-{ses}" / "anat" / name)

    participants = []
    for sub in ("SYN00000", "SYN00001", "SYN00002", "SYN00003"):
        bl = rows[(sub, "bl")]
        participants.append({"participant_id": f"sub-{sub}", "alternative_id_1": f"ADNI_{sub}", "sex": bl.sex,
                             "education_level": bl.education, "age_bl": bl.age, "diagnosis_bl": bl.diagnosis,
                             "mmse_bl": bl.mmse, "apoe4": bl.apoe4})
        sessions = []
        for ses in ("bl", "m12"):
            r = rows[(sub, ses)]
            sessions.append({"session_id": f"ses-{ses}", "age": r.age, "MMS": r.mmse, "cdr_global": r.cdr,
                             "diagnosis": r.diagnosis})
            image = scan(sub, ses, r.image_path)
            want.append({**{c: getattr(r, c) for c in MANIFEST_COLUMNS}, "image_path": image, "notes": None,
                         "dataset": "TrapCohort", "alternative_id_1": f"ADNI_{sub}", "mmse_bl": str(bl.mmse)})
        if sub == "SYN00000":  # two runs (run-02 kept, Clinica's policy), a T2w and a FLAIR beside them
            os.remove(root / "sub-SYN00000/ses-bl/anat/sub-SYN00000_ses-bl_T1w.nii.gz")
            scan(sub, "bl", bl.image_path, "sub-SYN00000_ses-bl_run-01_T1w.nii.gz")
            want[-2]["image_path"] = scan(sub, "bl", anatomical_nii, "sub-SYN00000_ses-bl_run-02_T1w.nii")
            scan(sub, "bl", anatomical_nii, "sub-SYN00000_ses-bl_T2w.nii")
            scan(sub, "bl", anatomical_nii, "sub-SYN00000_ses-bl_FLAIR.nii")
        if sub == "SYN00001":  # follow-up diagnosis and age n/a -> diagnosis_bl, age_bl; a FLAIR-only session
            sessions[1].update(diagnosis="n/a", age="n/a")
            want[-1].update(diagnosis=bl.diagnosis, age=bl.age)
            scan(sub, "m36", anatomical_nii, "sub-SYN00001_ses-m36_FLAIR.nii")
        if sub == "SYN00002":  # MMS and CDR n/a; a session with clinical data and no MRI
            sessions[1].update(MMS="n/a", cdr_global="n/a")
            want[-1].update(mmse=np.nan, cdr=np.nan)
            sessions.append({"session_id": "ses-m24", "age": 80, "MMS": 25, "cdr_global": 0.5, "diagnosis": "MCI"})
        if sub == "SYN00003":  # ADNI converter's column name MMSE; sex and education n/a
            participants[-1].update(sex="n/a", education_level="n/a")
            for w in want[-2:]:
                w.update(sex=None, education=np.nan)
            sessions = [{("MMSE" if k == "MMS" else k): v for k, v in s.items()} for s in sessions]
        _tsv(root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", sessions)
    # no session level: sub-NS/anat/sub-NS_T1w.nii; its record is the participant's (baseline) record
    participants.append({"participant_id": "sub-NS", "sex": "F", "education_level": 12, "age_bl": 70.5,
                         "diagnosis_bl": "AD", "mmse_bl": 21, "apoe4": 1})
    want.append({"subject_id": "NS", "image_path": _copy(anatomical_nii, root / "sub-NS/anat/sub-NS_T1w.nii"),
                 "diagnosis": "AD", "dataset": "TrapCohort", "visit": None, "age": 70.5, "sex": "F",
                 "education": 12, "mmse": None, "cdr": None, "apoe4": 1, "mmse_bl": "21.0"})
    # unlabelled (no diagnosis anywhere), and a participant without any folder
    participants.append({"participant_id": "sub-UL", "sex": "M", "age_bl": 66, "diagnosis_bl": "n/a"})
    _copy(anatomical_nii, root / "sub-UL/ses-bl/anat/sub-UL_ses-bl_T1w.nii")
    participants.append({"participant_id": "sub-GHOST", "sex": "M", "age_bl": 60, "diagnosis_bl": "CN"})
    # T1w images that are not raw data of this dataset: never read
    for folder in ("derivatives/t1_linear", "sourcedata", "code"):
        _copy(anatomical_nii, root / folder / "sub-SYN00000/ses-bl/anat/sub-SYN00000_ses-bl_T1w.nii")
    _tsv(root / "participants.tsv", pd.DataFrame(participants).fillna("n/a"))
    manifest = root.parent / "equivalent.csv"
    pd.DataFrame(want).to_csv(manifest, index=False)
    return root, manifest


def test_bids_tree_with_traps(trap_tree):
    root, manifest = trap_tree
    frame, report = read_corpus_source(root)
    assert_same_records(frame, read_manifest(manifest))
    assert report.format == "bids" and report.datasets == ["TrapCohort"] and report.scans == 9
    assert sorted(Path(s["item"]).name for s in report.skipped_files) == [
        "sub-SYN00000_ses-bl_FLAIR.nii", "sub-SYN00000_ses-bl_T2w.nii", "sub-SYN00001_ses-m36_FLAIR.nii"]
    assert [Path(s["item"]).name for s in report.extra_runs] == ["sub-SYN00000_ses-bl_run-01_T1w.nii.gz"]
    assert sorted(s["item"] for s in report.missing_images) == ["sub-GHOST", "sub-SYN00001 ses-m36",
                                                                "sub-SYN00002 ses-m24"]
    assert len(report.unlabelled) == 1 and "sub-UL_ses-bl_T1w" in report.unlabelled[0]["item"]
    # SYN00001 m12 (session n/a) and NS (no session) use the baseline diagnosis; every participant-only age too
    assert report.fallbacks == {"diagnosis<-diagnosis_bl": 2, "age<-age_bl": 2}
    assert sorted(report.columns["mmse"]) == ["MMS", "MMSE"] and any("derivatives" in n for n in report.notes)
    assert_same_splits(root, manifest)


def test_bids_runs_policy(trap_tree):
    root, _ = trap_tree
    first, report = read_corpus_source(root, runs="first")
    chosen = first.loc[(first.subject_id == "SYN00000") & (first.visit == "bl"), "image_path"].tolist()
    assert [Path(p).name for p in chosen] == ["sub-SYN00000_ses-bl_run-01_T1w.nii.gz"]
    every, report = read_corpus_source(root, runs="all")
    assert len(every) == 10 and not report.extra_runs
    with pytest.raises(ValueError, match="runs must be one of"):
        read_corpus_source(root, runs="best")


def test_bids_errors_name_file_row_and_column(bids_root, tmp_path):
    broken = tmp_path / "bids"
    shutil.copytree(bids_root, broken)
    sessions = broken / "sub-SYN00002" / "sub-SYN00002_sessions.tsv"
    table = pd.read_csv(sessions, sep="\t", dtype=str)
    table.loc[1, "diagnosis"] = "Converted"
    table.to_csv(sessions, sep="\t", index=False)
    with pytest.raises(ManifestError, match=r"sub-SYN00002_sessions\.tsv row 3: column 'diagnosis'.*Converted"):
        read_corpus_source(broken)
    table.loc[1, ["diagnosis", "MMS"]] = ["MCI", "twenty"]
    table.to_csv(sessions, sep="\t", index=False)
    with pytest.raises(ManifestError, match=r"sub-SYN00002_sessions\.tsv row 3: column 'MMS' \(mmse\) is not a"):
        read_corpus_source(broken)
    (broken / "participants.tsv").unlink()
    with pytest.raises(ManifestError, match=r"bids: BIDS root has no participants\.tsv"):
        read_corpus_source(broken)


# ---------------------------------------------------------------------------- ClinicaDL


def test_clinicadl_tsv_with_bids_root(cohort, expected, bids_root, tmp_path):
    """participant_id/session_id/diagnosis only: the BIDS records fill the rest; a missing image is listed."""
    rows = [{"participant_id": f"sub-{r.subject_id}", "session_id": f"ses-{r.visit}", "diagnosis": r.diagnosis}
            for r in expected.itertuples()]
    _tsv(tmp_path / "labels.tsv", rows + [{"participant_id": "sub-SYN00000", "session_id": "ses-m99",
                                           "diagnosis": "CN"}])
    frame, report = read_corpus_source(tmp_path / "labels.tsv", root=bids_root)
    assert report.format == "clinicadl" and report.root == str(bids_root.resolve())
    assert_same_records(frame, expected, same_paths=False)
    assert [m["item"] for m in report.missing_images] == [f"{tmp_path / 'labels.tsv'} row 14 (sub-SYN00000 ses-m99)"]
    with pytest.raises(ManifestError, match=r"labels\.tsv row 14 \(sub-SYN00000 ses-m99\): image missing"):
        read_corpus_source(tmp_path / "labels.tsv", root=bids_root, missing_images="error")
    with pytest.raises(ManifestError, match=r"labels\.tsv: a ClinicaDL TSV needs root="):
        read_corpus_source(tmp_path / "labels.tsv")
    _tsv(tmp_path / "twice.tsv", rows + rows[:1])
    with pytest.raises(ManifestError, match=r"twice\.tsv: participant_id/session_id pairs repeat at rows \[2, 14\]"):
        read_corpus_source(tmp_path / "twice.tsv", root=bids_root)
    assert_same_splits(CorpusSource(tmp_path / "labels.tsv", root=bids_root), cohort, same_paths=False)


def test_clinicadl_tsv_with_caps_root(cohort, expected, tmp_path):
    """CAPS t1-linear images (both Clinica file namings); records from the TSV; unknown labels name the row."""
    caps, want = tmp_path / "caps", expected.copy()
    for i, r in enumerate(expected.itertuples()):
        sub, ses = f"sub-{r.subject_id}", f"ses-{r.visit}"
        old_naming = "_T1w" if i % 2 else ""  # clinica < 0.6 kept the _T1w suffix before space-
        name = f"{sub}_{ses}{old_naming}_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz"
        want.loc[i, "image_path"] = _copy(r.image_path, caps / "subjects" / sub / ses / "t1_linear" / name)
    _copy(expected.image_path[0], caps / "subjects/sub-SYN00000/ses-bl/t1_linear/sub-SYN00000_ses-bl_"
                                         "space-MNI152NLin2009cSym_res-1x1x1_T1w.nii.gz")  # uncropped: not read
    table = pd.read_csv(cohort, dtype=str).drop(columns="image_path")
    table = table.rename(columns={"subject_id": "participant_id", "visit": "session_id", "mmse": "MMSE",
                                  "dataset": "cohort"})
    table["participant_id"] = "sub-" + table["participant_id"]
    table["session_id"] = "ses-" + table["session_id"]
    table.to_csv(tmp_path / "split.tsv", sep="\t", index=False)
    frame, report = read_corpus_source(tmp_path / "split.tsv", root=caps)
    assert_same_records(frame, want)
    assert report.columns["dataset"] == ["cohort"] and report.columns["mmse"] == ["MMSE"]
    table.drop(columns="cohort").to_csv(tmp_path / "no_cohort.tsv", sep="\t", index=False)
    unnamed, _ = read_corpus_source(tmp_path / "no_cohort.tsv", root=caps)
    assert set(unnamed["dataset"]) == {"caps"}  # no cohort column: the root's name (dataset_description Name)
    want.to_csv(tmp_path / "equivalent.csv", index=False)
    assert_same_splits(CorpusSource(tmp_path / "split.tsv", root=caps), tmp_path / "equivalent.csv")
    table.loc[4, "diagnosis"] = "sMCI"
    table.to_csv(tmp_path / "split.tsv", sep="\t", index=False)
    with pytest.raises(ManifestError, match=r"split\.tsv row 6: column 'diagnosis'.*'sMCI'"):
        read_corpus_source(tmp_path / "split.tsv", root=caps)


# ---------------------------------------------------------------------------- datasets sources


@pytest.fixture(scope="module")
def parquet_dir(cohort, tmp_path_factory):
    files = export_parquet(cohort, tmp_path_factory.mktemp("parquet"), num_shards=2)
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    return files[0].parents[1]


def test_parquet_with_embedded_nifti_bytes(cohort, expected, parquet_dir, tmp_path):
    import datasets

    path = parquet_dir / "data" / "train-00000-of-00002.parquet"
    table = pq.read_table(parquet_dir / "data")
    cells = table.column("image").to_pylist()
    assert len(cells) == 12 and all(v["bytes"] and v["path"] == Path(p).name
                                    for v, p in zip(cells, expected["image_path"], strict=True))
    assert isinstance(datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf")).features["image"],
                      datasets.Nifti)
    cache = tmp_path / "nifti"
    frame, report = read_corpus_source(parquet_dir, materialize_dir=cache, cache_dir=str(tmp_path / "hf"))
    assert report.format == "parquet" and report.materialised == 12 and report.columns["image_path"] == ["image"]
    assert all(Path(p).parent.parent == cache for p in frame["image_path"])
    assert_same_records(frame, expected, same_paths=False)
    stamps = {p: os.stat(p).st_mtime_ns for p in frame["image_path"]}
    again, _ = read_corpus_source(parquet_dir, materialize_dir=cache, cache_dir=str(tmp_path / "hf"))
    assert sorted(again["image_path"]) == sorted(stamps)
    assert {p: os.stat(p).st_mtime_ns for p in again["image_path"]} == stamps  # reused: cache keys hold
    one_file, _ = read_corpus_source(path, materialize_dir=cache, cache_dir=str(tmp_path / "hf"))
    assert len(one_file) == 6 and set(one_file["image_path"]) <= set(stamps)
    assert_same_splits(CorpusSource(parquet_dir, materialize_dir=cache, cache_dir=str(tmp_path / "hf")), cohort,
                       same_paths=False)


def test_parquet_errors(expected, tmp_path):
    table = expected.drop(columns="image_path").astype(str)
    table.to_parquet(tmp_path / "no_image.parquet")
    with pytest.raises(ManifestError, match=r"no_image\.parquet: no image column: no datasets\.Nifti\(\) column"):
        read_corpus_source(tmp_path / "no_image.parquet", cache_dir=str(tmp_path / "hf"))
    table = expected.astype(str)
    table.loc[3, "diagnosis"] = "Converted"
    table.to_parquet(tmp_path / "bad_label.parquet")
    with pytest.raises(ManifestError, match=r"bad_label\.parquet \[train\] row 3: column 'diagnosis'.*Converted"):
        read_corpus_source(tmp_path / "bad_label.parquet", cache_dir=str(tmp_path / "hf"))


def test_niftifolder(cohort, expected, tmp_path):
    """generate_cohort writes metadata.csv: the folder loads with datasets' niftifolder builder, records included."""
    import datasets

    loaded = datasets.load_dataset("niftifolder", data_dir=str(cohort.parent), cache_dir=str(tmp_path / "hf"))
    assert loaded["train"].num_rows == 12 and isinstance(loaded["train"].features["nifti"], datasets.Nifti)
    assert {"subject_id", "diagnosis", "mmse", "ventricles_ml"} <= set(loaded["train"].column_names)
    frame, report = read_corpus_source(cohort.parent, cache_dir=str(tmp_path / "hf"))
    assert report.format == "niftifolder" and report.columns["image_path"] == ["nifti"] and not report.materialised
    assert_same_records(frame, expected)  # the very same files
    assert_same_splits(CorpusSource(cohort.parent, cache_dir=str(tmp_path / "hf")), cohort)


def test_save_to_disk_and_in_memory_datasets(cohort, expected, tmp_path):
    """A DatasetDict with a Nifti column, a ClassLabel ``label`` column and two splits, saved and in memory."""
    import datasets

    table = expected.drop(columns="image_path").rename(columns={"diagnosis": "label"})
    table = table.astype(object).where(table.notna(), None)
    records = {"image": list(expected["image_path"]), **table.to_dict(orient="list")}
    for column in ("age", "education", "mmse", "cdr", "apoe4"):
        records[column] = [None if v is None else float(v) for v in records[column]]
    full = datasets.Dataset.from_dict(records).cast_column("image", datasets.Nifti())
    full = full.cast_column("label", datasets.ClassLabel(names=["CN", "MCI", "AD"]))
    split = datasets.DatasetDict({"train": full.select(range(8)), "test": full.select(range(8, 12))})
    memory, report = read_corpus_source(split)  # in memory: the Nifti column holds the files' paths
    assert report.format == "datasets" and report.columns["diagnosis"] == ["label"] and not report.materialised
    assert_same_records(memory, expected)
    split.save_to_disk(str(tmp_path / "saved"))  # save_to_disk embeds the files' bytes
    saved = CorpusSource(tmp_path / "saved", materialize_dir=tmp_path / "nifti")
    frame, report = read_corpus_source(saved)
    assert report.format == "datasets-disk" and report.splits == {"train": 8, "test": 4}
    assert_same_records(frame, expected, same_paths=False)
    test_only, report = read_corpus_source(tmp_path / "saved", split="test", materialize_dir=tmp_path / "nifti")
    assert len(test_only) == 4 and report.splits == {"test": 4}
    with pytest.raises(ManifestError, match=r"no split 'validation'; splits: \['test', 'train'\]"):
        read_corpus_source(tmp_path / "saved", split="validation")
    assert_same_splits(saved, cohort, same_paths=False)


def test_hub_id_through_load_dataset(cohort, expected, parquet_dir, tmp_path, monkeypatch):
    """A Hub id goes to datasets.load_dataset (mocked with the Parquet export: bytes embedded, as on the Hub)."""
    import datasets

    real = datasets.load_dataset
    with pytest.raises(ManifestError, match="loading it as a Hub dataset failed"):  # offline here
        read_corpus_source("medblip-test/no-such-dataset", cache_dir=str(tmp_path / "hf"))
    calls = []

    def fake(path, *args, **kwargs):
        calls.append(path)
        return real("parquet", data_dir=str(parquet_dir), cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    frame, report = read_corpus_source("hf://datasets/medblip/synthetic", materialize_dir=tmp_path / "nifti")
    assert calls == ["medblip/synthetic"] and report.format == "hub" and report.source == "medblip/synthetic"
    assert_same_records(frame, expected, same_paths=False)
    named, _ = read_corpus_source("medblip/synthetic", materialize_dir=tmp_path / "nifti", dataset="SYN")
    assert set(named["dataset"]) == {"SYN"}
    assert_same_splits(CorpusSource("medblip/synthetic", materialize_dir=tmp_path / "nifti"), cohort,
                       same_paths=False)


def test_load_corpus_mixes_sources_and_reports_them(cohort, bids_root, tmp_path):
    other = tmp_path / "other.csv"
    table = pd.read_csv(cohort, dtype=str)
    table["image_path"] = [str(cohort.parent / p) for p in table["image_path"]]
    table.assign(dataset="OTHER").to_csv(other, index=False)
    corpus = load_corpus([bids_root, other], holdout_datasets=["OTHER"])
    assert [r.format for r in corpus.source_reports] == ["bids", "manifest"]
    assert len(corpus["zeroshot"]) == 12 and sum(len(corpus[s]) for s in ("train", "validation", "test")) == 12
    assert isinstance(corpus.source_reports[0], SourceReport) and "bids" in corpus.source_reports[0].describe()


def test_alias_table_documented():
    """Every manifest column has aliases, and the records module docstring lists each alias."""
    from medblip_data import records

    for column, names in COLUMN_ALIASES.items():
        line = next(line for line in records.__doc__.splitlines() if line.startswith(column + " "))
        assert all(name in line for name in names), column


def test_synthetic_cohort_cli_exports(tmp_path, capsys):
    """``python synthetic_cohort.py --export-bids --export-parquet``: three forms of one cohort, read alike."""
    sc.main(["--out", str(tmp_path / "c"), "--n-per-class", "1", "--size", "16", "--num-workers", "1",
             "--no-progress", "--export-bids", str(tmp_path / "bids"), "--export-parquet", str(tmp_path / "pq")])
    assert "BIDS:" in capsys.readouterr().out
    expected = read_manifest(tmp_path / "c" / "manifest.csv")
    metadata = pd.read_csv(tmp_path / "c" / "metadata.csv", dtype=str)
    assert list(metadata.columns[:2]) == ["file_name", "subject_id"] and "image_path" not in metadata
    for source in (tmp_path / "bids", tmp_path / "pq"):
        frame, _ = read_corpus_source(source, cache_dir=str(tmp_path / "hf"))
        assert_same_records(frame, expected, same_paths=False)


# ---------------------------------------------------------------------------- train.py: every format end to end


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """train.py opens datasets sources with datasets' default cache: point it into the test's folder."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module")
def clinicadl_tsv(expected, tmp_path_factory):
    """ClinicaDL labels (participant, session, label under another name) pointing into the BIDS export."""
    path = tmp_path_factory.mktemp("clinicadl") / "labels.tsv"
    _tsv(path, [{"participant_id": f"sub-{r.subject_id}", "session_id": f"ses-{r.visit}", "DX": r.diagnosis}
                for r in expected.itertuples()])
    return path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny MedBLIP folder as train.py saves it (random weights: enough to compare inputs, cheaper than training)."""
    import torch

    import train
    from pipeline_medblip import save_medblip_for_hub

    torch.manual_seed(0)
    model, processor = train.build_model(train.ModelArguments(preset="tiny", target_spacing=[6.0, 6.0, 6.0],
                                                              preprocessing="none"))
    return save_medblip_for_hub(model.eval(), processor, tmp_path_factory.mktemp("model") / "tiny")


def _eval_only(model, source, out, *flags):
    """eval_results.json of ``train.py --eval_only`` on ``source``: (metrics, data_sources)."""
    import train

    train.main(["--eval_only", "--model_name_or_path", str(model), "--eval_manifest", str(source), "--output_dir",
                str(out), "--cache_dir", str(out / "cache"), "--num_proc", "1", "--report_to", "none",
                "--eval_batch_size", "16", "--max_new_tokens", "2", *flags])
    results = json.loads((out / "eval_results.json").read_text())
    return results, results.pop("data_sources")


def test_eval_only_gives_the_csv_numbers_for_every_format(model_folder, cohort, trap_tree, clinicadl_tsv, bids_root,
                                                          parquet_dir, hf_cache, tmp_path):
    """BIDS with traps, ClinicaDL TSV + BIDS root, Parquet with embedded NIfTI, niftifolder: the very numbers of
    the equivalent CSV manifest; only ``data_sources`` (format, source, what was left out) differs."""
    trap_root, trap_csv = trap_tree
    reference, [csv_source] = _eval_only(model_folder, cohort, tmp_path / "csv")
    assert csv_source["format"] == "manifest" and reference["likelihood"]["image_text"]["all"]["n"] == 12
    trap_reference, _ = _eval_only(model_folder, trap_csv, tmp_path / "trap_csv")
    assert trap_reference["likelihood"]["image_text"]["all"]["n"] == 9
    runs = {
        "bids": (trap_root, [], trap_reference),
        "clinicadl": (clinicadl_tsv, ["--data_root", str(bids_root), "--label_column", "DX"], reference),
        "parquet": (parquet_dir, [], reference),
        "niftifolder": (cohort.parent, ["--eval_split", "train"], reference),
    }
    reports = {}
    for fmt, (source, flags, want) in runs.items():
        results, [reports[fmt]] = _eval_only(model_folder, source, tmp_path / fmt, *flags)
        assert results == want, fmt
        assert reports[fmt]["format"] == fmt and reports[fmt]["source"] == str(Path(source).resolve())
    # what was left out travels with the numbers
    assert [Path(m["item"]).name for m in reports["bids"]["extra_runs"]] == ["sub-SYN00000_ses-bl_run-01_T1w.nii.gz"]
    assert len(reports["bids"]["missing_images"]) == 3 and reports["clinicadl"]["root"] == str(bids_root.resolve())
    assert reports["parquet"]["materialised"] == 12 and reports["niftifolder"]["splits"] == {"train": 12}


def test_build_data_reads_the_csv_corpus_from_every_format(cohort, expected, trap_tree, clinicadl_tsv, bids_root,
                                                           parquet_dir, hf_cache, monkeypatch):
    """train.build_data (the training corpus, patches aside) from each format equals the one from the CSV."""
    import contextlib
    import types

    import train

    monkeypatch.setattr(train, "build_cache", lambda dataset, *args, **kwargs: dataset)  # records, not patches
    accelerator = types.SimpleNamespace(main_process_first=contextlib.nullcontext)

    def corpus(source, holdout=("site_B",), **flags):
        data_args = train.DataArguments(manifests=[str(source)], holdout_datasets=list(holdout), val_fraction=0.25,
                                        test_fraction=0.25, **flags)
        cached = train.build_data(data_args, None, accelerator)[-1]
        return {split: _sorted(dataset.to_pandas()) for split, dataset in cached.items()}

    def assert_same(got, want, same_paths):
        assert set(got) == set(want)
        for split in want:
            columns = [c for c in want[split].columns if same_paths or c != "image_path"]
            pd.testing.assert_frame_equal(got[split][columns], want[split][columns], obj=split)

    reference = corpus(cohort)
    assert set(reference) == {"train", "validation", "test", "zeroshot"} and len(reference["zeroshot"]) == 6
    assert sum(len(split) for split in reference.values()) == 12
    assert_same(corpus(parquet_dir), reference, same_paths=False)  # images materialised from bytes
    assert_same(corpus(cohort.parent), reference, same_paths=True)  # niftifolder: the very same files
    assert_same(corpus(clinicadl_tsv, data_root=str(bids_root), label_column="DX"), reference, same_paths=False)
    trap_root, trap_csv = trap_tree
    assert_same(corpus(trap_root, holdout=()), corpus(trap_csv, holdout=()), same_paths=True)
    every_run = corpus(trap_root, holdout=(), bids_runs="all")
    assert sum(len(split) for split in every_run.values()) == 10  # --bids_runs all: both runs of SYN00000 bl


def test_train_flags_for_corpus_sources():
    """--data_root (alias --caps_directory), --column_map as JSON (never evaluated), --bids_runs choices."""
    import train

    _, data_args, _ = train.parse_arguments(["--caps_directory", "caps", "--label_column", "DX", "--column_map",
                                             '{"PTEDUCAT": "education", "MMSE": "mmse"}', "--bids_runs", "first"])
    assert data_args.source_options() == {"root": "caps", "image_column": None, "label_column": "DX",
                                          "column_map": {"PTEDUCAT": "education", "MMSE": "mmse"}, "runs": "first"}
    with pytest.raises(ValueError, match=r"--column_map must be a JSON object .* got '__import__\(\"os\"\)'"):
        train.parse_arguments(["--column_map", '__import__("os")'])
    with pytest.raises(ValueError, match=r"--column_map must map source column names .* got \['education'\]"):
        train.parse_arguments(["--column_map", '["education"]'])
    with pytest.raises(ValueError, match=r"column_map: 'DX' -> 'label': target must be one of"):
        train.parse_arguments(["--column_map", '{"DX": "label"}'])
    with pytest.raises(SystemExit):
        train.parse_arguments(["--bids_runs", "best"])
    with pytest.raises(ValueError, match=r"split='test' \(--eval_split\) applies to datasets sources; a manifest"):
        read_corpus_source(REPO_ROOT / "missing.csv", split="test")  # said before any file is read


def test_reading_manifests_and_bids_imports_no_torch_datasets_or_nibabel(cohort, bids_root):
    """The format readers are lazy: a manifest or a BIDS tree is read with pandas alone (datasets only for datasets
    sources), so data tools stay light and medblip_data never pulls in transformers."""
    script = (
        "import sys\n"
        "import medblip_data.formats, medblip_data.bids, medblip_data.hf_datasets, medblip_data.records\n"
        f"frame, _ = medblip_data.formats.read_corpus_source({str(cohort)!r})\n"
        f"bids, _ = medblip_data.formats.read_corpus_source({str(bids_root)!r})\n"
        "assert len(frame) == len(bids) == 12\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'nibabel') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
