"""One stage's sweep through Ray Tune: a new Tuner, or the one a killed driver left, run to its end.

The driver resolves the tracking store and creates the experiment before any trial starts
(concurrent first use of a fresh SQLite store loses runs). Tune then runs the trials, and the
callbacks close each trial's MLflow child run as Tune decides its fate.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ray import tune

from core import links, names, store, tracking
from core.config import ConfigError
from core.tracking import RunLogger
from experiments.callbacks import ChildRuns, ProgressLines
from experiments.preflight import search_space
from experiments.search import scheduler, search_algorithm
from experiments.spaces import to_tune
from experiments.summary import SweepOutcome, close_interrupted, finish
from experiments.sweep_config import SweepRunConfig
from experiments.sweep_state import check_resume, read_state, start, sweep_folder
from experiments.trainables import TrialSetup, make_trainable


def driver_tracking_uri() -> str:
    """The store every process of the sweep logs to, made absolute (trials run in other folders)."""
    uri = store.tracking_uri()
    if uri.startswith("sqlite:///"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    elif "://" not in uri:
        raise ConfigError(f"MLFLOW_TRACKING_URI '{uri}' is a folder; MLflow 3 needs a database or server, "
                          "e.g. sqlite:///mlruns/mlflow.db or http://host:5000")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def trial_dirname(trial) -> str:
    """Trial folders are named by trial id: the results of a trial that never reported are
    still matched to its MLflow run."""
    return trial.trial_id


def run_sweep(cfg: SweepRunConfig, resume: bool = False, parent_of: str | None = None) -> SweepOutcome:
    """One stage's sweep, new or resumed; `parent_of` nests its parent run (pipeline)."""
    space_file, space = search_space(cfg)
    uri = driver_tracking_uri()
    tracking.ensure_experiment(cfg.experiment)  # before any trial: see core.tracking.ensure_experiment
    folder = sweep_folder(cfg)
    check_resume(folder / names.SWEEP_STATE_FILE, resume)
    if resume:
        state = read_state(folder, uri)
        setup = TrialSetup(**state["setup"])
        RunLogger(setup.parent_run_id).reopen()
        print(f"[sweep] resuming {folder} (MLflow parent run {setup.parent_run_id})", flush=True)
        tuner = tune.Tuner.restore(str(folder), make_trainable(setup), resume_unfinished=True, resume_errored=True)
    else:
        setup = start(cfg, folder, uri, space_file, space, parent_of)
        state = json.loads((folder / names.SWEEP_STATE_FILE).read_text())
        s = cfg.sweep
        grid = s.search == "grid"
        how = (f"grid of {math.prod(len(v) for v in s.grid.values())}, no early stops" if grid else
               f"{s.num_samples} trials, {s.search} search, ASHA grace {s.grace_period} x{s.reduction_factor} "
               f"up to {state['max_t']}")
        print(f"[sweep] {cfg.stage} {how}, {s.max_concurrent} at a time; MLflow parent run "
              f"{setup.parent_run_id} in {uri}; Ray folder {folder}", flush=True)
        tuner = tune.Tuner(
            make_trainable(setup),
            param_space=to_tune(space),
            tune_config=tune.TuneConfig(
                metric=state["metric"], mode="max", search_alg=search_algorithm(cfg),
                num_samples=1 if grid else s.num_samples,  # a grid runs each combination once
                # Each trial gets a fresh process: a stopped trial's thread never returns (see
                # trainables.report_to_tune).
                scheduler=scheduler(cfg, state["max_t"], state["epochs"]),
                trial_dirname_creator=trial_dirname, reuse_actors=False),
            run_config=tune.RunConfig(
                name=folder.name, storage_path=str(folder.parent), verbose=0,
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                # Two, not one: Tune deletes the older checkpoint before its saved state points
                # past it, and a driver killed in between must still find the one it names.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[ChildRuns(setup.parent_run_id, uri, state["max_t"], state["epochs"]),
                           ProgressLines(state["metric"], state["max_t"], state["epochs"])]))
    print(f"[sweep] follow it in the MLflow UI{links.browse_hint()}: {links.run_link(setup.parent_run_id)}",
          flush=True)
    try:
        results = tuner.fit()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see experiments.ray_session): Tune's state is on disk
        close_interrupted(setup.parent_run_id)
        raise
    return finish(results, setup, state, folder)
