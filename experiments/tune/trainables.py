"""Ray Tune trainables: one trial is one `run_pretrain` / `run_finetune` call, reported to Tune.

The runner owns the loop, the MLflow run and the resume checkpoint: the one record of where a
trial stands. A trial applies its sampled values to the sweep's base config, opens the inputs
the driver resolved (it never scans the dataset folder) and, after every epoch, hands Tune the
epoch's metrics and a checkpoint that only points at the runner's: the run id and the epoch. A
restored trial continues that MLflow run from the runner's own checkpoint, however far past
Tune's last report it got.

With a tracking server (a cluster), a trial may be restarted on another node than the one that
ran it: the runner's checkpoints then live in the sweep's folder, which every node reads (as
Tune's checkpoints do), never only on the node that wrote them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from skinclr.track import store, tracking
from skinclr.config import Config, set_value, validate
from skinclr.track.store import retrying
from skinclr.run.runner import run_finetune, run_pretrain
from skinclr import names
from skinclr.track.store import checkpoint_root

METRICS = {"pretrain": "knn_balanced_accuracy", "finetune": "val_balanced_accuracy"}
MODE = "max"  # every stage's metric is a score: the search and the charts look for its highest


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one sweep shares; it travels to the trial processes with the trainable."""
    stage: str  # pretrain | finetune
    base: dict  # the resolved base config (Config.to_dict()), split file and cache already pinned
    parent_run_id: str  # the sweep's MLflow parent run
    tracking_uri: str  # the driver's store: trials must log there, never to a local default
    name: str  # the sweep's folder name under `storage`
    storage: str  # Ray results folder (absolute)
    cpus: float = 1.0  # per process
    gpus: float = 0.0  # per process
    workers: int = 1  # >1: data-parallel trial through Ray Train
    command: str = ""  # the sweep's command line, tagged on every trial's run

    @property
    def folder(self) -> Path:
        """The sweep's folder: its state, its split and resolved inputs, every node reads it."""
        return Path(self.storage) / self.name


def trial_config(setup: TrialSetup, params: dict[str, Any]) -> Config:
    """The base config with this trial's sampled values applied, validated as every run's is."""
    cfg = Config()
    for key, value in {**setup.base, **params}.items():
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def resolved_inputs(setup: TrialSetup) -> Path | None:
    """The inputs the driver resolved for every trial; None for a sweep started before drivers
    wrote them (its trials read the folder, as they did then)."""
    path = setup.folder / names.INPUTS_FILE
    return path if path.is_file() else None


def use_driver_store(setup: TrialSetup) -> None:
    """Point this process at the driver's tracking store, and make sure it took. Every process
    that logs (a trial, rank 0 of a data-parallel one) calls it once, at its start."""
    os.environ["MLFLOW_TRACKING_URI"] = setup.tracking_uri
    if store.tracking_uri() != setup.tracking_uri:
        raise RuntimeError(f"trial would log to {store.tracking_uri()}, not the sweep's store {setup.tracking_uri}")


def use_sweep_checkpoints(setup: TrialSetup) -> None:
    """Every process of a trial, whatever its node and its store setting, keeps the runner's
    checkpoints in one place: beside the sweep's SQLite store, or, with a tracking server, in the
    sweep's folder (shared by every node)."""
    if setup.tracking_uri.startswith("sqlite:"):
        os.environ["SKINCLR_CHECKPOINTS"] = str(checkpoint_root(setup.tracking_uri))
    else:
        os.environ["SKINCLR_CHECKPOINTS"] = str(setup.folder / "runner-checkpoints")


def trial_runs(parent_run_id: str) -> dict[str, Any]:
    """Trial id -> MLflow child run of a sweep (runs are found by tag, so a trial that failed
    before its first report is found too). Like a run's writes, it waits out a store outage:
    trials starting and the driver's callbacks ask it at any moment."""
    c = tracking.client()

    def search():
        experiment_id = c.get_run(parent_run_id).info.experiment_id
        return c.search_runs([experiment_id], filter_string=f"tags.`{names.PARENT_TAG}` = '{parent_run_id}'",
                             max_results=10_000)

    runs = retrying("finding the sweep's trial runs", search)
    return {r.data.tags[names.TRIAL_TAG]: r for r in runs if names.TRIAL_TAG in r.data.tags}


