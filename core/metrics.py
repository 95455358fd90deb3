"""Classification metrics of a labelled set, and the paper's Table 2 built from them.

The paper this project reproduces reported plain accuracy under the name "balanced accuracy".
Here both are always computed together and named apart, so that cannot happen again:

* ``balanced_accuracy`` is the mean per-class recall over the classes PRESENT in ``y_true``
  (scikit-learn's ``balanced_accuracy_score``): a class with no true samples has no recall,
  so it is left out rather than counted as 0. It is the official ISIC 2018 Task 3 metric.
* ``accuracy`` is the fraction of samples predicted correctly; on HAM10000 (about 67% NV) a
  model that mostly says NV scores well on it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from core.names import CLASSES


def _validate(y_true, probs, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    c = len(classes)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of integer labels, got shape {y.shape}")
    if p.shape != (y.size, c):
        raise ValueError(f"probs must have shape (N, C) = ({y.size}, {c}) to match y_true and "
                         f"{c} classes, got {p.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
        y = y.astype(np.int64)
    bad = (y < 0) | (y >= c)
    if bad.any():
        raise ValueError(f"y_true has labels outside 0..{c - 1} (e.g. {y[bad][0]}); "
                         f"labels index into classes={tuple(classes)}")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or inf")
    sums = p.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-2):
        raise ValueError(f"probs rows must sum to 1 (row {int(np.argmax(np.abs(sums - 1)))} sums to "
                         f"{sums[np.argmax(np.abs(sums - 1))]:.4f}); apply softmax to logits first")
    return y, p


def _mean_or_none(values: list) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES) -> dict:
    """All evaluation numbers of one labelled set as a JSON-serialisable dict.

    Per-class precision, recall and f1 of a class absent from ``y_true`` are None (its false
    alarms still show in the confusion matrix column); a present class that is never predicted
    gets precision 0. ``macro_f1``, like ``balanced_accuracy``, averages over present classes.
    ROC-AUC is one-vs-rest on the class probability, None where the class has no positives or
    no negatives; ``roc_auc_macro`` is the mean of the defined ones.
    """
    y, p = _validate(y_true, probs, classes)
    labels = list(range(len(classes)))
    y_pred = p.argmax(axis=1)

    with warnings.catch_warnings():
        # sklearn warns when y_pred holds classes absent from y_true; that is expected here
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=labels, zero_division=0)

    per_class = {}
    for i, name in enumerate(classes):
        present = support[i] > 0
        positives = y == i
        auc = float(roc_auc_score(positives, p[:, i])) if present and not positives.all() else None
        per_class[name] = {
            "precision": float(precision[i]) if present else None,
            "recall": float(recall[i]) if present else None,
            "f1": float(f1[i]) if present else None,
            "support": int(support[i]),
            "roc_auc": auc,
        }

    cm = confusion_matrix(y, y_pred, labels=labels)
    rows = cm.sum(axis=1, keepdims=True)
    cm_norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    return {
        "classes": list(classes),
        "num_samples": int(y.size),
        "balanced_accuracy": float(balanced),
        "accuracy": float(accuracy_score(y, y_pred)),
        "macro_f1": _mean_or_none([m["f1"] for m in per_class.values()]),
        "roc_auc_macro": _mean_or_none([m["roc_auc"] for m in per_class.values()]),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": cm_norm.tolist(),
    }


def report_frame(metrics: dict) -> pd.DataFrame:
    """The paper's Table 2: one row per class, then "macro avg" and "weighted avg".

    Averages run over the classes present in the data, so "macro avg" recall equals balanced
    accuracy and "weighted avg" recall equals accuracy. Both headline numbers are also kept in
    ``frame.attrs["balanced_accuracy"]`` and ``frame.attrs["accuracy"]``.
    """
    cols = ["precision", "recall", "f1", "support", "roc_auc"]
    frame = pd.DataFrame.from_dict(metrics["per_class"], orient="index")[cols].astype(
        {"precision": float, "recall": float, "f1": float, "support": int, "roc_auc": float})
    present = frame[frame["support"] > 0]
    weights = present["support"] / present["support"].sum()
    score_cols = ["precision", "recall", "f1", "roc_auc"]
    macro = present[score_cols].mean()  # skips NaN: an undefined ROC-AUC does not count
    auc_defined = present["roc_auc"].notna()
    weighted = (present[score_cols].mul(weights, axis=0)).sum()
    weighted["roc_auc"] = (np.average(present.loc[auc_defined, "roc_auc"], weights=weights[auc_defined])
                           if auc_defined.any() else np.nan)
    total = int(frame["support"].sum())
    frame.loc["macro avg"] = [*macro[["precision", "recall", "f1"]], total, macro["roc_auc"]]
    frame.loc["weighted avg"] = [*weighted[["precision", "recall", "f1"]], total, weighted["roc_auc"]]
    frame["support"] = frame["support"].astype(int)
    frame.attrs["balanced_accuracy"] = metrics["balanced_accuracy"]
    frame.attrs["accuracy"] = metrics["accuracy"]
    return frame


def report_text(metrics: dict) -> str:
    """Table 2 as aligned text, headed by both accuracies so neither is mistaken for the other."""
    head = f"balanced accuracy {metrics['balanced_accuracy']:.4f} | accuracy {metrics['accuracy']:.4f}"
    table = report_frame(metrics).to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")
    return f"{head}\n{table}\n"


def write_confusion_csv(metrics: dict, path, normalized: bool) -> Path:
    """Confusion matrix as CSV: header row of predicted class names, first column the true class."""
    key = "confusion_matrix_normalized" if normalized else "confusion_matrix"
    frame = pd.DataFrame(metrics[key], index=metrics["classes"], columns=metrics["classes"])
    frame.index.name = "true"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path)
    return path


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) for "mean +- std over seeds"; std is 0.0 for one value."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
