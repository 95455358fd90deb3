"""Tune callbacks of a sweep, run in the driver: they see every trial's fate as Tune decides it.

`ChildRuns` closes each trial's MLflow child run the way Tune ended the trial, so no run is left
RUNNING; `ProgressLines` prints one line per trial epoch and per trial end.
"""
from __future__ import annotations

from typing import Any

from ray import tune

from skinclr import names
from skinclr.track import store
from skinclr.track.tracking import RunLogger
from skinclr.tune.trainables import trial_runs


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

    A trial stopped by ASHA never returns from its loop, so its run would stay RUNNING; an
    errored one ends FAILED. At the end of the sweep every trial is closed again (idempotent),
    and the run of a trial Tune did not finish (an interrupted sweep) ends KILLED."""

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
