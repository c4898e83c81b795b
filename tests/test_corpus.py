"""Manifests, subject-level splits, label tables, cohort adapters and reference baselines."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT
from datasets import DatasetDict

from medblip_data import (
    ManifestError,
    adapters,
    check_subject_disjoint,
    load_corpus,
    normalize_diagnosis,
    read_manifest,
)
from medblip_data.baselines import reference_baselines
from medblip_data.build_manifest import main as build_manifest_cli


def write_manifest(path, n_subjects=40, visits=3, datasets=("A", "B", "C"), seed=0):
    """A manifest of several cohorts, several visits per subject (files need not exist for splitting)."""
    rng = np.random.default_rng(seed)
    rows = []
    labels = ["CN", "MCI", "Dementia", "NC", "EMCI", "AD"]
    for d in datasets:
        for s in range(n_subjects):
            label = labels[s % len(labels)]
            for v in range(int(rng.integers(1, visits + 1))):
                rows.append({"subject_id": f"S{s:03d}", "image_path": f"img/{d}_{s}_{v}.nii.gz", "diagnosis": label,
                             "dataset": d, "visit": f"m{12 * v:02d}", "age": 70 + s % 10, "sex": "female"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------------- manifests and splits


def test_read_manifest_resolves_paths_and_fills_optional(tmp_path):
    path = write_manifest(tmp_path / "m.csv", n_subjects=3)
    frame = read_manifest(path)
    assert set(frame.columns) >= {"subject_id", "image_path", "diagnosis", "dataset", "mmse", "notes"}
    assert all(p.startswith(str(tmp_path)) for p in frame["image_path"])
    assert frame["sex"].eq("F").all() and frame["mmse"].isna().all()


def test_read_manifest_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"subject_id": i, "image_path": f"/abs/{i}.nii", "diagnosis": "CN",
                                          "dataset": "X", "mmse": 29}) for i in range(3)))
    frame = read_manifest(path)
    assert list(frame["subject_id"]) == ["0", "1", "2"] and frame["image_path"][0] == "/abs/0.nii"


def test_manifest_errors_name_file_and_column(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"subject_id": ["a"], "image_path": ["x.nii"], "dataset": ["D"]}).to_csv(bad, index=False)
    with pytest.raises(ManifestError, match=r"bad\.csv.*diagnosis"):
        read_manifest(bad)
    pd.DataFrame({"subject_id": ["a", None], "image_path": ["x", "y"], "diagnosis": ["CN", "AD"],
                  "dataset": ["D", "D"]}).to_csv(bad, index=False)
    with pytest.raises(ManifestError, match=r"'subject_id' is empty at rows \[3\]"):
        read_manifest(bad)
    pd.DataFrame({"subject_id": ["a"], "image_path": ["x"], "diagnosis": ["CN"], "dataset": ["D"],
                  "mmse": ["high"]}).to_csv(bad, index=False)
    with pytest.raises(ManifestError, match="'mmse' has non-numeric"):
        read_manifest(bad)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "missing.csv")


@pytest.mark.parametrize("column, values, message", [
    ("mmse", [29, 99, 28, -1], r"column 'mmse' is out of range at rows \[3, 5\] \(first: record field 'mmse' must lie "
                               r"in 0-30, got 99\.0\)"),
    ("apoe4", [0, 1, 7, 2], r"column 'apoe4' is out of range at rows \[4\] \(first: .* got 7\.0\)"),
    ("cdr", [0, 0.5, 0.7, None], r"column 'cdr' is out of range at rows \[4\] \(first: record field 'cdr' must be one"),
    ("age", [-5, 70, 71, 72], r"column 'age' is out of range at rows \[2\]"),
    ("sex", ["F", "m", "x", None], r"column 'sex' is neither F/M nor female/male at rows \[4\]"),
])
def test_records_altered_silently_manifest_values_out_of_range_name_the_rows(tmp_path, column, values, message):
    """Issue 12, case 9: a record value no health record may hold is refused when the manifest is read."""
    path = tmp_path / "m.csv"
    pd.DataFrame({"subject_id": list("abcd"), "image_path": list("wxyz"), "diagnosis": ["CN"] * 4,
                  "dataset": ["D"] * 4, column: values}).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=rf"m\.csv: {message}"):
        read_manifest(path)


def test_unknown_label_names_file_and_subject(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"subject_id": ["s1"], "image_path": ["x"], "diagnosis": ["Converted"],
                  "dataset": ["OASIS-2"]}).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=r"m\.csv.*'s1'.*Converted"):
        load_corpus([path])


def test_split_is_disjoint_by_subject_with_many_visits(tmp_path):
    corpus = load_corpus([write_manifest(tmp_path / "m.csv")], val_fraction=0.2, test_fraction=0.2, seed=1)
    assert set(corpus) == {"train", "validation", "test"}
    check_subject_disjoint(corpus)
    keys = {s: {(d, i) for d, i in zip(corpus[s]["dataset"], corpus[s]["subject_id"])} for s in corpus}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    assert sum(len(v) for v in keys.values()) == 120
    assert 15 <= len(keys["test"]) <= 33 and 15 <= len(keys["validation"]) <= 33
    for split in corpus.values():  # every class in every split (stratified)
        assert set(split["diagnosis"]) == {"CN", "MCI", "AD"}
    report = corpus.split_report
    assert report.query("`class` == 'all'")["scans"].sum() == sum(len(d) for d in corpus.values())


def test_split_is_deterministic_and_seeded(tmp_path):
    path = write_manifest(tmp_path / "m.csv")
    a, b = load_corpus([path], seed=3), load_corpus([path], seed=3)
    c = load_corpus([path], seed=4)
    assert a["test"]["image_path"] == b["test"]["image_path"]
    assert a["test"]["image_path"] != c["test"]["image_path"]


def test_holdout_datasets_only_in_zeroshot(tmp_path):
    corpus = load_corpus([write_manifest(tmp_path / "m.csv")], holdout_datasets=["C"])
    assert set(corpus["zeroshot"]["dataset"]) == {"C"}
    for split in ("train", "validation", "test"):
        assert "C" not in set(corpus[split]["dataset"])
    with pytest.raises(ValueError, match="not in the manifests"):
        load_corpus([tmp_path / "m.csv"], holdout_datasets=["Z"])


def test_same_subject_id_in_two_datasets_is_two_people(tmp_path):
    corpus = load_corpus([write_manifest(tmp_path / "m.csv", datasets=("A", "B"))], seed=0)
    check_subject_disjoint(corpus)  # no false alarm: ids are namespaced by dataset


def test_check_subject_disjoint_names_leak(tmp_path):
    corpus = load_corpus([write_manifest(tmp_path / "m.csv")])
    leaked = corpus["test"][0]
    corpus["train"] = corpus["train"].add_item(leaked)
    message = (f"subject leak: dataset '{leaked['dataset']}', subject '{leaked['subject_id']}' has scans in both "
               "'train' and 'test'")
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_subject_disjoint(corpus)


def manifest_rows(rows: list[dict], path) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def row(subject, image, diagnosis="CN", dataset="D", **extra) -> dict:
    return {"subject_id": subject, "image_path": image, "diagnosis": diagnosis, "dataset": dataset, **extra}


def test_exact_duplicate_rows_are_refused(tmp_path):
    rows = [row("s1", "a.nii", age=70), row("s2", "b.nii"), row("s1", "a.nii", age=70)]
    path, image = manifest_rows(rows, tmp_path / "m.csv"), (tmp_path / "a.nii").resolve()
    with pytest.raises(ManifestError, match=re.escape(
            f"{path}: 1 image file(s) listed more than once: duplicate rows 2, 4 (image {image})")):
        read_manifest(path)


def test_same_image_under_two_diagnoses_is_refused(tmp_path):
    path = manifest_rows([row("s1", "a.nii", "CN"), row("s1", "a.nii", "AD")], tmp_path / "m.csv")
    with pytest.raises(ManifestError, match=re.escape(
            f"image {(tmp_path / 'a.nii').resolve()} under 2 diagnoses ['AD', 'CN'] (rows 2, 3)")):
        read_manifest(path)


def test_same_image_under_two_subject_ids_is_refused(tmp_path):
    """The same file under two subjects would let one scan sit in train and test and pass the subject check;
    spellings of one file (`x/../a.nii`, a symlink) are the same file."""
    (tmp_path / "x").mkdir()
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "link.nii").symlink_to(tmp_path / "a.nii")
    path, image = manifest_rows([row("s1", "a.nii"), row("s2", "x/../a.nii")], tmp_path / "m.csv"), tmp_path / "a.nii"
    with pytest.raises(ManifestError, match=re.escape(
            f"image {image.resolve()} under 2 subject ids [('D', 's1'), ('D', 's2')] (rows 2, 3): "
            "one scan, one person")):
        read_manifest(path)
    # across manifests, through a symlink: rows are named by file and row
    first = manifest_rows([row("s1", "a.nii"), row("s3", "c.nii")], tmp_path / "first.csv")
    second = manifest_rows([row("s2", str(tmp_path / "link.nii"), dataset="E")], tmp_path / "second.csv")
    with pytest.raises(ManifestError, match=re.escape(
            f"image {image.resolve()} under 2 subject ids [('D', 's1'), ('E', 's2')] "
            "(rows first.csv:2, second.csv:2)")):
        load_corpus([first, second])


def test_subject_keys_that_collide_when_joined_are_two_people(tmp_path):
    """`a/b` + `c` and `a` + `b/c` joined with '/' are both 'a/b/c': keys are pairs, so these are two subjects."""
    from medblip_data.manifest import subject_key

    assert subject_key("a/b", "c") != subject_key("a", "b/c")
    rows = [row("c", f"x{i}.nii", dataset="a/b", visit=f"v{i}") for i in range(2)]
    rows += [row("b/c", f"y{i}.nii", dataset="a", visit=f"v{i}") for i in range(2)]
    corpus = load_corpus([manifest_rows(rows, tmp_path / "m.csv")], val_fraction=0.0, test_fraction=0.0)
    assert corpus.split_report.query("split == 'train' and `class` == 'all'")["subjects"].item() == 2
    # the two people in two splits is no leak
    two_splits = DatasetDict({"train": corpus["train"].filter(lambda r: r["dataset"] == "a/b"),
                              "test": corpus["train"].filter(lambda r: r["dataset"] == "a")})
    check_subject_disjoint(two_splits)


def test_leak_check_compares_resolved_image_paths(tmp_path):
    corpus = load_corpus([write_manifest(tmp_path / "m.csv")])
    moved = corpus["test"][0]
    image = Path(moved["image_path"])
    # the test scan again, under another subject and spelled through '..', in train
    spelled = str(image.parent / ".." / image.parent.name / image.name)
    corpus["train"] = corpus["train"].add_item({**moved, "subject_id": "someone-else", "image_path": spelled})
    with pytest.raises(ValueError, match=re.escape(f"image leak: {image} is in both 'train' and 'test'")):
        check_subject_disjoint(corpus)


def test_raw_label_kept(tmp_path):
    corpus = load_corpus([write_manifest(tmp_path / "m.csv")])
    pairs = set(zip(corpus["train"]["diagnosis_raw"], corpus["train"]["diagnosis"]))
    assert ("Dementia", "AD") in pairs and ("EMCI", "MCI") in pairs and ("NC", "CN") in pairs


@pytest.mark.parametrize("raw, label", [
    ("CN", "CN"), ("SMC", "CN"), ("EMCI", "MCI"), ("LMCI", "MCI"), ("Dementia", "AD"), ("AD", "AD"),  # ADNI
    ("CDR 0", "CN"), ("CDR 0.5", "MCI"), ("CDR 1", "AD"), ("CDR 2", "AD"), (0.5, "MCI"),  # OASIS (CDR)
    ("Nondemented", "CN"), ("Demented", "AD"),  # OASIS-2 group
    ("normal", "CN"), ("MCI", "MCI"), ("dementia", "AD"),  # NACC (via adapter)
    ("HC", "CN"), (" ad ", "AD"),  # MIRIAD
])
def test_label_table(raw, label):
    assert normalize_diagnosis(raw) == label


@pytest.mark.parametrize("raw", ["Converted", "impaired", "", None, "CDR 0.7", "MCIAD"])
def test_label_table_rejects(raw):
    with pytest.raises(ValueError):
        normalize_diagnosis(raw)


# ---------------------------------------------------------------------------- adapters


def touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_adni_adapter(tmp_path):
    table = pd.DataFrame({
        "RID": [295, 295, 413, 999], "PTID": ["002_S_0295", "002_S_0295", "002_S_0413", "011_S_0999"],
        "VISCODE": ["bl", "m12", "bl", "bl"], "EXAMDATE": ["2006-04-18", "2007-04-20", "2006-05-02", "2006-01-01"],
        "DX_bl": ["CN", "CN", "LMCI", "AD"], "DX": ["CN", None, None, "Dementia"], "AGE": [84.8, 84.8, 76.3, 70.0],
        "Years_bl": [0.0, 1.0, 0.0, 0.0], "PTGENDER": ["Male", "Male", "Female", "Female"],
        "PTEDUCAT": [18, 18, 16, 12], "APOE4": [1, 1, 0, 2], "MMSE": [28, 29, 27, 21], "CDRSB": [0, 0, 1.5, 5]})
    table.to_csv(tmp_path / "ADNIMERGE.csv", index=False)
    images = tmp_path / "ADNI"
    touch(images, "002_S_0295/MPRAGE/2006-04-18_08_20_30.0/S13408/ADNI_002_S_0295_MR_MPRAGE_br_raw_S13408_I45108.nii",
          "002_S_0295/MPRAGE/2007-04-20_10_00_00.0/S2/ADNI_002_S_0295_MR_MPRAGE_br_raw_S2_I2.nii",
          "002_S_0413/MPRAGE/2006-05-02_09_00_00.0/S3/ADNI_002_S_0413_MR_MPRAGE_S3_I3.nii.gz",
          "123_S_4567/MPRAGE/x/ADNI_123_S_4567_MR.nii")
    report = adapters.build_manifest("adni", [tmp_path / "ADNIMERGE.csv"], images)
    rows = {(r["subject_id"], r["visit"]): r for r in report.rows}
    assert set(rows) == {("002_S_0295", "bl"), ("002_S_0413", "bl")}
    assert rows[("002_S_0413", "bl")]["diagnosis"] == "LMCI" and rows[("002_S_0413", "bl")]["sex"] == "F"
    assert rows[("002_S_0295", "bl")]["age"] == 84.8 and rows[("002_S_0295", "bl")]["apoe4"] == 1
    assert report.excluded == {"no diagnosis (DX/DX_bl)": 1}  # m12 without DX
    assert sorted(why for _, why in report.unmatched_images) == [
        "no subject in path", "visit excluded: no diagnosis (DX/DX_bl)"]
    assert report.unmatched_records == [("011_S_0999", "bl")]


def test_oasis1_adapter(tmp_path):
    table = pd.DataFrame({"ID": ["OAS1_0001_MR1", "OAS1_0001_MR2", "OAS1_0002_MR1", "OAS1_0003_MR1"],
                          "M/F": ["F", "F", "M", "F"], "Hand": ["R"] * 4, "Age": [74, 74, 55, 23],
                          "Educ": [2, 2, 4, None], "SES": [3, 3, 1, None], "MMSE": [29, 29, 26, None],
                          "CDR": [0, 0, 0.5, None], "eTIV": [1344] * 4, "nWBV": [0.74] * 4, "ASF": [1.3] * 4})
    table.to_csv(tmp_path / "oasis_cross-sectional.csv", index=False)
    touch(tmp_path / "disc1", "OAS1_0001_MR1/RAW/OAS1_0001_MR1_mpr-1_anon.img",
          "OAS1_0001_MR1/RAW/OAS1_0001_MR1_mpr-2_anon.img", "OAS1_0001_MR1/RAW/OAS1_0001_MR1_mpr-1_anon.hdr",
          "OAS1_0002_MR1/PROCESSED/OAS1_0002_MR1_mpr_n4_anon_111_t88_gfc.img")
    report = adapters.build_manifest("oasis1", [tmp_path / "oasis_cross-sectional.csv"], tmp_path / "disc1")
    assert len(report.rows) == 3  # two variants of OAS1_0001_MR1 (one subject), one of OAS1_0002
    assert {r["subject_id"] for r in report.rows} == {"OAS1_0001", "OAS1_0002"}
    by_subject = {r["subject_id"]: r for r in report.rows}
    assert by_subject["OAS1_0002"]["diagnosis"] == "CDR 0.5" and normalize_diagnosis("CDR 0.5") == "MCI"
    assert by_subject["OAS1_0001"]["education"] == 12.0 and by_subject["OAS1_0001"]["visit"] == "MR1"
    assert report.excluded == {"no CDR (unlabelled)": 1}
    assert report.unmatched_records == [("OAS1_0001", "MR2")]


def test_oasis2_adapter(tmp_path):
    table = pd.DataFrame({"Subject ID": ["OAS2_0001", "OAS2_0001", "OAS2_0002"],
                          "MRI ID": ["OAS2_0001_MR1", "OAS2_0001_MR2", "OAS2_0002_MR1"],
                          "Group": ["Converted", "Converted", "Demented"], "Visit": [1, 2, 1],
                          "MR Delay": [0, 457, 0], "M/F": ["M", "M", "F"], "Age": [87, 88, 75],
                          "EDUC": [14, 14, 12], "SES": [2, 2, None], "MMSE": [27, 30, 23], "CDR": [0, 0.5, 1]})
    table.to_csv(tmp_path / "oasis_longitudinal.csv", index=False)
    touch(tmp_path / "imgs", "OAS2_0001_MR1/RAW/mpr-1.nifti.img", "OAS2_0001_MR2/RAW/mpr-1.nifti.img",
          "OAS2_0002_MR1/RAW/mpr-1.nifti.img", "OAS2_0001_MR10/RAW/mpr-1.nifti.img")
    report = adapters.build_manifest("oasis2", [tmp_path / "oasis_longitudinal.csv"], tmp_path / "imgs")
    labels = {(r["subject_id"], r["visit"]): normalize_diagnosis(r["diagnosis"]) for r in report.rows}
    assert labels == {("OAS2_0001", "MR1"): "CN", ("OAS2_0001", "MR2"): "MCI", ("OAS2_0002", "MR1"): "AD"}
    assert report.unmatched_images == [(str((tmp_path / "imgs/OAS2_0001_MR10/RAW/mpr-1.nifti.img").resolve()),
                                        "no visit in path")]


def test_nacc_adapter_label_policy_and_missing_codes():
    table = pd.DataFrame({"NACCID": ["NACC000001", "NACC000002", "NACC000003", "NACC000004"],
                          "NACCVNUM": [1, 1, 2, 1], "NACCUDSD": [1, 2, 3, 4], "NACCAGE": [88, 70, 75, 80],
                          "SEX": [1, 2, 2, 1], "EDUC": [16, 12, 99, 14], "NACCMMSE": [29, 28, -4, 95]})
    result = adapters.nacc_records(table.astype(str))
    rows = {r["subject_id"]: r for r in result.records if not r.get("_excluded")}
    assert set(rows) == {"NACC000001", "NACC000003", "NACC000004"}
    assert result.excluded == {"NACCUDSD 2 (impaired, not MCI)": 1}
    assert [normalize_diagnosis(rows[k]["diagnosis"]) for k in sorted(rows)] == ["CN", "MCI", "AD"]
    assert rows["NACC000001"]["age"] == 88.0 and rows["NACC000001"]["sex"] == "M"
    assert rows["NACC000003"]["education"] is None and rows["NACC000003"]["mmse"] is None
    assert rows["NACC000004"]["mmse"] is None and rows["NACC000003"]["visit"] == "v2"


def test_aibl_adapter_merges_tables(tmp_path):
    pd.DataFrame({"RID": [1, 1, 2], "VISCODE": ["bl", "m18", "bl"], "DXCURREN": [1, 2, 3],
                  "EXAMDATE": ["2008-10-01", "2010-04-01", "2009-01-01"]}).to_csv(tmp_path / "dx.csv", index=False)
    pd.DataFrame({"RID": [1, 2], "PTGENDER": [2, 1], "PTDOB": ["/1932", "/1940"]}).to_csv(tmp_path / "demo.csv",
                                                                                        index=False)
    pd.DataFrame({"RID": [1, 1, 2], "VISCODE": ["bl", "m18", "bl"], "MMSCORE": [29, 27, -4]}).to_csv(
        tmp_path / "mmse.csv", index=False)
    touch(tmp_path / "AIBL", "1/MPRAGE/2008-10-01_10_00/S1/AIBL_1_MR_MPRAGE_S1_I1.nii",
          "1/MPRAGE/2010-04-01_10_00/S2/AIBL_1_MR_MPRAGE_S2_I2.nii", "2/MPRAGE/2009-01-01/S3/AIBL_2_MR_S3_I3.nii")
    report = adapters.build_manifest("aibl", [tmp_path / "dx.csv", tmp_path / "demo.csv", tmp_path / "mmse.csv"],
                                     tmp_path / "AIBL")
    rows = {(r["subject_id"], r["visit"]): r for r in report.rows}
    assert set(rows) == {("1", "bl"), ("1", "m18"), ("2", "bl")}
    assert rows[("1", "bl")]["sex"] == "F" and rows[("1", "bl")]["age"] == 76.0 and rows[("1", "m18")]["mmse"] == 27
    assert rows[("2", "bl")]["diagnosis"] == "AD" and rows[("2", "bl")]["mmse"] is None


def test_miriad_from_file_names(tmp_path):
    touch(tmp_path / "miriad", "miriad_188_AD_M_01_MR_1.nii", "miriad_188_AD_M_01_MR_2.nii",
          "miriad_189_HC_F_03_MR_1.nii.gz", "readme_scan.nii")
    report = adapters.build_manifest("miriad", [], tmp_path / "miriad")
    assert len(report.rows) == 3 and len(report.unmatched_images) == 1
    assert {(r["subject_id"], r["diagnosis"], r["sex"], r["visit"]) for r in report.rows} == {
        ("188", "AD", "M", "01"), ("189", "HC", "F", "03")}


def test_adapter_names_missing_columns():
    with pytest.raises(ValueError, match=r"ADNI metadata lacks column\(s\) \['PTID'"):
        adapters.adni_records(pd.DataFrame({"RID": [1]}))


def test_path_tokens_match_whole_parts():
    tokens = adapters.path_tokens("OAS2_0001_MR10/RAW/mpr-1.nifti.img")
    assert "oas2_0001_mr10" in tokens and "oas2_0001" in tokens and "oas2_0001_mr1" not in tokens


def test_build_manifest_cli_then_load(tmp_path, capsys):
    touch(tmp_path / "miriad", *[f"miriad_{200 + s}_{'AD' if s % 2 else 'HC'}_F_0{v}_MR_1.nii"
                                 for s in range(10) for v in (1, 2)], "notes.nii")
    out = tmp_path / "out" / "miriad.csv"
    assert build_manifest_cli(["--cohort", "miriad", "--images", str(tmp_path / "miriad"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "20 scans of 10 subjects" in printed and "unmatched images: 1" in printed
    assert json.loads((tmp_path / "out" / "miriad.csv.report.json").read_text())["unmatched_images"][0]["path"]
    frame = read_manifest(out)
    assert frame["image_path"].str.startswith(str(tmp_path / "miriad")).all()
    corpus = load_corpus([out], val_fraction=0.2, test_fraction=0.2)
    check_subject_disjoint(corpus)
    assert sum(len(d) for d in corpus.values()) == 20


# ---------------------------------------------------------------------------- baselines


def test_reference_baselines_on_separable_toy():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(300):
        c = i % 3
        rows.append({"diagnosis": ["CN", "MCI", "AD"][c], "ventricles_ml": 20 + 8 * c + rng.normal(0, 2),
                     "hippocampi_ml": 15 - 2 * c + rng.normal(0, 0.5), "age": rng.normal(73, 6),
                     "sex": "F" if rng.random() < 0.5 else "M", "education": 16.0, "mmse": rng.normal(29, 1),
                     "apoe4": 0, "dataset": "A" if i < 200 else "B"})
    frame = pd.DataFrame(rows)
    results = reference_baselines(frame[frame.dataset == "A"], frame[frame.dataset == "B"].to_dict("records"))
    assert set(results) == {"image_oracle", "image_oracle_age", "text_floor", "image_and_text"}  # no cdr column
    assert results["image_oracle"]["balanced_accuracy"] > 0.9
    assert results["text_floor"]["balanced_accuracy"] < 0.6
    assert set(results["image_and_text"]) == {"balanced_accuracy", "accuracy", "macro_f1"}


def test_reading_a_manifest_imports_neither_torch_nor_transformers(tmp_path):
    """The corpus layer depends on the label tables only: reading a manifest (and importing every medblip_data
    module that does not process volumes) never pulls in torch or transformers."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,image_path,diagnosis,dataset\ns1,a.nii.gz,CN,X\n")
    script = (
        "import sys\n"
        "import medblip_data, medblip_data.adapters, medblip_data.baselines, medblip_data.build_manifest\n"
        f"frame = medblip_data.read_manifest({str(manifest)!r})\n"
        "assert len(frame) == 1\n"
        "print(sorted(m for m in ('torch', 'transformers', 'nibabel') if m in sys.modules))\n"
        "import medblip_data.augment, medblip_data.cache, medblip_data.collate\n"
        "print('transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "False"]
