"""The domain tables: raw cohort labels -> CN/MCI/AD, and health records rendered as text."""


import numpy as np
import pytest

from labels_medblip import normalize_diagnosis, render_record


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
