"""Ray started for a command and Tune run on it: one stage's sweep, its search algorithm and
scheduler, a new Tuner or the one a killed driver left, run to its end.

A command joins the cluster in RAY_ADDRESS (or the one a submitted sweep runs on), or starts a
local Ray and stops it after. TPE (Optuna) or random sampling proposes trials and ASHA stops the
weak ones at its rungs; a grid study runs every combination of `sweep.grid` to its end. The
driver resolves the tracking store and creates the experiment before any trial starts
(concurrent first use of a fresh SQLite store loses runs); the callbacks close each trial's
MLflow child run as Tune decides its fate.

A sweep's folder is named by the plan (skinclr.tune.plan.sweep_folder), so the same command finds
it again. `start` does what must happen once per sweep (decode the images, pin one split, open
the MLflow parent run) and writes the resume state: what every trial starts from and the parent
run it logs under; `read_state` reads it back for `--resume`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from skinclr import names
from skinclr.config import ConfigError
from skinclr.track import store, tracking
from skinclr.track.tracking import RunLogger
from skinclr.tune.charts import study_storage
from skinclr.tune.plan import StagePlan, SweepRunConfig, command_tags
from skinclr.tune.spaces import parent_params, sampled_keys, to_tune
from skinclr.tune.records import ChildRuns, ProgressLines, SweepOutcome, close_interrupted, finish
from skinclr.tune.trainables import METRICS, MODE, TrialSetup, make_trainable, trial_name


def _ray_init(default: str | None) -> None:
    """Ray for this process: the cluster in RAY_ADDRESS, else `default` (None: a new local one)."""
    ray.init(address=os.environ.get("RAY_ADDRESS") or default, include_dashboard=False, logging_level="WARNING")


@contextmanager
def ray_session():
    """Join the cluster in RAY_ADDRESS, or start a local Ray for this command and stop it after."""
    # Keeping two checkpoints per trial makes Tune snapshot its state every other report, by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own console report (a settings box and a TensorBoard hint) repeats what the sweep's
    # progress lines and MLflow already show; the legacy reporter honours verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        yield
        return
    # A new local cluster keeps Ray's default token auth; only the notice that it is the default goes.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ctrl-C stops the driver at once, as KeyboardInterrupt; the sweep's state is on disk and
    # --resume continues it. (Tune's own handler would stop the running trials and return as if
    # the sweep had ended, and the trials it cut short would look finished.)
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    term = signal.getsignal(signal.SIGTERM)
    _ray_init(None)
    if callable(term) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, term)  # ray.init's own handler would kill the driver outright
    try:
        yield
    finally:
        ray.shutdown()


def join_cluster() -> None:
    """Connect to the running cluster before the sweep does (it then reuses the connection).

    In a `ray job submit` job the process starts in Ray's unpacked copy of the working folder,
    and connecting makes Ray unpack that copy again: it deletes the folder and extracts it anew
    (under `<folder>.zip.lock`). The process waits for the new copy and moves into it, so
    relative paths and later imports read complete files."""

    def inode(path: Path) -> int | None:
        try:
            return path.stat().st_ino
        except OSError:
            return None

    folder = Path.cwd()
    before = inode(folder)
    _ray_init("auto")
    if "working_dir_files" not in folder.parts:  # not a job's copy
        return
    from filelock import FileLock

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and inode(folder) in (None, before):
        time.sleep(0.2)
    with FileLock(f"{folder}.zip.lock", timeout=120):
        os.chdir(folder)


SPLIT_KEYS = ("data.folds", "data.fold", "data.val_fraction", "data.split_seed")  # varied: trials split themselves


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else path


def trial_base(cfg: SweepRunConfig, split_file: Path | None, cache_dir: Path) -> SweepRunConfig:
    """What every trial starts from: paths made absolute (trials run in their own folders), the
    driver's split (unless the trials vary it) and cache pinned, one torch thread per CPU of the
    trial, and no implicit resume of some other unfinished run with the same config."""
    base = copy.deepcopy(cfg)
    base.data.root = _absolute(base.data.root)
    base.data.split_file = str(split_file) if split_file else ""
    base.data.cache_dir = str(cache_dir)
    base.finetune.imagenet_weights = _absolute(base.finetune.imagenet_weights)
    if base.finetune.init not in ("scratch", "imagenet") and not base.finetune.init.startswith("runs:/"):
        base.finetune.init = _absolute(base.finetune.init)
    base.train.threads = max(1, int(cfg.sweep.cpus_per_trial))
    base.tracking.resume = False
    return base


def start(cfg: SweepRunConfig, folder: Path, uri: str, drawn_from: dict, space: dict,
          parent_of: str | None, command: str = "") -> tuple[TrialSetup, dict[str, Any]]:
    """A new sweep: decode once, pin the split, open the parent run, write the resume state (and
    return it, with what every trial starts from). `command` reproduces the sweep: the parent
    and every trial carry it."""
    from skinclr.data.inputs import resolve_inputs, save_inputs

    inputs = resolve_inputs(cfg)  # the sweep's only scan and decode of the folder
    split_file = save_inputs(inputs, folder)  # the split, and beside it the resolved inputs its trials open
    own_split = set(SPLIT_KEYS) & set(sampled_keys(space))  # e.g. a study over folds
    base = trial_base(cfg, None if own_split else split_file, inputs.cache.path.parent)
    parent = RunLogger.create(cfg.experiment, cfg.tracking.run_name or f"sweep-{folder.name}",
                              tags={names.SWEEP_PARENT_TAG: "1", names.STAGE_TAG: cfg.stage, names.SWEEP_FOLDER_TAG: str(folder),
                                    names.SEARCH_TAG: cfg.sweep.search,
                                    **inputs.tags(), **command_tags(command)},
                              parent_run_id=parent_of)
    parent.log_params(parent_params(cfg.flat(), space))  # swept keys: their distribution
    with tempfile.TemporaryDirectory() as tmp:
        parent.log_artifact(cfg.save(Path(tmp) / "sweep_config.yaml"), "sweep")
        (Path(tmp) / "search_space.yaml").write_text(yaml.safe_dump(drawn_from, sort_keys=False))
        (Path(tmp) / "search_space_narrowed.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
        for name in ("search_space.yaml", "search_space_narrowed.yaml"):
            parent.log_artifact(Path(tmp) / name, "sweep")
    parent.log_artifact(split_file, "sweep")
    s = cfg.sweep
    setup = TrialSetup(stage=cfg.stage, base=base.to_dict(), parent_run_id=parent.run_id, tracking_uri=uri,
                       name=folder.name, storage=str(folder.parent), cpus=s.cpus_per_trial, gpus=s.gpus_per_trial,
                       workers=s.workers_per_trial, command=command)
    state = {"setup": asdict(setup), "sampled": sampled_keys(space), "metric": METRICS[cfg.stage], "mode": MODE,
             "max_t": s.max_t or cfg.train.epochs, "epochs": cfg.train.epochs}
    (folder / names.SWEEP_STATE_FILE).write_text(json.dumps(state, indent=1))
    return setup, state


def read_state(folder: Path, uri: str) -> dict[str, Any]:
    """The state a resumed sweep continues from: Tune must be able to restore the folder, and the
    store must be the one its runs live in."""
    state_file = folder / names.SWEEP_STATE_FILE
    if not tune.Tuner.can_restore(str(folder)):
        raise ConfigError(f"no sweep to resume in {folder}: it stopped before its first trial; "
                          "remove the folder and run the same command without --resume")
    state = json.loads(state_file.read_text())
    if state["setup"]["tracking_uri"] != uri:
        raise ConfigError(f"the sweep in {folder} logs to {state['setup']['tracking_uri']}, but MLFLOW_TRACKING_URI "
                          f"is {uri}; set MLFLOW_TRACKING_URI to the sweep's store to resume it")
    return state


def search_algorithm(cfg: SweepRunConfig, folder: Path):
    """TPE (Optuna), random sampling or the full grid, seeded by train.seed, at most
    max_concurrent at a time. Optuna keeps its study in the sweep's folder, where a resumed
    driver's sampler finds it again and the sweep's charts read it."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.sweep.search in ("random", "grid"):
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=cfg.sweep.max_concurrent)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own progress lines
    sampler = optuna.samplers.TPESampler(seed=cfg.train.seed)
    searcher = OptunaSearch(sampler=sampler, study_name=folder.name, storage=study_storage(folder))
    return ConcurrencyLimiter(searcher, max_concurrent=cfg.sweep.max_concurrent)