def pointer(folder: str | Path, run_id: str, epoch: int) -> str:
    """Fill a folder with all a trial's Tune checkpoint holds: the MLflow run and its epoch."""
    (Path(folder) / names.TRIAL_STATE_FILE).write_text(json.dumps({"run_id": run_id, "epoch": epoch}))
    return str(folder)


def restored_run(checkpoint, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run a (re)started trial continues; None: a new trial. Tune's checkpoint names
    it; without one (a trial that had not reported yet), the run tagged with the trial id."""
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / names.TRIAL_STATE_FILE).read_text())["run_id"]
    run = trial_runs(parent_run_id).get(trial_id)
    return run.info.run_id if run is not None else None


def finished_result(run_id: str | None) -> dict[str, Any] | None:
    """The last result of a trial whose run already finished (just before its driver was killed,
    before Tune saved that), to repeat for Tune instead of training again; None otherwise."""
    run = retrying("reading the trial's run", lambda: tracking.client().get_run(run_id)) if run_id else None
    if run is None or run.info.status != "FINISHED":
        return None
    return {**run.data.metrics, "epoch": int(run.data.tags.get(names.EPOCHS_RUN_TAG, 0)),
            "early_stop": int(names.EARLY_STOPPED_TAG in run.data.tags), "mlflow_run_id": run_id}


def epoch_metrics(record, run_id: str) -> dict[str, Any]:
    """The epoch's metrics for Tune, with the epoch, whether the loop stops early after it, and
    the MLflow run (so the trials table can name it)."""
    metrics = {k: float(v) for k, v in record.metrics.items() if isinstance(v, (int, float))}
    return {**metrics, "epoch": record.epoch, "early_stop": int(record.stop), "mlflow_run_id": run_id}


def report_to_tune(record, run_id: str) -> None:
    """`on_epoch` of a single-process trial."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = tune.Checkpoint.from_directory(pointer(folder, run_id, record.epoch))
        try:
            tune.report(epoch_metrics(record, run_id), checkpoint=checkpoint)
        except SystemExit:
            # Tune stops a trial (ASHA, or the sweep ending) by raising SystemExit at its next
            # report. The driver owns the run's end (it closes it as stopped): the runner unwinds
            # without marking it, and run_trial hands the exit back to Tune.
            raise tracking.Stopped() from None


def trial_name(trial, first: int = 0) -> str:
    """Tune's name of a trial (its `trial_name_creator`): `trial N`, its place in the sweep counted
    from 0 as Optuna numbers the trials of its study (the search's own count leads Tune's
    experiment tag and starts at `first`)."""
    head = trial.experiment_tag.split("_", 1)[0]
    return f"trial {int(head) - first}" if head.isdigit() else trial.trial_id


def trial_run_name(cfg: Config, params: dict[str, Any], name: str, trial_id: str) -> str:
    """A trial's MLflow run name, saying what it is: stage, method or init, the seed when the
    sweep varies it, and its trial number (`pretrain simclr trial 3`, `finetune from 1a2b3c4d seed
    1 trial 5`); a trial Tune named otherwise (a sweep begun before trials were numbered) gives
    its trial id."""
    if cfg.stage == "pretrain":
        what = cfg.pretrain.method
    else:
        init = cfg.finetune.init
        what = ("probe " if cfg.finetune.linear_probe else "") + \
            (init if init in ("scratch", "imagenet") else f"from {Path(init.removeprefix('runs:/')).name[:8]}")
    seed = f" seed {cfg.train.seed}" if "train.seed" in params else ""
    number = name.removeprefix("trial ") if re.fullmatch(r"trial \d+", name) else trial_id
    return f"{cfg.stage} {what}{seed} trial {number}"


def trial_tags(setup: TrialSetup, params: dict[str, Any], trial_id: str) -> dict[str, str]:
    resources = f"{setup.workers} x ({setup.cpus:g} CPU" + (f", {setup.gpus:g} GPU)" if setup.gpus else ")")
    import ray

    return {names.TRIAL_TAG: trial_id, names.SWEEP_RUN_TAG: setup.parent_run_id, names.TRIAL_RESOURCES_TAG: resources,
            **({names.COMMAND_TAG: setup.command} if setup.command else {}),
            names.NODE_TAG: ray.util.get_node_ip_address(), **{f"{names.SAMPLED_PREFIX}{k}": str(v) for k, v in params.items()}}


def enter(setup: TrialSetup, logs: bool = True) -> None:
    """A trial process's set-up, once: Ray Train's INFO line per report silenced (a trial's own
    warnings still show), the runner's checkpoint folder, and the driver's store if it logs."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    use_sweep_checkpoints(setup)
    if logs:
        use_driver_store(setup)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """A single-process trial (`sweep.workers_per_trial` 1)."""
    enter(setup)
    context = tune.get_context()
    run_id = restored_run(tune.get_checkpoint(), setup.parent_run_id, context.get_trial_id())
    done = finished_result(run_id)
    if done is not None:
        tune.report(done)
        return
    cfg = trial_config(setup, params)
    cfg.tracking.run_name = trial_run_name(cfg, params, context.get_trial_name(), context.get_trial_id())
    runner = run_pretrain if setup.stage == "pretrain" else run_finetune
    try:
        runner(cfg, resolved=resolved_inputs(setup), run_id=run_id, parent_run_id=setup.parent_run_id,
               tags=trial_tags(setup, params, context.get_trial_id()), on_epoch=report_to_tune, progress=False)
    except tracking.Stopped:
        # Exit 0 is Tune's "stopped as asked": the thread ends at once, without the last report
        # a returning trial makes (which would wait forever), so the process can take the next trial.
        raise SystemExit(0) from None


def run_distributed_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """A data-parallel pretraining trial: a Ray Train `TorchTrainer` of `setup.workers` processes.

    This process finds the run the trial continues, as a single-process trial does, and hands
    its id to every worker: all ranks resume from the runner's checkpoint of that run, so Ray
    Train keeps no checkpoints of its own."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    enter(setup)
    context = tune.get_context()
    run_id = restored_run(tune.get_checkpoint(), setup.parent_run_id, context.get_trial_id())
    done = finished_result(run_id)
    if done is not None:
        tune.report(done)
        return
    per_worker = {"CPU": setup.cpus, **({"GPU": setup.gpus} if setup.gpus else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"params": params, "setup": setup, "run_id": run_id, "trial_id": context.get_trial_id(),
                           "trial_name": context.get_trial_name()},
        scaling_config=ray.train.ScalingConfig(num_workers=setup.workers, use_gpu=setup.gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=context.get_trial_id(), storage_path=f"{setup.storage}/{setup.name}-train",
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def train_worker(config: dict[str, Any]) -> None:
    """One process of a data-parallel trial. Rank 0 logs to the sweep's MLflow child run and
    writes the checkpoint; the other ranks run the same loop and record nothing (they open no
    tracking store), so each epoch is logged once."""
    import ray.train

    params, setup = config["params"], config["setup"]
    rank = ray.train.get_context().get_world_rank()
    enter(setup, logs=rank == 0)
    cfg = trial_config(setup, params)
    cfg.tracking.run_name = trial_run_name(cfg, params, config["trial_name"], config["trial_id"])
    tags = trial_tags(setup, params, config["trial_id"]) if rank == 0 else {}
    run_pretrain(cfg, resolved=resolved_inputs(setup), run_id=config["run_id"], parent_run_id=setup.parent_run_id,
                 tags=tags, on_epoch=report_to_train, progress=False, distributed=True, rank=rank)


def report_to_train(record, run_id: str) -> None:
    """`on_epoch` of a data-parallel worker: every rank reports (Ray Train waits for all of them)."""
    import ray.train

    ray.train.report(epoch_metrics(record, run_id))


def make_trainable(setup: TrialSetup):
    """The trainable Tune runs, with the trial's resources attached."""
    if setup.workers > 1:
        # The trial process only waits on its trainer, whose workers ask for the CPUs and GPUs;
        # Tune refuses an empty request, so it holds a token share of a CPU.
        return tune.with_resources(tune.with_parameters(run_distributed_trial, setup=setup), {"cpu": 0.01})
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                               {"cpu": setup.cpus, "gpu": setup.gpus})
