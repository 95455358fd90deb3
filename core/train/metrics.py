"""Classification metrics of a labelled set, the paper's Table 2 built from them, the decision
rule tuned to balanced accuracy, and the kNN monitor of frozen features.

The paper this project reproduces reported plain accuracy under the name "balanced accuracy".
Here both are always computed together and named apart, so that cannot happen again:

* ``balanced_accuracy`` is the mean per-class recall over the classes PRESENT in ``y_true``
  (scikit-learn's ``balanced_accuracy_score``): a class with no true samples has no recall,
  so it is left out rather than counted as 0. It is the official ISIC 2018 Task 3 metric.
* ``accuracy`` is the fraction of samples predicted correctly; on HAM10000 (about 67% NV) a
  model that mostly says NV scores well on it.

Self-supervised pretraining has no classifier to validate, so a monitored epoch scores its
backbone's features instead: each val image votes among its nearest train images. The vote is
class-balanced by default, since a plain vote on HAM10000 mostly says NV whatever the features.

Every number comes from the confusion matrix (and ROC-AUC from ranks) in a few lines of numpy,
equal to scikit-learn's to rounding (tests/train/test_metrics.py checks it against sklearn):
importing ``sklearn.metrics`` costs 0.6 s, a tenth of ``skinclr evaluate`` on 20 images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from skinclr.names import CLASSES


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


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    flat = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _mean_recall(cm: np.ndarray) -> float:
    support = cm.sum(axis=1)
    present = support > 0
    return float((cm.diagonal()[present] / support[present]).mean())


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in `y_true`."""
    return _mean_recall(confusion(y_true, y_pred, num_classes))