def scheduler(cfg: SweepRunConfig, max_t: int, epochs: int):
    """ASHA over epochs, or first-in-first-out for a grid (every combination runs to its end).

    A trial that survives every rung ends on its own and its runner closes its run; ASHA stops
    it only if max_t < epochs."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.sweep.search == "grid":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=cfg.sweep.grace_period,
                         reduction_factor=cfg.sweep.reduction_factor, stop_last_trials=max_t < epochs)


def driver_tracking_uri() -> str:
    """The store every process of the sweep logs to, made absolute (trials run in other folders)."""
    uri = store.tracking_uri()
    if (db := store.sqlite_path(uri)) is not None:
        uri = f"{store.SQLITE}{db.resolve()}"
    elif "://" not in uri:
        raise ConfigError(f"MLFLOW_TRACKING_URI '{uri}' is a folder; MLflow 3 needs a database or server, "
                          "e.g. sqlite:///mlruns/mlflow.db or http://host:5000")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def trial_dirname(trial) -> str:
    """Trial folders are named by trial id: the results of a trial that never reported are
    still matched to its MLflow run."""
    return trial.trial_id


def run_sweep(plan: StagePlan, parent_of: str | None = None) -> SweepOutcome:
    """One stage's sweep as its plan says, new or resumed; `parent_of` nests its parent run (pipeline)."""
    cfg, folder, space = plan.cfg, plan.folder, plan.space
    uri = driver_tracking_uri()
    tracking.ensure_experiment(cfg.experiment)  # before any trial: see skinclr.track.tracking.ensure_experiment
    if plan.resume:
        state = read_state(folder, uri)
        setup = TrialSetup(**state["setup"])
        if not setup.command:  # a sweep begun before its folder kept its command
            setup = dataclasses.replace(setup, command=plan.command)
        RunLogger(setup.parent_run_id).reopen()
        print(f"[sweep] resuming {folder} (MLflow parent run {setup.parent_run_id})", flush=True)
        tuner = tune.Tuner.restore(str(folder), make_trainable(setup), resume_unfinished=True, resume_errored=True)
    else:
        setup, state = start(cfg, folder, uri, plan.drawn_from, space, parent_of, plan.command)
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
                metric=state["metric"], mode=MODE, search_alg=search_algorithm(cfg, folder),
                num_samples=1 if grid else s.num_samples,  # a grid runs each combination once
                # A worker process runs the next trial once its trial ends (a stopped one too: see
                # trainables.run_trial), so torch, MLflow and the project load once per worker; a
                # data-parallel trial's process keeps its own (its Ray Train workers end with it).
                scheduler=scheduler(cfg, state["max_t"], state["epochs"]),
                trial_dirname_creator=trial_dirname, reuse_actors=setup.workers <= 1,
                # `trial N` from 0: a search algorithm counts its trials from 1, random and grid from 0
                trial_name_creator=functools.partial(trial_name, first=int(s.search == "optuna"))),
            run_config=tune.RunConfig(
                name=folder.name, storage_path=str(folder.parent), verbose=0,
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                # Two, not one: Tune deletes the older checkpoint before its saved state points
                # past it, and a driver killed in between must still find the one it names.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[ChildRuns(setup.parent_run_id, uri, state["max_t"], state["epochs"]),
                           ProgressLines(state["metric"], state["max_t"], state["epochs"])]))
    print(f"[sweep] follow it in the MLflow UI{tracking.browse_hint()}: {tracking.run_link(setup.parent_run_id)}",
          flush=True)
    try:
        results = tuner.fit()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see ray_session): Tune's state is on disk
        close_interrupted(setup.parent_run_id)
        raise
    return finish(results, setup, state, plan)
