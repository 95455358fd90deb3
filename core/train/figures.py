"""The paper's figures: loss and accuracy curves, confusion matrices, a sweep's parallel coordinates.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot: no global
figure state, no GUI backend, nothing to close, safe in worker processes.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from skinclr import names


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


def write_report(report: dict, out: Path, title: str) -> list[Path]:
    """A classification report as files: its confusion matrix (figure, counts and row-normalised
    CSVs) and its per-class table (CSV and text); what every scored set of images leaves."""
    from skinclr.train import metrics as M

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(report, out / names.CONFUSION_PNG, title=title)
    M.write_confusion_csv(report, out / names.CONFUSION_CSV, normalized=False)
    M.write_confusion_csv(report, out / names.CONFUSION_NORMALIZED_CSV, normalized=True)
    M.report_frame(report).to_csv(out / names.CLASSIFICATION_REPORT_CSV)
    (out / names.CLASSIFICATION_REPORT_TXT).write_text(M.report_text(report))
    return [out / n for n in (names.CONFUSION_PNG, names.CONFUSION_CSV, names.CONFUSION_NORMALIZED_CSV,
                              names.CLASSIFICATION_REPORT_CSV, names.CLASSIFICATION_REPORT_TXT)]


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
