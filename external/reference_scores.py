"""Reference scores of a cohort manifest: logistic regression on true volumes, on record fields, and on both.

These are the floors and ceilings a model's image-only, text-only and image+text scores are read against: the
"image" reference sees the ground-truth ``ventricles_ml``, ``hippocampi_ml`` and ``age`` (what a perfect
segmentation would give), the "text" reference the record fields ``age, sex, education, mmse, apoe4``.

Usage::

    python -m external.reference_scores data/external/manifest.csv
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np


CLASSES: tuple[str, ...] = ("CN", "MCI", "AD")
FEATURES: dict[str, tuple[str, ...]] = {
    "image": ("ventricles_ml", "hippocampi_ml", "age"),
    "text": ("age", "sex", "education", "mmse", "apoe4"),
    "both": ("ventricles_ml", "hippocampi_ml", "age", "sex", "education", "mmse", "apoe4"),
}


def _feature_matrix(rows: list[dict], columns: Sequence[str]) -> np.ndarray:
    return np.array([[float(row[c] == "M") if c == "sex" else float(row[c]) for c in columns] for row in rows])


def reference_scores(manifest: str | Path, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Mean balanced accuracy of a standardised logistic regression under stratified ``folds``-fold
    cross-validation (shuffled with ``seed``), for each feature set of ``FEATURES``.

    Raises:
        ValueError: if a class has fewer than ``folds`` subjects.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with Path(manifest).open(newline="") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([CLASSES.index(row["diagnosis"]) for row in rows])
    counts = np.bincount(labels, minlength=len(CLASSES))
    if counts.min() < folds:
        raise ValueError(f"every class needs at least folds={folds} subjects, got {dict(zip(CLASSES, counts))}")
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return {name: float(cross_val_score(model, _feature_matrix(rows, columns), labels, cv=splitter,
                                        scoring="balanced_accuracy").mean())
            for name, columns in FEATURES.items()}


def class_summary(manifest: str | Path) -> dict[str, dict[str, tuple[float, float]]]:
    """Per class, (mean, sd) of ``ventricles_ml``, ``hippocampi_ml``, ``age`` and ``mmse``."""
    with Path(manifest).open(newline="") as f:
        rows = list(csv.DictReader(f))
    summary = {}
    for diagnosis in CLASSES:
        members = [row for row in rows if row["diagnosis"] == diagnosis]
        summary[diagnosis] = {column: (float(np.mean([float(r[column]) for r in members])),
                                       float(np.std([float(r[column]) for r in members])))
                              for column in ("ventricles_ml", "hippocampi_ml", "age", "mmse")}
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", help="manifest.csv of a cohort")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold shuffling")
    args = parser.parse_args(argv)
    for diagnosis, stats in class_summary(args.manifest).items():
        print(diagnosis, "  ".join(f"{column} {mean:.2f} ± {sd:.2f}" for column, (mean, sd) in stats.items()))
    for name, score in reference_scores(args.manifest, args.folds, args.seed).items():
        print(f"balanced accuracy, logistic regression on {name} ({', '.join(FEATURES[name])}): {score:.3f}")


if __name__ == "__main__":
    main()
