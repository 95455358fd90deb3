"""Grid studies and sweeps, read back from MLflow: label efficiency (val balanced accuracy and
accuracy against the labelled fraction), comparisons of inits (scratch and pretraining methods),
and each sweep with the way to its Optuna charts.

A study is a grid sweep (`sweep.search: grid`) over, for instance, `data.label_fraction`,
`finetune.init` and seeds; everything here is read back from its MLflow runs, so the figure and
the table can be rebuilt from the store alone. Balanced accuracy and accuracy are drawn and
tabled apart. Each row also names the pretraining runs behind it with their kNN monitor at the
first, middle and last monitored epoch, so a method's fine-tune sits beside what it started from.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from skinclr.train import metrics as M
from skinclr import names
from skinclr.track import store, tracking

FRACTION = "data.label_fraction"
SCORES = {"best_val_balanced_accuracy": "val balanced accuracy", "best_val_accuracy": "val accuracy"}
# The saved model on the held-out test side (data.test_fraction): shown beside val, never chosen on.
TEST_SCORES = {"test_balanced_accuracy": "test balanced accuracy", "test_accuracy": "test accuracy"}
COLOURS = {"scratch": "tab:gray", "ImageNet": "tab:blue", "SimCLR": "tab:red"}
OTHER_COLOURS = ("tab:purple", "tab:orange", "tab:green", "tab:brown")  # further methods, in report order

PAPER_INITS = ("scratch", "ImageNet", "SimCLR")  # Table 1's rows, shown even when empty


class StudyError(ValueError):
    """No study to report on, or one whose runs lack what the figure needs."""


def init_group(run: Run) -> str:
    """scratch, ImageNet, or the method of the pretraining run the fine-tune started from
    (SimCLR, MoCo v2, BYOL); a backbone file given by path counts as SimCLR."""
    init = run.data.tags.get(names.INIT_TAG) or run.data.params.get("finetune.init", "")
    named = {"scratch": "scratch", "imagenet": "ImageNet"}
    if init in named:
        return named[init]
    return method_title(run.data.tags.get(names.PRETRAIN_RUN_TAG, ""))


def init_groups() -> list[str]:
    """Every init group in report order: the paper's three, then the other methods by name."""
    from skinclr.train.methods import METHODS

    return list(dict.fromkeys([*PAPER_INITS, *(method.title for method in METHODS.values())]))


@functools.lru_cache(maxsize=1024)
def method_title(pretrain_run_id: str) -> str:
    """The title of a pretraining run's method, read from its params once (runs before
    `pretrain.method` existed were SimCLR); "pretrained" when the run is gone from the store."""
    from skinclr.train.methods import METHODS

    if not pretrain_run_id:
        return METHODS["simclr"].title
    try:
        method = tracking.client().get_run(pretrain_run_id).data.params.get("pretrain.method", "simclr")
    except MlflowException:
        return "pretrained"
    return METHODS[method].title if method in METHODS else method


