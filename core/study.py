"""Label efficiency, measured: val balanced accuracy and accuracy against the labelled fraction.

A study is a grid sweep (`sweep.search: grid`) over `data.label_fraction` (with inits and seeds);
everything here is read back from its MLflow runs, so the figure and the table can be rebuilt
from the store alone. Balanced accuracy and accuracy are drawn and tabled apart.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Run

from core import metrics as M, names, store, tracking

FRACTION = "data.label_fraction"
SCORES = {"best_val_balanced_accuracy": "val balanced accuracy", "best_val_accuracy": "val accuracy"}
COLOURS = {"scratch": "tab:gray", "ImageNet": "tab:blue", "SimCLR": "tab:red"}


class StudyError(ValueError):
    """No study to report on, or one whose runs lack what the figure needs."""


def _init_group(run: Run) -> str:
    from core.report import init_group

    return init_group(run)


def find_study(experiment_ids: list[str], ref: str | None = None) -> Run | None:
    """The grid study named by `ref` (parent run id or name), else the newest one over label
    fractions in the experiments; None when there is none."""
    c = tracking.client()
    if ref:
        run_id = tracking.find_run(ref)
        if run_id is None:
            raise StudyError(f"no run '{ref}' in {store.tracking_uri()}; pass the parent run id of a grid study")
        run = c.get_run(run_id)
        if FRACTION not in run.data.params.get("sweep.grid", ""):
            raise StudyError(f"run {run_id} is not a grid study over {FRACTION} (its sweep.grid is "
                             f"{run.data.params.get('sweep.grid', 'not set')!r})")
        return run
    runs = c.search_runs(experiment_ids, filter_string="tags.`skinclr.search` = 'grid'",
                         order_by=["attributes.start_time DESC"], max_results=100)
    return next((r for r in runs if FRACTION in r.data.params.get("sweep.grid", "")), None)


def study_frame(parent: Run) -> pd.DataFrame:
    """One row per finished child run: init group, fraction, seed and the best epoch's scores."""
    c = tracking.client()
    children = c.search_runs([parent.info.experiment_id], max_results=10_000,
                             filter_string=f"tags.`{names.PARENT_TAG}` = '{parent.info.run_id}' and attributes.status = 'FINISHED'")
    rows = [{"run_id": r.info.run_id, "init": _init_group(r), "label_fraction": float(r.data.params[FRACTION]),
             "seed": int(r.data.params.get("train.seed", 0)), "train_images": r.data.tags.get(names.TRAIN_IMAGES_TAG, ""),
             **{k: r.data.metrics.get(k, np.nan) for k in SCORES}}
            for r in children if FRACTION in r.data.params]
    frame = pd.DataFrame(rows, columns=["run_id", "init", "label_fraction", "seed", "train_images", *SCORES])
    frame = frame.dropna(subset=list(SCORES))
    if frame.empty:
        raise StudyError(f"study {parent.info.run_id} has no finished child run with best-epoch metrics yet; "
                         "continue it with `skinclr sweep --config ... --resume`")
    order = {name: i for i, name in enumerate(COLOURS)}  # scratch, ImageNet, SimCLR
    frame = frame.assign(_order=frame["init"].map(order))
    return frame.sort_values(["_order", "label_fraction", "seed"], ignore_index=True).drop(columns="_order")


def study_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sample std over seeds per (init, fraction), with the run ids behind each cell."""
    rows = []
    for (init, fraction), group in frame.groupby(["init", "label_fraction"], sort=False):
        row = {"init": init, "label fraction": fraction, "n runs": len(group)}
        for key, name in SCORES.items():
            mean, std = M.mean_std(group[key])
            row[name] = f"{mean:.4f} ± {std:.4f}" if len(group) > 1 else f"{mean:.4f}"
        row["runs"] = ", ".join(group["run_id"])
        rows.append(row)
    return pd.DataFrame(rows)


def plot_label_efficiency(frame: pd.DataFrame, path, title: str = "") -> Path:
    """Both scores against the labelled fraction (log x): mean line and a ±1 std band per init."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    fractions = sorted(frame["label_fraction"].unique())
    for ax, (key, name) in zip(axes, SCORES.items()):
        for init, group in frame.groupby("init", sort=False):
            stats = group.groupby("label_fraction")[key].agg(["mean", "std", "count"]).reindex(fractions).dropna(subset=["mean"])
            x, mean, std = stats.index.to_numpy(), stats["mean"].to_numpy(), stats["std"].fillna(0).to_numpy()
            colour = COLOURS.get(init, "tab:green")
            low, high = int(stats["count"].min()), int(stats["count"].max())
            ax.plot(x, mean, marker="o", color=colour, label=f"{init} (n={low if low == high else f'{low}-{high}'} per point)")
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labelled fraction of the train side (log scale)")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
