"""MedBLIP evaluation: predictions in three input modes and two decoders, metrics, baselines, plots, model card.

    from medblip_eval import evaluate_dataset, load_metric, write_evaluation
"""

from .predict import (
    DECODERS,
    MODES,
    class_labels,
    dropped_scans,
    evaluate_dataset,
    load_metric,
    predict,
    reference_baselines,
)
from .report import plot_confusion_matrices, plot_learning_curves, write_evaluation, write_model_card


__all__ = [
    "DECODERS",
    "MODES",
    "class_labels",
    "dropped_scans",
    "evaluate_dataset",
    "load_metric",
    "plot_confusion_matrices",
    "plot_learning_curves",
    "predict",
    "reference_baselines",
    "write_evaluation",
    "write_model_card",
]