def roc_auc(positives: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC-AUC as the Mann-Whitney statistic: the chance a positive outscores a negative,
    ties counting half (average ranks)."""
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based, in sorted order
    pos = np.asarray(positives, dtype=bool)[order]
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES) -> dict:
    """All evaluation numbers of one labelled set as a JSON-serialisable dict.

    Per-class precision, recall and f1 of a class absent from ``y_true`` are None (its false
    alarms still show in the confusion matrix column); a present class that is never predicted
    gets precision 0. ``macro_f1``, like ``balanced_accuracy``, averages over present classes.
    ROC-AUC is one-vs-rest on the class probability, None where the class has no positives or
    no negatives; ``roc_auc_macro`` is the mean of the defined ones.
    """
    y, p = _validate(y_true, probs, classes)
    y_pred = p.argmax(axis=1)
    cm = confusion(y, y_pred, len(classes))
    hits, support, predicted = cm.diagonal(), cm.sum(axis=1), cm.sum(axis=0)

    per_class = {}
    for i, name in enumerate(classes):
        present = support[i] > 0
        positives = y == i
        per_class[name] = {
            "precision": float(hits[i] / predicted[i] if predicted[i] else 0.0) if present else None,
            "recall": float(hits[i] / support[i]) if present else None,
            "f1": float(2 * hits[i] / (support[i] + predicted[i])) if present else None,
            "support": int(support[i]),
            "roc_auc": roc_auc(positives, p[:, i]) if present and not positives.all() else None,
        }

    rows = support[:, None]
    cm_norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    return {
        "classes": list(classes),
        "num_samples": int(y.size),
        "balanced_accuracy": _mean_recall(cm),
        "accuracy": float(hits.sum() / y.size),
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
    frame.index.name = "class"  # a named first column: the MLflow UI's table preview shows it
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


def apply_offsets(probs: np.ndarray, offsets) -> np.ndarray:
    """The decision rule: per-class offsets added to the log-probabilities, renormalised."""
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)) + np.asarray(offsets, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_offsets(y_true: np.ndarray, probs: np.ndarray, steps=(1.0, 0.3, 0.1, 0.03), rounds: int = 4) -> np.ndarray:
    """Per-class logit offsets that raise balanced accuracy on these predictions.

    Balanced accuracy is the mean of per-class recalls, so a model trained on HAM10000's priors
    says NV too often for it. The search starts from the prior correction (minus the log of each
    class's mean predicted probability) and moves one offset at a time while balanced accuracy
    on `y_true` rises, in ever smaller steps. Fit on predictions no test number comes from
    (val, or out-of-fold); zeros when nothing beats the plain argmax."""
    y = np.asarray(y_true)
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))

    def score(offsets: np.ndarray) -> float:
        return balanced_accuracy(y, (logp + offsets).argmax(1), logp.shape[1])

    plain = np.zeros(logp.shape[1])
    offsets = -np.log(np.clip(np.exp(logp).mean(0), 1e-12, None))
    best = score(offsets)
    for step in steps:
        for _ in range(rounds):
            moved = False
            for c in range(len(offsets)):
                for delta in (-step, step):
                    trial = offsets.copy()
                    trial[c] += delta
                    value = score(trial)
                    if value > best + 1e-12:
                        offsets, best, moved = trial, value, True
            if not moved:
                break
    return plain if score(plain) >= best else offsets - offsets.mean()


def fit_rule(y_true: np.ndarray, probs: np.ndarray, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, float]:
    """The decision rule a model keeps, and the balanced accuracy to expect of it on new images.
    Offsets fitted on a val side fit its noise too (judged there, they always look better), so the
    expectation is cross-fitted: `folds` class-stratified parts, each decided by offsets fitted on the
    others. Kept (fitted on all) only where that beats the plain argmax; else zeros."""
    y, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    plain = balanced_accuracy(y, probs.argmax(1), k)
    part, rng = np.empty(len(y), dtype=int), np.random.default_rng(seed)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        part[members] = np.arange(len(members)) % folds
    decided = probs.argmax(1)
    logp = np.log(np.clip(probs, 1e-12, None))
    for f in range(folds):
        held = part == f
        if held.any() and (~held).any():
            decided[held] = (logp[held] + fit_offsets(y[~held], probs[~held])).argmax(1)
    expected = balanced_accuracy(y, decided, k)
    if expected <= plain:
        return np.zeros(k), plain
    return fit_offsets(y, probs), expected


_CHUNK = 1024  # queries per similarity block: 1024 x 10k floats is 40 MB


def _as_tensor(x, dtype: torch.dtype) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().to(dtype)


@torch.no_grad()
def knn_balanced_accuracy(bank, bank_labels, query, query_labels, k: int = 20, temperature: float = 0.07,
                          balanced: bool = True, num_classes: int = 7) -> float:
    """Balanced accuracy of a cosine kNN classifier: frozen features scored without training a head.

    Each query takes the ``k`` most similar bank features (k is capped at the bank size) and
    weights their votes by exp(sim / temperature). With ``balanced`` each class's vote is divided
    by its frequency in the bank: on HAM10000 a plain vote mostly says NV, whatever the features.
    """
    b = _as_tensor(bank, torch.float32)
    q = _as_tensor(query, torch.float32).to(b.device)
    bl = _as_tensor(bank_labels, torch.int64).to(b.device)
    ql = _as_tensor(query_labels, torch.int64).cpu()
    if b.ndim != 2 or q.ndim != 2 or b.shape[1] != q.shape[1]:
        raise ValueError(f"bank and query must be 2-D features of one width, got {tuple(b.shape)} and {tuple(q.shape)}")
    if bl.shape != (b.shape[0],) or ql.shape != (q.shape[0],):
        raise ValueError(f"need one label per row: bank {tuple(b.shape)} vs labels {tuple(bl.shape)}, "
                         f"query {tuple(q.shape)} vs labels {tuple(ql.shape)}")
    if b.shape[0] == 0 or q.shape[0] == 0:
        raise ValueError("bank and query must each hold at least one feature")
    for name, lab in (("bank_labels", bl), ("query_labels", ql)):
        if lab.min() < 0 or lab.max() >= num_classes:
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}; got {int(lab.min())}..{int(lab.max())}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")

    b = F.normalize(b, dim=1)
    k = min(k, b.shape[0])
    freq = torch.bincount(bl, minlength=num_classes).float() / bl.numel()
    preds = []
    for start in range(0, q.shape[0], _CHUNK):
        sim = F.normalize(q[start:start + _CHUNK], dim=1) @ b.T
        top_sim, top_idx = sim.topk(k, dim=1)
        # shifting by the best similarity rescales each query's votes alike and cannot overflow
        weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)
        votes = torch.zeros(sim.shape[0], num_classes, device=b.device).scatter_add_(1, bl[top_idx], weights)
        if balanced:
            votes = votes / freq.clamp_min(1e-12)  # classes absent from the bank have no votes to scale
        preds.append(votes.argmax(dim=1).cpu())
    return balanced_accuracy(ql.numpy(), torch.cat(preds).numpy(), num_classes)
