"""GLUE's metric for each task, and the majority-class baseline to read scores against.

    >>> import numpy as np
    >>> from read_cache.tasks.metrics import score
    >>> from read_cache.tasks.specs import get_task
    >>> score(get_task("mrpc"), np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1]))
    {'metric': 'mean_f1_accuracy', 'score': 0.775, 'f1': 0.8, 'accuracy': 0.75}

Scores are fractions (0.8766), not the paper's percentages (87.66). Every value is a plain Python
float so results serialise to JSON as they are.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from read_cache.tasks.specs import Metric, TaskSpec


def score(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, str | float]:
    """GLUE's metric for `task`: {"metric": name, "score": value, plus its components}.

    `predictions` are class ids for classification tasks and real scores for STS-B.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or predictions.size == 0:
        raise ValueError(f"need two equal-length, non-empty 1-d arrays, got {predictions.shape} and {labels.shape}")
    if task.metric is Metric.MATTHEWS:
        return {"metric": "matthews_corrcoef", "score": float(skm.matthews_corrcoef(labels, predictions))}
    if task.metric is Metric.ACCURACY:
        return {"metric": "accuracy", "score": float(skm.accuracy_score(labels, predictions))}
    if task.metric is Metric.F1_ACCURACY:
        # F1 of the positive class (id 1: equivalent / duplicate), as GLUE reports it.
        f1 = float(skm.f1_score(labels, predictions, zero_division=0.0))
        accuracy = float(skm.accuracy_score(labels, predictions))
        return {"metric": "mean_f1_accuracy", "score": (f1 + accuracy) / 2, "f1": f1, "accuracy": accuracy}
    if task.metric is Metric.PEARSON_SPEARMAN:
        pearson, spearman = _correlation(predictions, labels)
        return {
            "metric": "mean_pearson_spearman",
            "score": (pearson + spearman) / 2,
            "pearson": pearson,
            "spearman": spearman,
        }
    raise ValueError(f"no metric implementation for {task.metric!r}")


def _correlation(predictions: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman; 0.0 when either side is constant (scipy would give NaN and a warning)."""
    predictions, labels = predictions.astype(np.float64), labels.astype(np.float64)
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0, 0.0
    pearson = stats.pearsonr(predictions, labels).statistic
    spearman = stats.spearmanr(predictions, labels).statistic
    return float(pearson), float(spearman)


def majority_baseline(
    task: TaskSpec, train_labels: np.ndarray, test_labels: np.ndarray
) -> dict[str, str | float | int]:
    """The score of always predicting the most frequent training class (STS-B: the training mean).

    A trained model must beat this to have learned anything; on CoLA (Matthews) and STS-B
    (correlations) a constant prediction scores 0 by construction.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if train_labels.size == 0:
        raise ValueError("majority_baseline needs at least one training label")
    if task.is_regression:
        prediction: float = float(train_labels.astype(np.float64).mean())
        result = score(task, np.full(test_labels.shape, prediction, dtype=np.float64), test_labels)
        return {**result, "baseline": "train_mean", "prediction": prediction}
    counts = np.bincount(train_labels.astype(np.int64), minlength=task.num_labels)
    majority = int(counts.argmax())  # ties go to the lowest id, deterministically
    result = score(task, np.full(test_labels.shape, majority, dtype=np.int64), test_labels)
    return {**result, "baseline": "majority_class", "prediction": majority, "label": task.label_words[majority]}
