"""CN/MCI/AD diagnosis metrics for MedBLIP: accuracy, balanced accuracy, macro-F1, one-vs-rest AUROC, ECE, confusion.

Load offline with `evaluate.load("metrics/medblip_diagnosis")` (a local folder; publishable to the Hub as a metric).
"""

import datasets
import evaluate
import numpy as np
from sklearn import metrics as skm


_DESCRIPTION = """
Diagnosis metrics over integer class ids (0 = CN, 1 = MCI, 2 = AD by default). `predictions` may contain -1 for an
answer that could not be mapped to a class: it counts as wrong and is reported in `unmappable`. With `scores`
(one row of class probabilities per example) AUROC (macro one-vs-rest) and the expected calibration error are added.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids, -1 for unmappable answers.
    references (`list[int]`): true class ids.
    scores (`list[list[float]]`, optional): class probabilities per example, rows summing to 1.
    num_classes (`int`, defaults to 3).
    ece_bins (`int`, defaults to 10): equal-width confidence bins of the calibration error.
Returns:
    dict with accuracy, balanced_accuracy, macro_f1, auroc (None without scores or with a class absent), ece and nll
    (mean negative log-probability of the true class; both None without scores), n, unmappable, confusion_matrix
    (rows = truth, columns = prediction; unmappable ones left out).
Examples:
    >>> metric = evaluate.load("metrics/medblip_diagnosis")
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 2, 1])["accuracy"]
    0.75
"""


def expected_calibration_error(scores: np.ndarray, references: np.ndarray, bins: int = 10) -> float:
    """Weighted mean |accuracy - confidence| over equal-width bins of the top-class probability."""
    confidence = scores.max(axis=1)
    correct = scores.argmax(axis=1) == references
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


class MedblipDiagnosis(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, scores=None, num_classes: int = 3, ece_bins: int = 10):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        labels = list(range(num_classes))
        mapped = predictions >= 0
        # an unmappable answer is a wrong answer: give it a class no reference has
        scored_predictions = np.where(mapped, predictions, num_classes)
        result = {
            "accuracy": float(skm.accuracy_score(references, scored_predictions)),
            "balanced_accuracy": float(skm.recall_score(
                references, scored_predictions, labels=sorted(set(references.tolist())), average="macro",
                zero_division=0)),
            "macro_f1": float(skm.f1_score(references, scored_predictions, labels=labels, average="macro",
                                           zero_division=0)),
            "auroc": None,
            "ece": None,
            "nll": None,
            "n": int(len(references)),
            "unmappable": int((~mapped).sum()),
            "confusion_matrix": np.zeros((num_classes, num_classes), dtype=int).tolist() if not mapped.any()
            else skm.confusion_matrix(references[mapped], predictions[mapped], labels=labels).tolist(),
        }
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            if set(references.tolist()) == set(labels):
                result["auroc"] = float(skm.roc_auc_score(references, scores, multi_class="ovr", labels=labels))
            result["ece"] = expected_calibration_error(scores, references, ece_bins)
            true_class = np.clip(scores[np.arange(len(references)), references], np.finfo(np.float64).eps, None)
            result["nll"] = float(-np.log(true_class).mean())
        return result