def find_study(experiment_ids: list[str], ref: str | None = None) -> Run | None:
    """The grid study named by `ref` (parent run id or name), else the newest grid study in the
    experiments; None when there is none."""
    c = tracking.client()
    if ref:
        run_id = tracking.find_run(ref)
        if run_id is None:
            raise StudyError(f"no run '{ref}' in {store.tracking_uri()}; pass the parent run id of a grid study")
        run = c.get_run(run_id)
        if run.data.tags.get(names.SEARCH_TAG) != "grid":
            raise StudyError(f"run {run_id} is not the parent run of a grid study (sweep.search=grid); "
                             "pass the parent run id that `skinclr sweep` printed for the study")
        return run
    runs = c.search_runs(experiment_ids, filter_string=f"tags.`{names.SEARCH_TAG}` = 'grid'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def study_frame(parent: Run) -> pd.DataFrame:
    """One row per finished child run: init group, fraction, seed, pretraining run and the best epoch's scores."""
    c = tracking.client()
    children = c.search_runs([parent.info.experiment_id], max_results=10_000,
                             filter_string=f"tags.`{names.PARENT_TAG}` = '{parent.info.run_id}' and attributes.status = 'FINISHED'")
    rows = [{"run_id": r.info.run_id, "init": init_group(r), "label_fraction": float(r.data.params.get(FRACTION, 1.0)),
             "seed": int(r.data.params.get("train.seed", 0)), "train_images": r.data.tags.get(names.TRAIN_IMAGES_TAG, ""),
             "pretrain_run": r.data.tags.get(names.PRETRAIN_RUN_TAG, ""),
             **{k: r.data.metrics.get(k, np.nan) for k in (*SCORES, *TEST_SCORES)}}
            for r in children]
    frame = pd.DataFrame(rows, columns=["run_id", "init", "label_fraction", "seed", "train_images", "pretrain_run",
                                        *SCORES, *TEST_SCORES])
    frame = frame.dropna(subset=list(SCORES))
    if frame.empty:
        raise StudyError(f"study {parent.info.run_id} has no finished child run with best-epoch metrics yet; "
                         "continue it with `skinclr sweep --config ... --resume`")
    order = {name: i for i, name in enumerate(init_groups())}
    frame = frame.assign(_order=frame["init"].map(lambda g: order.get(g, len(order))))
    return frame.sort_values(["_order", "label_fraction", "seed"], ignore_index=True).drop(columns="_order")


def sweep_parents(experiment_ids: list[str]) -> list[Run]:
    """Every sweep's parent run in the experiments (a grid study's too), newest first."""
    return tracking.client().search_runs(experiment_ids, filter_string=f"tags.`{names.SWEEP_PARENT_TAG}` = '1'",
                                         order_by=["attributes.start_time DESC"], max_results=1000)


def charts_text(parent: Run) -> str:
    """Where a sweep's Optuna charts are, in markdown: the artifact paths on its parent run, and
    that run's link in the MLflow UI (its Artifacts tab shows them, interactive)."""
    logged = {a.path for a in tracking.client().list_artifacts(parent.info.run_id, names.SWEEP_CHARTS)}
    paths = [path for name in names.SWEEP_CHART_FILES if (path := f"{names.SWEEP_CHARTS}/{name}") in logged]
    link = f"[run `{parent.info.run_id[:8]}`]({tracking.run_link(parent.info.run_id, parent.info.experiment_id)})"
    if not paths:
        return f"no charts on {link}"
    return f"{', '.join(f'`{p}`' for p in paths)} on {link}"


def sweeps_table(parents: list[Run]) -> pd.DataFrame:
    """One row per sweep: its parent run, stage, search, trials, best score and its charts."""
    rows = []
    for run in parents:
        tags, metrics = run.data.tags, run.data.metrics
        best = next((f"{key.removeprefix('best_')} {value:.4f}" for key, value in sorted(metrics.items())
                     if key.startswith("best_")), "—")
        rows.append({"sweep": f"`{run.info.run_id}` ({run.info.run_name})", "stage": tags.get(names.STAGE_TAG, ""),
                     "search": tags.get(names.SEARCH_TAG, ""), "status": run.info.status,
                     "trials (finished)": f"{tags.get(names.TRIALS_TAG, '?')} ({tags.get(names.TRIALS_FINISHED_TAG, '?')})",
                     "best": best, "Optuna charts (interactive HTML)": charts_text(run)})
    return pd.DataFrame(rows)


def pretraining_summary(run_id: str) -> str:
    """A pretraining run in one cell: its kNN monitor at the first, middle and last monitored
    epoch, the best, and its wall time."""
    c = tracking.client()
    run = c.get_run(run_id)
    knn = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "knn_balanced_accuracy"))
    minutes = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 60_000
    if not knn:
        return f"`{run_id[:8]}`: no kNN monitor, {minutes:.1f} min"
    picks = [knn[0], knn[len(knn) // 2], knn[-1]] if len(knn) > 2 else knn
    best = max(knn, key=lambda sv: sv[1])
    return (f"`{run_id[:8]}`: kNN {' / '.join(f'{v:.3f}' for _, v in picks)} at epochs "
            f"{' / '.join(str(s) for s, _ in picks)} (best {best[1]:.3f}, epoch {best[0]}), {minutes:.1f} min")


def study_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sample std over seeds per (init, fraction), with the pretraining runs and the run ids behind each cell."""
    rows, summaries = [], {}
    for (init, fraction), group in frame.groupby(["init", "label_fraction"], sort=False):
        row = {"init": init, "label fraction": fraction, "n runs": len(group)}
        for key, name in SCORES.items():
            mean, std = M.mean_std(group[key])
            row[name] = f"{mean:.4f} ± {std:.4f}" if len(group) > 1 else f"{mean:.4f}"
        for key, name in TEST_SCORES.items() if frame[list(TEST_SCORES)].notna().any().any() else ():
            scored = group[key].dropna()
            mean, std = M.mean_std(scored) if len(scored) else (np.nan, np.nan)
            row[name] = ("—" if not len(scored) else f"{mean:.4f} ± {std:.4f}" if len(scored) > 1 else f"{mean:.4f}") + \
                (f" ({len(scored)} of {len(group)} runs)" if 0 < len(scored) < len(group) else "")
        pretrained = [run_id for run_id in dict.fromkeys(group["pretrain_run"]) if run_id]
        for run_id in pretrained:
            if run_id not in summaries:
                summaries[run_id] = pretraining_summary(run_id)
        row["pretraining"] = "; ".join(summaries[run_id] for run_id in pretrained) or "—"
        row["runs"] = ", ".join(group["run_id"])
        rows.append(row)
    return pd.DataFrame(rows)


def plot_label_efficiency(frame: pd.DataFrame, path, title: str = "") -> Path:
    """Both scores against the labelled fraction (log x): mean line and a ±1 std band per init."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    fractions = sorted(frame["label_fraction"].unique())
    others = iter(OTHER_COLOURS)
    colours = {init: COLOURS.get(init) or next(others, "black") for init in frame["init"].unique()}
    for ax, (key, name) in zip(axes, SCORES.items()):
        for init, group in frame.groupby("init", sort=False):
            stats = group.groupby("label_fraction")[key].agg(["mean", "std", "count"]).reindex(fractions).dropna(subset=["mean"])
            x, mean, std = stats.index.to_numpy(), stats["mean"].to_numpy(), stats["std"].fillna(0).to_numpy()
            colour = colours[init]
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
