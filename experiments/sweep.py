"""`skinclr sweep`: a Ray Tune search over one stage, or the pretrain -> fine-tune pipeline.

The driver does what must happen once: it resolves the tracking store and creates the
experiment (concurrent first use of a fresh SQLite store loses runs), decodes the images into
the cache and pins one split file, and opens the sweep's MLflow parent run. Tune then runs the
trials (ASHA stops the weak ones early; Optuna's TPE, or plain random sampling, proposes new
ones) and a Tune callback closes each trial's MLflow child run as Tune decides its fate, so no
run is left RUNNING. A sweep's folder keeps the parent run id, so `--resume` after a killed
driver continues the same parent, the same child runs and the unfinished trials' checkpoints.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray import tune

from core import tracking
from core.config import Config, ConfigError, load_config
from core.tracking import RunLogger
from core import names
from experiments.spaces import (check_keys, grid_space, load_space, narrow, project_path, sampled_keys, space_path,
                                to_tune)
from experiments.trainables import METRICS, TrialSetup, make_trainable, trial_runs

PIPELINE_KEYS = ("finetune_config", "eval_data")  # sweep.* keys only a pipeline config has
SPLIT_KEYS = ("data.folds", "data.fold", "data.val_fraction", "data.split_seed")  # varied: trials split themselves


@dataclass
class SweepOutcome:
    parent_run_id: str
    metric: str
    table: pd.DataFrame  # one row per trial
    best_trial_id: str | None
    best_run_id: str | None
    best_value: float | None
    folder: Path


def load_sweep_config(path: str | Path | None, overrides: list[str] | None) -> tuple[Config, dict[str, str]]:
    """A sweep config, and the pipeline's own keys (sweep.finetune_config, sweep.eval_data) that it sets."""
    cfg = load_config(path, overrides)
    extra = {k: getattr(cfg.sweep, k) for k in PIPELINE_KEYS if getattr(cfg.sweep, k)}
    if extra and cfg.sweep.stage != "pipeline":
        raise ConfigError(f"sweep.{', sweep.'.join(extra)} only apply to sweep.stage=pipeline (got '{cfg.sweep.stage}')")
    return cfg, extra


def driver_tracking_uri() -> str:
    """The store every process of the sweep logs to, made absolute (trials run in other folders)."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    elif "://" not in uri:
        raise ConfigError(f"MLFLOW_TRACKING_URI '{uri}' is a folder; MLflow 3 needs a database or server, "
                          "e.g. sqlite:///mlruns/mlflow.db or http://host:5000")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def sweep_folder(cfg: Config, extra: dict[str, str] | None = None) -> Path:
    """`<sweep.storage>/<sweep.name>`; the name defaults to the stage and a hash of the config,
    so the same command finds the same folder again for --resume."""
    storage = Path(cfg.sweep.storage or Path.home() / "ray_results").expanduser().resolve()
    key = tracking.run_key({**cfg.flat(), **(extra or {})})[:8]
    return storage / (cfg.sweep.name or f"{cfg.sweep.stage if extra else cfg.stage}-{key}")


def check_sweep(cfg: Config) -> None:
    s = cfg.sweep
    problems = [
        (cfg.stage in METRICS, "stage", f"a sweep runs pretrain or finetune trials, not '{cfg.stage}'"),
        (s.stage in (cfg.stage, "pipeline"), "sweep.stage",
         f"'{s.stage}' disagrees with stage '{cfg.stage}'; set both to the stage the trials run"),
        (cfg.stage != "pretrain" or cfg.monitor.every == 1, "monitor.every",
         f"must be 1 in a pretrain sweep so ASHA can compare trials every epoch (got {cfg.monitor.every})"),
        (s.num_samples >= 1, "sweep.num_samples", f"must be at least 1 (got {s.num_samples})"),
        (s.max_concurrent >= 1, "sweep.max_concurrent", f"must be at least 1 (got {s.max_concurrent})"),
        (s.grace_period >= 1, "sweep.grace_period", f"must be at least 1 (got {s.grace_period})"),
        (s.reduction_factor >= 2, "sweep.reduction_factor", f"must be at least 2 (got {s.reduction_factor})"),
        (s.grace_period <= (s.max_t or cfg.train.epochs), "sweep.grace_period",
         f"{s.grace_period} exceeds max_t {s.max_t or cfg.train.epochs}; lower it or train longer"),
        (s.cpus_per_trial > 0, "sweep.cpus_per_trial", f"must be positive (got {s.cpus_per_trial})"),
        (s.gpus_per_trial >= 0, "sweep.gpus_per_trial", f"must be 0 or more (got {s.gpus_per_trial})"),
        (s.workers_per_trial >= 1, "sweep.workers_per_trial", f"must be at least 1 (got {s.workers_per_trial})"),
        (s.workers_per_trial == 1 or cfg.stage == "pretrain", "sweep.workers_per_trial",
         "data-parallel trials exist for pretraining only; set it to 1 for fine-tuning"),
        (s.max_failures >= 0, "sweep.max_failures", f"must be 0 or more (got {s.max_failures})"),
        (s.search == "grid" or not s.grid, "sweep.grid", f"only applies to sweep.search=grid (got '{s.search}')"),
        (s.search != "grid" or not s.narrow, "sweep.narrow", "does not apply to a grid study; list the values in sweep.grid"),
    ]
    for ok, key, what in problems:
        if not ok:
            raise ConfigError(f"config key '{key}' {what}")


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else path


def trial_base(cfg: Config, split_file: Path | None, cache_dir: Path) -> Config:
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


def search_algorithm(cfg: Config):
    """TPE (Optuna), random sampling or the full grid, seeded by train.seed, at most
    max_concurrent at a time."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.sweep.search in ("random", "grid"):
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=cfg.sweep.max_concurrent)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own progress lines
    sampler = optuna.samplers.TPESampler(seed=cfg.train.seed)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=cfg.sweep.max_concurrent)


