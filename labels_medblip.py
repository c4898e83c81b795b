"""MedBLIP's domain tables: the diagnostic classes, raw cohort labels, sex codes, missing values and health records.

The one source of this knowledge for every other file (config, processors, corpus readers, evaluation). Standard
library and numpy only, so reading a manifest never imports torch or transformers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


DIAGNOSIS_LABELS: tuple[str, ...] = ("CN", "MCI", "AD")
ID2LABEL: dict[int, str] = dict(enumerate(DIAGNOSIS_LABELS))
DEFAULT_ANSWER_TEXTS: dict[str, str] = {
    "CN": "Not demented", "MCI": "mild cognitive impairment (MCI)", "AD": "Dementia",
}
DEFAULT_PROMPT_TEMPLATE = "{image}{record} Question: {question} Answer:"
DEFAULT_QUESTION = "What will this subject be diagnosed with?"

# Raw cohort labels (lower-cased, whitespace collapsed) -> class. Explicit on purpose: no substring matching.
DIAGNOSIS_TABLE: dict[str, str] = {
    **dict.fromkeys(
        ["cn", "nc", "hc", "control", "controls", "healthy control", "normal", "normal control", "cognitively normal",
         "nondemented", "non-demented", "not demented", "smc", "cdr 0"],
        "CN",
    ),
    **dict.fromkeys(
        ["mci", "emci", "lmci", "mild cognitive impairment", "mild cognitive impairment (mci)", "cdr 0.5"], "MCI"
    ),
    **dict.fromkeys(
        ["ad", "dementia", "demented", "alzheimer's disease", "alzheimers disease", "alzheimer disease",
         "cdr 1", "cdr 2", "cdr 3"],
        "AD",
    ),
}
# Clinical Dementia Rating global score -> class (OASIS convention: 0 normal, 0.5 very mild / MCI-like, >= 1 AD).
CDR_TABLE: dict[float, str] = {0.0: "CN", 0.5: "MCI", 1.0: "AD", 2.0: "AD", 3.0: "AD"}
# Sex as written in cohort tables and records -> "F" / "M".
SEX_TABLE: dict[str, str] = {"f": "F", "female": "F", "woman": "F", "m": "M", "male": "M", "man": "M"}
SEX_WORDS: dict[str, str] = {"F": "female", "M": "male"}
RECORD_FIELDS: tuple[str, ...] = ("age", "sex", "education", "mmse", "cdr", "apoe4", "notes")
# What a processor shows the model unless told otherwise, and what folders saved before `record_fields` existed were
# trained on (train.py's default then): CDR defines the label in OASIS/NACC-style cohorts, notes are free text.
DEFAULT_RECORD_FIELDS: tuple[str, ...] = ("age", "sex", "education", "mmse", "apoe4")
# Valid values of the numeric record fields (inclusive); CDR takes only the CDR_TABLE values. Education is in years
# (NACC codes up to 36). A value outside is an error, never rendered as given.
RECORD_RANGES: dict[str, tuple[float, float]] = {
    "age": (0.0, 120.0), "education": (0.0, 40.0), "mmse": (0.0, 30.0), "apoe4": (0.0, 2.0),
}
MISSING_STRINGS: frozenset[str] = frozenset({"", "nan", "none", "na", "n/a"})


def normalize_text(text: str) -> str:
    """Lower-cased, surrounding whitespace stripped, inner whitespace collapsed."""
    return " ".join(text.strip().lower().split())


def is_missing(value: Any) -> bool:
    """True for None, NaN (any float type), pandas NA/NaT and blank or "nan"/"none"/"na"/"n/a" strings."""
    if value is None:
        return True
    if isinstance(value, str):
        return normalize_text(value) in MISSING_STRINGS
    try:
        return bool(value != value)  # NaN of any float type
    except (TypeError, ValueError):  # pandas.NA / NaT refuse bool(); anything else is a value
        return type(value).__name__ in ("NAType", "NaTType")


def to_number(value: Any, field: str) -> float:
    """`value` as a finite float. Raises ValueError naming `field` when it is not one (records must be valid)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"record field {field!r} must be a number, got {value!r}") from err
    if not math.isfinite(number):
        raise ValueError(f"record field {field!r} must be finite, got {value!r}")
    return number


