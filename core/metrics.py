"""Classification metrics, the kNN feature monitor, and the paper's tables and figures.

The paper this project reproduces reported plain accuracy under the name "balanced accuracy".
Here both are always computed together and named apart, so that cannot happen again:

* ``balanced_accuracy`` is the mean per-class recall over the classes PRESENT in ``y_true``
  (scikit-learn's ``balanced_accuracy_score``): a class with no true samples has no recall,
  so it is left out rather than counted as 0. It is the official ISIC 2018 Task 3 metric.
* ``accuracy`` is the fraction of samples predicted correctly; on HAM10000 (about 67% NV) a
  model that mostly says NV scores well on it.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot: no global
figure state, no GUI backend, nothing to close, safe in worker processes.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from core.names import CLASSES

_KNN_CHUNK = 1024  # queries per similarity block: 1024 x 10k floats is 40 MB


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


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_confusion_matrix(metrics: dict, path, title: str = "") -> Path:
    """Figure 3: counts and row-normalized confusion matrices side by side in one PNG."""
    classes = metrics["classes"]
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    panels = [("counts", np.asarray(metrics["confusion_matrix"]), "{:d}"),
              ("row-normalized (recall on the diagonal)", np.asarray(metrics["confusion_matrix_normalized"]), "{:.2f}")]
    for ax, (name, matrix, fmt) in zip(fig.subplots(1, 2), panels):
        vmax = matrix.max() if name == "counts" else 1.0
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(vmax, 1e-12))
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                    color="white" if value > 0.5 * vmax else "black")
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=45, ha="right")
        ax.set_yticks(ticks, classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _plot_curves(history: list[dict], series: list[tuple[str, str, str]], path, ylabel: str,
                 ylim: tuple[float, float] | None = None) -> Path:
    """Line per metric key over epochs; records without a key (or with None/NaN) are skipped."""
    for i, record in enumerate(history):
        if "epoch" not in record:
            raise ValueError(f"history record {i} has no 'epoch' key; each record needs one ({record})")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for key, label, colour in series:
        points = [(r["epoch"], r[key]) for r in history
                  if r.get(key) is not None and math.isfinite(float(r[key]))]
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o", markersize=3, label=label, color=colour)
            drawn += 1
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no {' / '.join(k for k, _, _ in series)} recorded", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_loss_curves(history: list[dict], path) -> Path:
    """Figure 1: train and validation loss per epoch."""
    return _plot_curves(history, [("train_loss", "train loss", "tab:blue"),
                                  ("val_loss", "val loss", "tab:orange")], path, "loss")


def plot_accuracy_curves(history: list[dict], path) -> Path:
    """Figure 2: validation accuracy and balanced accuracy per epoch, on one [0, 1] axis."""
    return _plot_curves(history, [("val_accuracy", "val accuracy", "tab:gray"),
                                  ("val_balanced_accuracy", "val balanced accuracy", "tab:red")],
                        path, "score", ylim=(0.0, 1.0))


def _scale_axis(values: pd.Series) -> tuple[np.ndarray, list[tuple[float, str]], str]:
    """Map one parameter column to [0, 1]: positions, (position, tick label) pairs, scale name.

    Numeric columns (MLflow stores params as strings, so those are parsed) are min-max scaled,
    on log10 when all values are positive and span more than one decade; anything else is
    categorical, one evenly spaced tick per sorted category.
    """
    numeric = None if values.dtype == bool else pd.to_numeric(values, errors="coerce")
    if numeric is not None and numeric.notna().sum() == values.notna().sum() and numeric.notna().any():
        v = numeric.to_numpy(dtype=np.float64)
        lo, hi = np.nanmin(v), np.nanmax(v)
        log = lo > 0 and hi / lo > 10
        t = np.log10(v) if log else v
        t_lo, t_hi = np.nanmin(t), np.nanmax(t)
        span = t_hi - t_lo
        pos = (t - t_lo) / span if span > 0 else np.full_like(t, 0.5)
        ticks = [(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")] if span > 0 else [(0.5, f"{lo:.3g}")]
        return pos, ticks, "log" if log else "linear"
    labels = values.astype(str).where(values.notna(), "None")
    cats = sorted(labels.unique())
    slots = np.linspace(0, 1, len(cats)) if len(cats) > 1 else np.array([0.5])
    where = dict(zip(cats, slots))
    return labels.map(where).to_numpy(dtype=np.float64), list(zip(slots, cats)), "categorical"


def plot_parallel_coordinates(frame: pd.DataFrame, metric: str, path, params: list[str] | None = None) -> Path:
    """One line per trial across its parameters, coloured by ``metric``: how a sweep's knobs relate to its score.

    ``params`` defaults to every other column that varies across trials. Trials without a
    value for ``metric`` (failed or still running) are left out; the best trials are drawn on top.
    """
    if metric not in frame.columns:
        raise ValueError(f"metric {metric!r} is not a column of the frame; columns: {list(frame.columns)}")
    if params is None:
        params = [c for c in frame.columns if c != metric and frame[c].nunique(dropna=False) > 1]
    missing = [p for p in params if p not in frame.columns]
    if missing:
        raise ValueError(f"params {missing} are not columns of the frame; columns: {list(frame.columns)}")
    if not params:
        raise ValueError("no parameter varies across the trials; pass params=[...] to choose axes")
    scores = pd.to_numeric(frame[metric], errors="coerce")
    trials = frame.loc[scores.notna()].assign(**{metric: scores[scores.notna()]}).sort_values(metric)
    if trials.empty:
        raise ValueError(f"no trial has a numeric value for {metric!r}")

    axes = [_scale_axis(trials[p]) for p in params]
    ys = np.column_stack([pos for pos, _, _ in axes])
    x = np.arange(len(params))
    norm = Normalize(trials[metric].min(), trials[metric].max())
    cmap = colormaps["viridis"]

    fig = Figure(figsize=(max(6.0, 1.8 * len(params) + 2), 5), layout="constrained")
    ax = fig.subplots()
    for y, score in zip(ys, trials[metric]):
        ax.plot(x, y, color=cmap(norm(score)), alpha=0.8, linewidth=1.5)
    for i, (_, ticks, scale) in enumerate(axes):
        ax.axvline(i, color="black", linewidth=0.8)
        for pos, text in ticks:
            ax.text(i + 0.03, pos, text, fontsize=8, va="center")
    ax.set_xticks(x, [f"{p}\n({scale})" if scale != "linear" else p for p, (_, _, scale) in zip(params, axes)])
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, len(params) - 0.6 if len(params) > 1 else 0.8)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    ax.set_title(f"{len(trials)} trials")
    return _save(fig, path)


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
    for start in range(0, q.shape[0], _KNN_CHUNK):
        sim = F.normalize(q[start:start + _KNN_CHUNK], dim=1) @ b.T
        top_sim, top_idx = sim.topk(k, dim=1)
        # shifting by the best similarity rescales each query's votes alike and cannot overflow
        weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)
        votes = torch.zeros(sim.shape[0], num_classes, device=b.device).scatter_add_(1, bl[top_idx], weights)
        if balanced:
            votes = votes / freq.clamp_min(1e-12)  # classes absent from the bank have no votes to scale
        preds.append(votes.argmax(dim=1).cpu())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(ql.numpy(), torch.cat(preds).numpy()))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) for "mean +- std over seeds"; std is 0.0 for one value."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