def trial_dirname(trial) -> str:
    """Trial folders are named by trial id: the results of a trial that never reported are
    still matched to its MLflow run."""
    return trial.trial_id


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
        if tracking.tracking_uri() != self.tracking_uri:
            raise RuntimeError(f"the driver logs to {tracking.tracking_uri()}, the sweep to {self.tracking_uri}")
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


def start(cfg: Config, folder: Path, uri: str, space_file: Path | None, space: dict,
          parent_of: str | None) -> TrialSetup:
    """A new sweep: decode once, pin the split, open the parent run, write the resume state."""
    from core.data import save_split
    from core.inputs import resolve_inputs

    inputs = resolve_inputs(cfg)  # the only decode of the sweep: trials find the cache built
    folder.mkdir(parents=True, exist_ok=True)
    split_file = save_split(inputs.split, folder / "split.csv")
    own_split = set(SPLIT_KEYS) & set(sampled_keys(space))  # e.g. a study over folds
    base = trial_base(cfg, None if own_split else split_file, inputs.cache.path.parent)
    parent = RunLogger.create(cfg.experiment, cfg.tracking.run_name or f"sweep-{folder.name}",
                              tags={names.SWEEP_PARENT_TAG: "1", names.STAGE_TAG: cfg.stage, names.SWEEP_FOLDER_TAG: str(folder),
                                    names.SEARCH_TAG: cfg.sweep.search,
                                    **inputs.tags()},
                              parent_run_id=parent_of)
    parent.log_params(cfg.flat())
    with tempfile.TemporaryDirectory() as tmp:
        parent.log_artifact(cfg.save(Path(tmp) / "sweep_config.yaml"), "sweep")
        if space_file is not None:
            shutil.copyfile(space_file, Path(tmp) / "search_space.yaml")
        else:  # a grid study: the grid is the space
            (Path(tmp) / "search_space.yaml").write_text(yaml.safe_dump(cfg.sweep.grid, sort_keys=False))
        (Path(tmp) / "search_space_narrowed.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
        for name in ("search_space.yaml", "search_space_narrowed.yaml"):
            parent.log_artifact(Path(tmp) / name, "sweep")
    parent.log_artifact(split_file, "sweep")
    s = cfg.sweep
    setup = TrialSetup(stage=cfg.stage, base=base.to_dict(), parent_run_id=parent.run_id, tracking_uri=uri,
                       name=folder.name, storage=str(folder.parent), cpus=s.cpus_per_trial, gpus=s.gpus_per_trial,
                       workers=s.workers_per_trial)
    state = {"setup": asdict(setup), "sampled": sampled_keys(space), "metric": METRICS[cfg.stage],
             "max_t": s.max_t or cfg.train.epochs, "epochs": cfg.train.epochs}
    (folder / names.SWEEP_STATE_FILE).write_text(json.dumps(state, indent=1))
    return setup


def check_resume(state_file: Path, resume: bool) -> None:
    """A new sweep must not land on an existing one, and --resume needs one to continue."""
    if state_file.is_file() and not resume:
        raise ConfigError(f"a sweep of this config already lives in {state_file.parent}; continue it with "
                          "--resume, or set sweep.name to start another")
    if resume and not state_file.is_file():
        raise ConfigError(f"nothing to resume in {state_file.parent}; run the same command without --resume")


def read_state(folder: Path, uri: str) -> dict[str, Any]:
    state_file = folder / names.SWEEP_STATE_FILE
    if not tune.Tuner.can_restore(str(folder)):
        raise ConfigError(f"no sweep to resume in {folder}: it stopped before its first trial; "
                          "remove the folder and run the same command without --resume")
    state = json.loads(state_file.read_text())
    if state["setup"]["tracking_uri"] != uri:
        raise ConfigError(f"the sweep in {folder} logs to {state['setup']['tracking_uri']}, but MLFLOW_TRACKING_URI "
                          f"is {uri}; set MLFLOW_TRACKING_URI to the sweep's store to resume it")
    return state


def search_space(cfg: Config) -> tuple[Path | None, dict[str, Any]]:
    """Check a stage sweep's settings and resolve its narrowed search space (a grid study's
    space is its grid; it has no file)."""
    check_sweep(cfg)
    if cfg.sweep.search == "grid":
        space_file, space = None, grid_space(cfg.sweep.grid)
    else:
        # a pretraining method other than SimCLR searches its own knobs unless sweep.space names a file
        own = cfg.stage == "pretrain" and cfg.pretrain.method != "simclr"
        space_file = space_path(f"pretrain_{cfg.pretrain.method}" if own else cfg.stage, cfg.sweep.space)
        space = narrow(load_space(space_file), cfg.sweep.narrow)
    check_keys(space, cfg)
    return space_file, space


def check_inits(cfg: Config, space: dict[str, Any]) -> None:
    """Every `runs:/RUN` a fine-tune sweep starts from must exist before any trial starts."""
    spec = space.get("finetune.init", cfg.finetune.init)
    inits = spec["values"] if isinstance(spec, dict) else [spec]
    for init in inits:
        if cfg.stage == "finetune" and str(init).startswith("runs:/"):
            ref = str(init)[len("runs:/"):].strip("/").split("/")[0]
            if tracking.find_run(ref, stage="pretrain") is None:
                raise ConfigError(f"finetune.init '{init}': no pretrain run with that id or name in "
                                  f"{tracking.tracking_uri()}; pass the id of a finished `skinclr pretrain` run")


def run_sweep(cfg: Config, resume: bool = False, parent_of: str | None = None) -> SweepOutcome:
    """One stage's sweep, new or resumed; `parent_of` nests its parent run (pipeline)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

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
                # A trial that survives every rung ends on its own and its runner closes its
                # run; ASHA stops it only if max_t < epochs. Each trial gets a fresh process: a
                # stopped trial's thread never returns (see trainables.report_to_tune).
                scheduler=FIFOScheduler() if grid else ASHAScheduler(
                    time_attr="epoch", max_t=state["max_t"], grace_period=s.grace_period,
                    reduction_factor=s.reduction_factor, stop_last_trials=state["max_t"] < state["epochs"]),
                trial_dirname_creator=trial_dirname, reuse_actors=False),
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
    grid = tuner.fit()
    return finish(grid, setup, state, folder)


def trials_table(grid, parent_run_id: str, sampled: list[str], metric: str) -> pd.DataFrame:
    """One row per trial: ids, MLflow status, sampled values, last and best metric, why it ended."""
    runs = trial_runs(parent_run_id)
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        last = result.metrics or {}
        history = result.metrics_dataframe
        best = history[metric].max() if history is not None and metric in history else None
        run = runs.get(trial_id)
        rows.append({"trial_id": trial_id, "run_id": run.info.run_id if run else "",
                     "status": run.info.status if run else "NOT_STARTED",
                     **{k: result.config.get(k) for k in sampled},
                     f"last_{metric}": last.get(metric), f"best_{metric}": best,
                     "epochs": int(last.get("epoch", 0)),
                     "stopped_by": run.data.tags.get(names.STOPPED_BY_TAG, "") if run else "error"})
    table = pd.DataFrame(rows)
    return table.sort_values(f"best_{metric}", ascending=False, na_position="last", kind="stable")


def finish(grid, setup: TrialSetup, state: dict[str, Any], folder: Path) -> SweepOutcome:
    """Trials table, parallel-coordinates figure and the best trial, on the parent run."""
    from core.metrics import plot_parallel_coordinates

    metric, sampled = state["metric"], state["sampled"]
    best_col = f"best_{metric}"
    table = trials_table(grid, setup.parent_run_id, sampled, metric)
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
    scored = table[pd.to_numeric(table[best_col], errors="coerce").notna()]
    best = scored.iloc[0] if len(scored) else None
    if best is not None:
        parent.set_tags({names.BEST_TRIAL_TAG: best["trial_id"], names.BEST_RUN_TAG: best["run_id"],
                         **{f"{names.BEST_PREFIX}{k}": best[k] for k in sampled}})
        parent.log_metrics({best_col: float(best[best_col])}, step=0)
    unfinished = table["status"].isin(["RUNNING", "KILLED"]).any()
    parent.set_tags({names.TRIALS_TAG: len(table), names.TRIALS_FINISHED_TAG: int((table["status"] == "FINISHED").sum())})
    parent.end("KILLED" if unfinished else "FINISHED" if best is not None else "FAILED")
    shown = table.drop(columns=["run_id"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    if unfinished:
        print(f"[sweep] interrupted; continue with the same command and --resume ({folder})", flush=True)
    elif best is not None:
        print(f"[sweep] best trial {best['trial_id']} (MLflow run {best['run_id']}): {metric} {best[best_col]:.4f}",
              flush=True)
    return SweepOutcome(setup.parent_run_id, metric, table, best["trial_id"] if best is not None else None,
                        best["run_id"] if best is not None else None,
                        float(best[best_col]) if best is not None else None, folder)


@contextmanager
def ray_session():
    """Join the cluster in RAY_ADDRESS, or start a local Ray for this command and stop it after."""
    import ray

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
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def pipeline_stages(cfg: Config, extra: dict[str, str]) -> tuple[Config, Config, bool]:
    """The pipeline's pretrain and fine-tune configs, and whether fine-tuning is a sweep (its
    file has a sweep section) or one run. Fine-tuning reads the pretrain stage's data and logs
    to the pipeline's experiment, so the UI nests every run under the pipeline's."""
    if not extra.get("finetune_config"):
        raise ConfigError("a pipeline needs sweep.finetune_config: the fine-tune config (with a sweep section "
                          "to sweep, without one for a single run)")
    folder = sweep_folder(cfg, extra)
    pre = copy.deepcopy(cfg)
    ft_file = project_path(extra["finetune_config"])
    ft, _ = load_sweep_config(ft_file, [])
    if ft.stage != "finetune":
        raise ConfigError(f"sweep.finetune_config '{extra['finetune_config']}' is a {ft.stage} config; "
                          "point it at a config with stage: finetune")
    ft.data = copy.deepcopy(cfg.data)
    ft.tracking.experiment = cfg.experiment
    for stage_cfg in (pre, ft):
        stage_cfg.sweep.stage = stage_cfg.stage
        stage_cfg.sweep.name = f"{folder.name}-{stage_cfg.stage}"
        stage_cfg.sweep.storage = str(folder.parent)
    ft_sweeps = "sweep" in (yaml.safe_load(ft_file.read_text()) or {})
    return pre, ft, ft_sweeps


def run_pipeline(cfg: Config, extra: dict[str, str], resume: bool) -> int:
    """Pretrain sweep -> fine-tune (a sweep, or one run) from the best pretrain trial ->
    evaluation of the best fine-tuned model, all under one top-level MLflow run. The pipeline's
    folder records each finished step, so --resume picks up where it stopped."""
    from core.runner import run_finetune

    pre_cfg, ft_cfg, ft_sweeps = pipeline_stages(cfg, extra)
    driver_tracking_uri()
    tracking.ensure_experiment(cfg.experiment)
    folder = sweep_folder(cfg, extra)
    state_file = folder / names.PIPELINE_STATE_FILE
    check_resume(state_file, resume)
    if resume:
        state = json.loads(state_file.read_text())
        top = RunLogger(state["run_id"])
        top.reopen()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        top = RunLogger.create(cfg.experiment, cfg.tracking.run_name or f"pipeline-{folder.name}",
                               tags={names.PIPELINE_PARENT_TAG: "1", names.STAGE_TAG: "pipeline"})
        top.log_params(cfg.flat())
        top.log_artifact(project_path(extra["finetune_config"]), "pipeline")
        state = {"run_id": top.run_id}
        state_file.write_text(json.dumps(state))

    def sweep_stage(stage_cfg: Config) -> SweepOutcome:
        started = (sweep_folder(stage_cfg) / names.SWEEP_STATE_FILE).is_file()
        return run_sweep(stage_cfg, resume=started, parent_of=top.run_id)

    def record(**done) -> None:
        state.update(done)
        state_file.write_text(json.dumps(state))

    pre = sweep_stage(pre_cfg)
    if pre.best_run_id is None:
        top.end("FAILED")
        print("[pipeline] no pretrain trial finished an epoch; nothing to fine-tune", flush=True)
        return 1
    ft_cfg.data.split_file = str(pre.folder / "split.csv")
    ft_cfg.finetune.init = f"runs:/{pre.best_run_id}"
    if ft_sweeps:
        ft = sweep_stage(ft_cfg)
        best_run, best_value = ft.best_run_id, ft.best_value
    elif "finetune_run_id" in state:
        best_run, best_value = state["finetune_run_id"], state["finetune_best"]
    else:
        best_run = run_finetune(ft_cfg, parent_run_id=top.run_id, tags={names.PIPELINE_RUN_TAG: top.run_id}).run_id
        best_value = tracking.client().get_run(best_run).data.metrics.get("best_val_balanced_accuracy")
        record(finetune_run_id=best_run, finetune_best=best_value)
    top.set_tags({names.BEST_PRETRAIN_TAG: pre.best_run_id, names.BEST_FINETUNE_TAG: best_run or ""})
    top.log_metrics({f"best_{pre.metric}": pre.best_value,
                     **({"best_val_balanced_accuracy": best_value} if best_value is not None else {})}, step=0)
    if best_run is None:
        top.end("FAILED")
        print("[pipeline] no fine-tune trial finished an epoch", flush=True)
        return 1
    if extra.get("eval_data") and "eval_run_id" not in state:
        from core.evaluate import evaluate

        report = evaluate(f"runs:/{best_run}/model", extra["eval_data"], experiment=cfg.experiment)
        RunLogger(report["run_id"]).set_tags({names.PARENT_TAG: top.run_id})  # nest it under the pipeline
        top.log_metrics({"test_balanced_accuracy": report["balanced_accuracy"],
                         "test_accuracy": report["accuracy"]}, step=0)
        top.set_tags({names.EVAL_DATA_TAG: extra["eval_data"], names.EVAL_RUN_TAG: report["run_id"]})
        record(eval_run_id=report["run_id"])
        print(f"[pipeline] best model runs:/{best_run}/model on {extra['eval_data']}: balanced accuracy "
              f"{report['balanced_accuracy']:.4f}, accuracy {report['accuracy']:.4f}", flush=True)
    top.end("FINISHED")
    print(f"[pipeline] done: MLflow run {top.run_id}; best pretrain run {pre.best_run_id}, "
          f"best fine-tune run {best_run} (val balanced accuracy {best_value})", flush=True)
    return 0


def main(config_path: str | Path | None, overrides: list[str] | None = None, resume: bool = False) -> int:
    """`skinclr sweep --config F [--set k=v ...] [--resume]`; returns the exit code."""
    cfg, extra = load_sweep_config(config_path, overrides)
    if cfg.sweep.stage == "pipeline":  # every config error surfaces before Ray starts
        pre, ft, ft_sweeps = pipeline_stages(cfg, extra)
        for stage_cfg in (pre, ft) if ft_sweeps else (pre,):
            search_space(stage_cfg)
        check_resume(sweep_folder(cfg, extra) / names.PIPELINE_STATE_FILE, resume)
    else:
        _, space = search_space(cfg)
        check_resume(sweep_folder(cfg) / names.SWEEP_STATE_FILE, resume)
        if not resume:
            check_inits(cfg, space)
    with ray_session():
        if cfg.sweep.stage == "pipeline":
            return run_pipeline(cfg, extra, resume)
        outcome = run_sweep(cfg, resume=resume)
    if outcome.best_run_id is None:
        print(f"[sweep] no trial reported {outcome.metric}; the trials' errors are in {outcome.folder}", flush=True)
        return 1
    return 0