def record_number(value: Any, field: str) -> float:
    """A numeric record field as a float, checked against its range (`RECORD_RANGES`, CDR in `CDR_TABLE`, APOE e4
    a whole count). Raises ValueError naming the field and the value otherwise."""
    number = to_number(value, field)
    if field == "cdr":
        if number not in CDR_TABLE:
            raise ValueError(f"record field 'cdr' must be one of 0, 0.5, 1, 2, 3, got {value!r}")
        return number
    low, high = RECORD_RANGES[field]
    if not low <= number <= high:
        raise ValueError(f"record field {field!r} must lie in {low:g}-{high:g}, got {value!r}")
    if field == "apoe4" and not number.is_integer():
        raise ValueError(f"record field 'apoe4' counts e4 alleles (0, 1 or 2), got {value!r}")
    return number


def check_record_fields(fields: Any) -> list[str]:
    """`fields` as a list of `RECORD_FIELDS` names (matched case-insensitively). Raises ValueError for a string, an
    unknown or a repeated name."""
    if isinstance(fields, str) or not isinstance(fields, (list, tuple)):
        raise ValueError(f"record_fields must be a list of field names out of {RECORD_FIELDS}, got {fields!r}")
    names = [str(name).strip().lower() for name in fields]
    unknown = [name for name in fields if str(name).strip().lower() not in RECORD_FIELDS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"record_fields must name distinct fields out of {RECORD_FIELDS}, got {list(fields)}")
    return names


