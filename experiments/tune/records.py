"""What a sweep leaves in MLflow: each trial's fate as Tune decides it, and, at the end, what
the sweep comes to.

Tune callbacks run in the driver: `ChildRuns` closes each trial's MLflow child run the way Tune
ended the trial, so no run is left RUNNING; `ProgressLines` prints one line per trial epoch and
per trial end. `finish` puts the trials table, Optuna's charts of it and the best trial on the parent run,
read back from Tune's results and the trials' MLflow runs, so a resumed sweep sums up every
trial, including those of the driver before it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from skinclr import names
from skinclr.track import store, tracking
from skinclr.track.candidates import run_score
from skinclr.track.tracking import RunLogger
from skinclr.tune.charts import log_charts
from skinclr.tune.plan import StagePlan
from skinclr.tune.trainables import MODE, TrialSetup, trial_runs


def stopped_by(result: dict[str, Any], errored: bool, max_t: int, epochs: int) -> str:
    """Why a trial ended: asha, max_t, early_stopping (the fine-tune loop's own), error, or ''
    (it ran all its epochs). Tune marks every ended trial done, so the epoch count decides."""
    epoch = int(result.get("epoch", 0))
    if errored:
        return "error"
    if result.get("early_stop"):
        return "early_stopping"
    if epoch >= epochs:
        return ""
    return "max_t" if epoch >= max_t else "asha"


class ChildRuns(tune.Callback):
    """End each trial's MLflow child run the way Tune ended the trial (runs in the driver).

    A trial stopped by ASHA unwinds through tracking.Stopped without ending its run, which this
    callback then closes as stopped; an errored one ends FAILED. At the end of the sweep every
    trial is closed again (idempotent), and the run of a trial Tune did not finish (an interrupted
    sweep) ends KILLED."""

    def __init__(self, parent_run_id: str, tracking_uri: str, max_t: int, epochs: int):
        self.parent_run_id, self.tracking_uri = parent_run_id, tracking_uri
        self.max_t, self.epochs = max_t, epochs

    def close(self, trial, runs: dict[str, Any], status: str) -> None:
        """End the trial's run; `status` is Tune's verdict (TERMINATED or ERROR) or, for a
        trial Tune did not finish, whatever it is now."""
        run = runs.get(trial.trial_id)
        if run is None:  # failed before it could open its run
            return
        logger = RunLogger(run.info.run_id)
        if status not in ("TERMINATED", "ERROR"):
            if run.info.status == "RUNNING":
                logger.end("KILLED")
            return
        # The runner tags the epochs it ran when its loop ends, which Tune may not have heard of
        # (a driver killed right then).
        result = trial.last_result or {}
        epoch = max(int(result.get("epoch", 0)), int(run.data.tags.get(names.EPOCHS_RUN_TAG, 0)))
        why = stopped_by({**result, "epoch": epoch}, status == "ERROR", self.max_t, self.epochs)
        end = "FAILED" if status == "ERROR" else "FINISHED"
        if run.data.tags.get(names.STOPPED_BY_TAG) != why:
            tags = {names.STOPPED_BY_TAG: why, names.EPOCHS_RUN_TAG: epoch}
            if why in ("asha", "max_t"):
                tags[names.STOPPED_AT_TAG] = epoch
            logger.set_tags(tags)
        if run.info.status != end:  # a trial that ran to its end was closed by the runner itself
            logger.end(end)

    def runs(self) -> dict[str, Any]:
        if store.tracking_uri() != self.tracking_uri:
            raise RuntimeError(f"the driver logs to {store.tracking_uri()}, the sweep to {self.tracking_uri}")
        return trial_runs(self.parent_run_id)

    # Tune calls these before it updates trial.status, so the hook itself says what happened.
    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.close(trial, self.runs(), "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.close(trial, self.runs(), "ERROR")

    def on_experiment_end(self, trials, **info) -> None:
        runs = self.runs()
        for trial in trials:
            self.close(trial, runs, trial.status)
        known = {t.trial_id for t in trials}
        for trial_id, run in runs.items():
            if trial_id not in known and run.info.status == "RUNNING":
                RunLogger(run.info.run_id).end("KILLED")


class ProgressLines(tune.Callback):
    """One line per trial epoch and per trial end: readable in a log, unlike a redrawn table."""

    def __init__(self, metric: str, max_t: int, epochs: int):
        self.metric, self.max_t, self.epochs = metric, max_t, epochs

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        shown = "  ".join(f"{k}={result[k]:.4f}" for k in (self.metric, "train_loss", "val_loss") if k in result)
        running = sum(t.status == "RUNNING" for t in trials)
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        print(f"[sweep] {trial.trial_id} epoch {result.get('epoch', '?')}/{self.epochs}  {shown}  "
              f"[{running} running, {ended} ended, {len(trials)} started]", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        why = stopped_by(result, False, self.max_t, self.epochs)
        print(f"[sweep] {trial.trial_id} ended after epoch {result.get('epoch', 0)}: "
              f"{'stopped by ' + why if why else 'all epochs run'}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"[sweep] {trial.trial_id} FAILED; traceback in {trial.error_file or trial.path}", flush=True)



@dataclass
class SweepOutcome:
    """What a sweep comes to: the pipeline and the quickstart go on from its best trial."""
    parent_run_id: str
    metric: str
    table: pd.DataFrame  # one row per trial
    best_trial_id: str | None
    best_run_id: str | None
    best_value: float | None
    folder: Path


def trials_table(results, parent_run_id: str, sampled: list[str], metric: str) -> pd.DataFrame:
    """One row per trial: ids, MLflow status, sampled values, last and best metric, why it ended.

    `best_<metric>` is the trial's score as promotion reads it (skinclr.track.candidates.run_score): the
    model it saved where it logged one (fine-tuning, at the epoch `finetune.select_metric`
    picked), else its best epoch."""
    runs, client = trial_runs(parent_run_id), tracking.client()
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        last = result.metrics or {}
        history = result.metrics_dataframe
        run = runs.get(trial_id)
        # Scored as promotion scores a run; a trial that never opened one, by Tune's history.
        score = run_score(client, run, metric) if run else None
        best = score[0] if score else (history[metric].max() if history is not None and metric in history else None)
        rows.append({"trial_id": trial_id, "run_id": run.info.run_id if run else "",
                     "status": run.info.status if run else "NOT_STARTED",
                     **{k: result.config.get(k) for k in sampled},
                     f"last_{metric}": last.get(metric), f"best_{metric}": best,
                     "epochs": int(last.get("epoch", 0)),
                     "stopped_by": run.data.tags.get(names.STOPPED_BY_TAG, "") if run else "error"})
    table = pd.DataFrame(rows)
    return table.sort_values(f"best_{metric}", ascending=False, na_position="last", kind="stable")


def close_interrupted(parent_run_id: str) -> None:
    """A driver interrupted mid-sweep (Ctrl-C, SIGTERM): the parent and every trial run still
    open end KILLED, so nothing is left RUNNING and --resume picks them up again."""
    for run in trial_runs(parent_run_id).values():
        if run.info.status == "RUNNING":
            RunLogger(run.info.run_id).end("KILLED")
    RunLogger(parent_run_id).end("KILLED")


def finish(results, setup: TrialSetup, state: dict[str, Any], plan: StagePlan) -> SweepOutcome:
    """Trials table, Optuna's charts (skinclr.tune.charts), a static parallel-coordinates figure
    and the best trial, on the parent run."""
    from skinclr.train.figures import plot_parallel_coordinates

    metric, sampled, folder = state["metric"], state["sampled"], plan.folder
    best_col = f"best_{metric}"
    table = trials_table(results, setup.parent_run_id, sampled, metric)
    parent = RunLogger(setup.parent_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "trials.csv", index=False)
        parent.log_artifact(Path(tmp) / "trials.csv", "sweep")
        try:
            plot_parallel_coordinates(table[sampled + [best_col]], best_col, Path(tmp) / "parallel_coordinates.png",
                                      params=sampled)
            parent.log_artifact(Path(tmp) / "parallel_coordinates.png", "sweep")
        except ValueError as err:
            print(f"[sweep] no parallel-coordinates figure: {err}", flush=True)
    log_charts(parent, folder, table, plan.space, metric, state.get("mode", MODE), plan.cfg.sweep.search,
               f"{plan.cfg.stage} sweep {folder.name}")
    scored = table[pd.to_numeric(table[best_col], errors="coerce").notna()]
    best = scored.iloc[0] if len(scored) else None
    if best is not None:
        parent.set_tags({names.BEST_TRIAL_TAG: best["trial_id"], names.BEST_RUN_TAG: best["run_id"],
                         **{f"{names.BEST_PREFIX}{k}": best[k] for k in sampled}})
        parent.log_metrics({best_col: float(best[best_col])}, step=0)
    unfinished = table["status"].isin(["RUNNING", "KILLED"]).any()
    finished = int((table["status"] == "FINISHED").sum())
    parent.set_tags({names.TRIALS_TAG: len(table), names.TRIALS_FINISHED_TAG: finished})
    parent.end("KILLED" if unfinished else "FINISHED" if best is not None else "FAILED")
    shown = table.drop(columns=["run_id"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    if unfinished:
        print(f"[sweep] interrupted; continue with the same command and --resume ({folder})", flush=True)
    elif best is not None:
        print(f"[sweep] best trial {best['trial_id']} (MLflow run {best['run_id']}): {metric} {best[best_col]:.4f}",
              flush=True)
    if best is None:
        return SweepOutcome(setup.parent_run_id, metric, table, None, None, None, folder)
    return SweepOutcome(setup.parent_run_id, metric, table, best["trial_id"], best["run_id"], float(best[best_col]),
                        folder)
