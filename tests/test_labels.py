"""The domain tables: raw cohort labels -> CN/MCI/AD, and health records rendered as text."""


import numpy as np
import pytest

from labels_medblip import DEFAULT_RECORD_FIELDS, check_record_fields, normalize_diagnosis, render_record


RECORD = {"age": 74, "sex": "F", "education": 16, "mmse": 27, "apoe4": 1}


def test_render_record_full_and_partial():
    assert render_record(RECORD) == "A 74-year-old female with 16 years of education. MMSE 27. APOE e4 alleles: 1."
    full = {**RECORD, "sex": "male", "cdr": 0.5, "notes": "Reports word-finding difficulty.", "age": 81.5}
    assert render_record(full) == (
        "An 81.5-year-old male with 16 years of education. MMSE 27. CDR 0.5. APOE e4 alleles: 1. "
        "Reports word-finding difficulty."
    )
    assert render_record({"sex": "Female"}) == "A female."
    assert render_record({"education": 1}) == "A subject with 1 year of education."
    assert render_record({"mmse": 30.0}) == "MMSE 30."
    assert render_record(None) == "" and render_record({}) == "" and render_record("  free text ") == "free text"


@pytest.mark.parametrize(
    "missing", [None, float("nan"), np.nan, "", "nan", "NaN", np.float32("nan"), pytest.param("pd.NA", id="pd.NA")]
)
def test_missing_fields_are_left_out(missing):
    if missing == "pd.NA":
        missing = pytest.importorskip("pandas").NA
    record = {key: missing for key in ("age", "sex", "education", "mmse", "cdr", "apoe4", "notes")}
    record["mmse"] = 29
    text = render_record(record)
    assert text == "MMSE 29."
    assert "None" not in text and "nan" not in text.lower()


def test_render_record_rejects_bad_values_and_ignores_other_keys():
    with pytest.raises(ValueError, match="'sex'"):
        render_record({"sex": "unknown"})
    with pytest.raises(ValueError, match="'age' must be a number"):
        render_record({"age": "old"})
    assert render_record({"age": 70, "diagnosis": "AD", "DX": "Dementia"}) == "A 70-year-old subject."


@pytest.mark.parametrize(
    "raw, label",
    [
        ("CN", "CN"), ("nc", "CN"), ("HC", "CN"), ("Control", "CN"), ("normal", "CN"), ("Nondemented", "CN"),
        ("SMC", "CN"), (" cognitively  normal ", "CN"), (0, "CN"), (0.0, "CN"), ("CDR 0", "CN"),
        ("MCI", "MCI"), ("EMCI", "MCI"), ("lmci", "MCI"), (0.5, "MCI"), ("CDR 0.5", "MCI"), ("cdr 0.50", "MCI"),
        ("AD", "AD"), ("Dementia", "AD"), ("Demented", "AD"), (1, "AD"), (2.0, "AD"), (3, "AD"), ("CDR 2", "AD"),
    ],
)
def test_normalize_diagnosis_table(raw, label):
    assert normalize_diagnosis(raw) == label


@pytest.mark.parametrize("raw", ["Converted", "ADHD", "MCI due to AD", "CDR 0.7", 0.7, None, True, "CDR x"])
def test_normalize_diagnosis_rejects_unknown_labels(raw):
    with pytest.raises(ValueError, match="unknown diagnosis label"):
        normalize_diagnosis(raw)


# ---------------------------------------------------------------------------------------------------------------
# issue 12, case 9: records altered silently


def test_records_altered_silently_keys_match_case_insensitively():
    mixed = {"AGE": 74, "Sex": "F", " Education ": 16, "MMSE": 27, "Apoe4": 1}
    assert render_record(mixed) == render_record(RECORD)
    one_given = {"age": 70, "AGE": None, "Mmse": float("nan"), "mmse": 28}  # a missing duplicate is no conflict
    assert render_record(one_given) == "A 70-year-old subject. MMSE 28."
    with pytest.raises(ValueError, match="the record gives field 'age' twice, as 'age' and 'AGE'"):
        render_record({"age": 70, "AGE": 71})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("age", -5, "record field 'age' must lie in 0-120, got -5"),
        ("age", 121, "record field 'age' must lie in 0-120, got 121"),
        ("mmse", 99, "record field 'mmse' must lie in 0-30, got 99"),
        ("mmse", "-1", "record field 'mmse' must lie in 0-30, got '-1'"),
        ("apoe4", 7, "record field 'apoe4' must lie in 0-2, got 7"),
        ("apoe4", 1.5, r"record field 'apoe4' counts e4 alleles \(0, 1 or 2\), got 1.5"),
        ("cdr", 0.7, r"record field 'cdr' must be one of 0, 0.5, 1, 2, 3, got 0.7"),
        ("cdr", 4, r"record field 'cdr' must be one of 0, 0.5, 1, 2, 3, got 4"),
        ("education", 41, "record field 'education' must lie in 0-40, got 41"),
        ("education", -2, "record field 'education' must lie in 0-40, got -2"),
    ],
)
def test_records_altered_silently_out_of_range_values_raise(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        render_record({field: value})


def test_records_altered_silently_range_limits_are_valid():
    limits = {"age": 120, "education": 0, "mmse": 30, "cdr": 3, "apoe4": 2}
    assert render_record(limits) == (
        "A 120-year-old subject with 0 years of education. MMSE 30. CDR 3. APOE e4 alleles: 2."
    )
    assert render_record({"age": 0, "mmse": 0, "cdr": 0.5, "apoe4": 0}) == (
        "A 0-year-old subject. MMSE 0. CDR 0.5. APOE e4 alleles: 0."
    )


def test_render_record_shows_only_the_given_fields():
    full = {**RECORD, "CDR": 1, "notes": "Lost in a familiar place."}
    assert render_record(full, DEFAULT_RECORD_FIELDS) == render_record(RECORD)
    assert render_record(full, ["cdr", "Notes"]) == "CDR 1. Lost in a familiar place."
    assert render_record({"mmse": 99}, ["age"]) == ""  # a field not shown is not checked either
    assert check_record_fields(("AGE", "sex")) == ["age", "sex"]
    for bad in ("age", ["age", "diagnosis"], ["age", "Age"]):
        with pytest.raises(ValueError, match="record_fields must"):
            check_record_fields(bad)