def canonical_record(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Match a record's keys to `RECORD_FIELDS` case-insensitively ("AGE", "Mmse", " sex ").

    Returns `(values by field name, unknown keys as given)`. Raises ValueError when two keys name one field with
    values ("age" and "AGE"): which one is meant cannot be told.
    """
    values: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    unknown = []
    for key, value in record.items():
        name = key.strip().lower() if isinstance(key, str) else key
        if name not in RECORD_FIELDS:
            unknown.append(key)
        elif name in values and not (is_missing(value) or is_missing(values[name])):
            raise ValueError(f"the record gives field {name!r} twice, as {keys[name]!r} and {key!r}")
        elif name not in values or is_missing(values[name]):
            values[name], keys[name] = value, key
    return values, unknown


def number_or_none(value: Any, missing_codes: tuple[float, ...] = (-4.0,), low: float = -math.inf,
                   high: float = math.inf) -> float | None:
    """`value` as a float, or None when missing, non-numeric, a cohort missing code or outside [low, high].

    The lenient reading of cohort metadata tables, where such values mean "not recorded".
    """
    if is_missing(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number) or number in set(missing_codes) or not low <= number <= high:
        return None
    return number


def normalize_sex(value: Any, codes: dict[str, str] | None = None) -> str | None:
    """"F" / "M" from F/M/female/male/woman/man (any case), or from numeric `codes` such as {"1": "M", "2": "F"}.

    Missing values give None; anything else gives None too (callers that must not guess check for it).
    """
    if is_missing(value):
        return None
    text = normalize_text(str(value))
    if codes:
        key = text[:-2] if text.endswith(".0") else text
        if key in codes:
            return codes[key]
    return SEX_TABLE.get(text)


def normalize_diagnosis(raw: str | float | int) -> str:
    """Map a raw cohort label to "CN", "MCI" or "AD" through explicit tables.

    Accepted (case-insensitive, surrounding whitespace ignored): CN, NC, HC, control, normal, cognitively normal,
    Nondemented, SMC -> CN; MCI, EMCI, LMCI -> MCI; AD, Dementia, Demented, Alzheimer's disease -> AD;
    a CDR global score as a number (0, 0.5, 1, 2, 3) or a string "CDR 0.5". Cohort codes such as NACCUDSD are
    mapped by the corpus code before this function.

    Raises:
        ValueError: the label is not in the tables (the message names it), e.g. OASIS "Converted".
    """
    if isinstance(raw, (int, float, np.integer, np.floating)) and not isinstance(raw, bool):
        if float(raw) in CDR_TABLE:
            return CDR_TABLE[float(raw)]
        raise ValueError(f"unknown diagnosis label {raw!r}: a number is read as a CDR score (0, 0.5, 1, 2, 3)")
    if not isinstance(raw, str):
        raise ValueError(f"unknown diagnosis label {raw!r}: expected a string or a CDR score")
    key = normalize_text(raw)
    try:  # a CDR score read from a text column ("0.5")
        return CDR_TABLE[float(key)]
    except (ValueError, KeyError):
        pass
    if key.startswith("cdr "):
        try:
            key = f"cdr {float(key[4:]):g}"
        except ValueError:
            pass
    if key not in DIAGNOSIS_TABLE:
        raise ValueError(f"unknown diagnosis label {raw!r}; known labels: {sorted(set(DIAGNOSIS_TABLE))}")
    return DIAGNOSIS_TABLE[key]


def format_number(number: float) -> str:
    """74.0 -> "74", 0.5 -> "0.5"."""
    return f"{int(number)}" if float(number).is_integer() else f"{number:g}"


def render_record(record: dict[str, Any] | str | None, fields: Any = RECORD_FIELDS) -> str:
    """Render a structured health record as stable English text.

    Fields (all optional; keys matched case-insensitively): `age` (years, 0-120), `sex` ("F"/"female"/"M"/"male",
    any case), `education` (years, 0-40), `mmse` (0-30), `cdr` (0, 0.5, 1, 2 or 3), `apoe4` (number of e4 alleles,
    0-2), `notes` (free text, copied as is). Only the names in `fields` are rendered (a processor passes the fields
    its model was trained on). Missing values (None, NaN, empty) are left out, never written as "None"/"nan". Other
    keys (e.g. a diagnosis) are never rendered. A string record is used as is (stripped); None gives "".

    >>> render_record({"age": 74, "sex": "F", "education": 16, "mmse": 27, "apoe4": 1})
    'A 74-year-old female with 16 years of education. MMSE 27. APOE e4 alleles: 1.'

    Raises:
        ValueError: a rendered numeric field is not a number or outside its range (the message names the field and
            the value), `sex` is not in the table, or one field is given under two keys.
    """
    if record is None:
        return ""
    if isinstance(record, str):
        return record.strip()
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a dict, a string or None, got {type(record).__name__}")
    shown = check_record_fields(fields)
    values, _ = canonical_record(record)
    given = {key: value for key, value in values.items() if key in shown and not is_missing(value)}
    sentences = []
    age = f"{format_number(record_number(given['age'], 'age'))}-year-old" if "age" in given else None
    sex = None
    if "sex" in given:
        code = normalize_sex(given["sex"])
        if code is None:
            raise ValueError(f"record field 'sex' must be one of {sorted(SEX_TABLE)}, got {given['sex']!r}")
        sex = SEX_WORDS[code]
    education = None
    if "education" in given:
        years = record_number(given["education"], "education")
        education = f"{format_number(years)} year{'' if years == 1 else 's'} of education"
    if age or sex or education:
        noun = " ".join(part for part in (age, sex or "subject") if part)
        article = "An" if noun[0] in "8" or noun.startswith(("11-", "18-", "11.", "18.")) else "A"
        sentences.append(f"{article} {noun}" + (f" with {education}" if education else "") + ".")
    for field, text in (("mmse", "MMSE {}."), ("cdr", "CDR {}."), ("apoe4", "APOE e4 alleles: {}.")):
        if field in given:
            sentences.append(text.format(format_number(record_number(given[field], field))))
    if "notes" in given:
        sentences.append(str(given["notes"]).strip())
    return " ".join(sentences)


__all__ = [
    "CDR_TABLE",
    "DEFAULT_ANSWER_TEXTS",
    "DEFAULT_PROMPT_TEMPLATE",
    "DEFAULT_QUESTION",
    "DEFAULT_RECORD_FIELDS",
    "DIAGNOSIS_LABELS",
    "DIAGNOSIS_TABLE",
    "ID2LABEL",
    "RECORD_FIELDS",
    "RECORD_RANGES",
    "SEX_TABLE",
    "canonical_record",
    "check_record_fields",
    "is_missing",
    "normalize_diagnosis",
    "normalize_sex",
    "number_or_none",
    "record_number",
    "render_record",
    "to_number",
]
