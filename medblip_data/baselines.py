"""Reference baselines that MedBLIP is compared with (logistic regression, scikit-learn).

Three feature sets, each standardised then fed to a multinomial logistic regression:

- ``image_oracle``: ground-truth ``ventricles_ml``, ``hippocampi_ml`` (what a perfect volumetric reader sees);
- ``image_oracle_age``: the same plus ``age`` (volumes are age-dependent);
- ``text_floor``: the health-record fields ``age``, ``sex``, ``education``, ``mmse``, ``apoe4``;
- ``image_and_text``: both;
- ``text_with_cdr``: the text floor plus the CDR global score. The CDR is part of the clinical definition of
  the classes (CN 0, MCI 0.5, AD >= 0.5), so a health record that shows it nearly gives the answer away;
  this row shows how much.

Trained on the training rows (the non-held-out sites), scored on the test rows (held-out sites only).
Missing numeric values are imputed with the training median.

Usage::

    python -m medblip_data.baselines --manifest data/synthetic/manifest.csv --holdout site_D site_E
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from labels_medblip import DIAGNOSIS_LABELS, normalize_diagnosis

from .manifest import read_manifest


logger = logging.getLogger(__name__)

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "image_oracle": ("ventricles_ml", "hippocampi_ml"),
    "image_oracle_age": ("ventricles_ml", "hippocampi_ml", "age"),
    "text_floor": ("age", "sex", "education", "mmse", "apoe4"),
    "image_and_text": ("ventricles_ml", "hippocampi_ml", "age", "sex", "education", "mmse", "apoe4"),
    "text_with_cdr": ("age", "sex", "education", "mmse", "apoe4", "cdr"),
}


def _frame(rows: Sequence[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(list(rows))
    if frame.empty:
        raise ValueError("no rows to fit or score")
    frame["diagnosis"] = [normalize_diagnosis(d) for d in frame["diagnosis"]]
    return frame


def _features(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Numeric matrix (N, F); sex becomes 1 for "F", 0 for "M"."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"rows lack feature column(s) {missing}")
    out = []
    for column in columns:
        values = frame[column]
        if column == "sex":
            values = values.map({"F": 1.0, "M": 0.0})
        out.append(pd.to_numeric(values, errors="coerce").to_numpy(dtype=float))
    return np.stack(out, axis=1)


def fit_and_score(train: pd.DataFrame, test: pd.DataFrame, columns: Sequence[str]) -> dict[str, float]:
    """Balanced accuracy, accuracy and macro-F1 of a standardised logistic regression on ``columns``."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(_features(train, columns), train["diagnosis"])
    predicted = model.predict(_features(test, columns))
    truth = test["diagnosis"]
    return {"balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
            "accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", labels=list(DIAGNOSIS_LABELS),
                                       zero_division=0))}


def reference_baselines(train_rows: Sequence[Mapping[str, Any]] | pd.DataFrame,
                        test_rows: Sequence[Mapping[str, Any]] | pd.DataFrame) -> dict[str, dict[str, float]]:
    """Scores of every feature set in ``FEATURE_SETS``: ``{name: {balanced_accuracy, accuracy, macro_f1}}``.

    Rows are manifest rows (dicts or a DataFrame) with ``diagnosis`` and the feature columns; labels are
    normalized to CN/MCI/AD. A feature set whose columns are absent from the rows is skipped (logged).
    """
    train, test = _frame(train_rows), _frame(test_rows)
    results: dict[str, dict[str, float]] = {}
    for name, columns in FEATURE_SETS.items():
        if not set(columns) <= set(train.columns) & set(test.columns):
            logger.warning("skipping baseline %s: rows lack %s", name, sorted(set(columns) - set(train.columns)))
            continue
        results[name] = fit_and_score(train, test, columns)
    return results


def format_results(results: Mapping[str, Mapping[str, float]]) -> str:
    """A small fixed-width table of the baseline scores."""
    lines = [f"{'features':<18}{'bal.acc':>9}{'acc':>8}{'macroF1':>9}"]
    for name, m in results.items():
        lines.append(f"{name:<18}{m['balanced_accuracy']:>9.3f}{m['accuracy']:>8.3f}{m['macro_f1']:>9.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Reference baselines on held-out datasets (sites).")
    parser.add_argument("--manifest", required=True, nargs="+", help="manifest file(s) (CSV/JSONL)")
    parser.add_argument("--holdout", required=True, nargs="+", help="datasets used only for evaluation")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    frame = pd.concat([read_manifest(m) for m in args.manifest], ignore_index=True)
    unknown = sorted(set(args.holdout) - set(frame["dataset"]))
    if unknown:
        parser.error(f"held-out dataset(s) {unknown} not in the manifest; have {sorted(set(frame['dataset']))}")
    test_mask = frame["dataset"].isin(args.holdout)
    results = reference_baselines(frame[~test_mask], frame[test_mask])
    print(f"train: {int((~test_mask).sum())} scans; held-out {args.holdout}: {int(test_mask.sum())} scans")
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
