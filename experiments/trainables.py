"""Ray Tune trainables: one trial is one `run_pretrain` / `run_finetune` call, reported to Tune.

The runner owns the loop, the MLflow run and the resume checkpoint; a trial only applies its
sampled values to the sweep's base config and, after every epoch, hands Tune the epoch's
metrics and a checkpoint directory (the runner's `checkpoint.pt` plus `trial.json` naming the
MLflow run). A restored trial puts that file back where the runner looks for it and passes the
run id, so it continues its own MLflow child run instead of opening a second one.

With a tracking server (a cluster), a trial may be restarted on another node than the one that
ran it: the runner's file then lives in the sweep's folder, which every node reads (as Tune's
checkpoints do), never only on the node that wrote it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray import tune

from core import tracking
from core.config import Config, set_value
from core.runner import checkpoint_root, run_finetune, run_pretrain
from core.runtime import load_checkpoint
from core.tracking import RunLogger
from core import names

METRICS = {"pretrain": "knn_balanced_accuracy", "finetune": "val_balanced_accuracy"}


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


def trial_config(setup: TrialSetup, params: dict[str, Any]) -> Config:
    """The base config with this trial's sampled values applied."""
    cfg = Config()
    for key, value in setup.base.items():
        set_value(cfg, key, value)
    for key, value in params.items():
        set_value(cfg, key, value)
    return cfg


def use_driver_store(setup: TrialSetup) -> None:
    """Point this process at the driver's tracking store, and make sure it took."""
    os.environ["MLFLOW_TRACKING_URI"] = setup.tracking_uri
    if tracking.tracking_uri() != setup.tracking_uri:
        raise RuntimeError(f"trial would log to {tracking.tracking_uri()}, not the sweep's store {setup.tracking_uri}")


def use_sweep_checkpoints(setup: TrialSetup) -> None:
    """With a tracking server, keep the runner's resume file in the sweep's folder (shared by every
    node); with a local SQLite store it stays beside the store (`core.runner.checkpoint_root`)."""
    if not setup.tracking_uri.startswith("sqlite:"):
        os.environ["SKINCLR_CHECKPOINTS"] = str(Path(setup.storage) / setup.name / "runner-checkpoints")


def trial_runs(parent_run_id: str) -> dict[str, Any]:
    """Trial id -> MLflow child run of a sweep (runs are found by tag, so a trial that failed
    before its first report is found too)."""
    c = tracking.client()
    experiment_id = c.get_run(parent_run_id).info.experiment_id
    runs = c.search_runs([experiment_id], filter_string=f"tags.`{names.PARENT_TAG}` = '{parent_run_id}'",
                         max_results=10_000)
    return {r.data.tags[names.TRIAL_TAG]: r for r in runs if names.TRIAL_TAG in r.data.tags}


def place_checkpoint(run_id: str, source: Path) -> None:
    """Put the newer of Tune's checkpoint and the runner's own file where the runner resumes.

    Tune's copy can lag the runner's file (saved, then killed before Tune recorded the report).
    ASHA counts the reported `epoch`, not Tune's report count, so resuming from the newer file
    shifts nothing and repeats no finished epoch."""
    target = checkpoint_root() / run_id / "checkpoint.pt"
    if target.is_file() and load_checkpoint(target)["epoch"] >= load_checkpoint(source)["epoch"]:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.restore")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def restored_run(checkpoint, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run a (re)started trial continues, with its checkpoint in place; None: a new trial.

    Without a Tune checkpoint, the runner's own file (if this machine has one) continues the run;
    with neither, the run starts over from epoch 1."""
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run_id = json.loads((Path(folder) / names.TRIAL_STATE_FILE).read_text())["run_id"]
            place_checkpoint(run_id, Path(folder) / "checkpoint.pt")
        return run_id
    run = trial_runs(parent_run_id).get(trial_id)
    return run.info.run_id if run is not None else None


def epoch_metrics(record, run_id: str) -> dict[str, Any]:
    """The epoch's metrics for Tune, with the epoch, whether the loop stops early after it, and
    the MLflow run (so the trials table can name it)."""
    metrics = {k: float(v) for k, v in record.metrics.items() if isinstance(v, (int, float))}
    return {**metrics, "epoch": record.epoch, "early_stop": int(record.stop), "mlflow_run_id": run_id}


def checkpoint_dir(folder: str, checkpoint_file: Path, run_id: str, epoch: int) -> str:
    """Fill a temporary folder with what a restore needs; a hard link costs no copy (the runner
    replaces its file by rename, so the linked version stays intact)."""
    target = Path(folder) / "checkpoint.pt"
    try:
        os.link(checkpoint_file, target)
    except OSError:  # another file system
        shutil.copyfile(checkpoint_file, target)
    (Path(folder) / names.TRIAL_STATE_FILE).write_text(json.dumps({"run_id": run_id, "epoch": epoch}))
    return folder


def report_to_tune(record, checkpoint_file: Path, run_id: str) -> None:
    """`on_epoch` of a single-process trial."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir(folder, checkpoint_file, run_id, record.epoch))
        try:
            tune.report(epoch_metrics(record, run_id), checkpoint=checkpoint)
        except SystemExit:
            # Tune stops a trial (ASHA, or the sweep ending) by raising SystemExit at its next
            # report. Unwinding through the runner would mark the MLflow run FAILED after the
            # driver closed it as stopped; the driver owns the run's end, so this thread waits
            # for the actor to go away instead.
            threading.Event().wait()


def trial_tags(setup: TrialSetup, params: dict[str, Any], trial_id: str) -> dict[str, str]:
    resources = f"{setup.workers} x ({setup.cpus:g} CPU" + (f", {setup.gpus:g} GPU)" if setup.gpus else ")")
    import ray

    return {names.TRIAL_TAG: trial_id, names.SWEEP_RUN_TAG: setup.parent_run_id, names.TRIAL_RESOURCES_TAG: resources,
            names.NODE_TAG: ray.util.get_node_ip_address(), **{f"{names.SAMPLED_PREFIX}{k}": str(v) for k, v in params.items()}}


def quiet_ray_logs() -> None:
    """Ray Train logs every checkpoint at INFO; a trial's own warnings still show."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """A single-process trial (`sweep.workers_per_trial` 1)."""
    quiet_ray_logs()
    use_driver_store(setup)
    use_sweep_checkpoints(setup)
    context = tune.get_context()
    cfg = trial_config(setup, params)
    cfg.tracking.run_name = context.get_trial_name()
    run_id = restored_run(tune.get_checkpoint(), setup.parent_run_id, context.get_trial_id())
    run = tracking.client().get_run(run_id) if run_id else None
    if run is not None and run.info.status == "FINISHED":
        # It ended just before its driver was killed, before Tune saved that: repeat its last
        # epoch's metrics for Tune instead of training again.
        tune.report({**run.data.metrics, "epoch": int(run.data.tags.get(names.EPOCHS_RUN_TAG, 0)),
                     "early_stop": int(names.EARLY_STOPPED_TAG in run.data.tags), "mlflow_run_id": run_id})
        return
    runner = run_pretrain if setup.stage == "pretrain" else run_finetune
    runner(cfg, run_id=run_id, parent_run_id=setup.parent_run_id, tags=trial_tags(setup, params, context.get_trial_id()),
           on_epoch=report_to_tune, progress=False)


def run_distributed_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """A data-parallel pretraining trial: a Ray Train `TorchTrainer` of `setup.workers` processes.

    Ray Train keeps its own checkpoints under `<storage>/<sweep>-train/<trial id>`; a restored
    trial starts a trainer of the same name, which resumes from the latest of them."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    per_worker = {"CPU": setup.cpus, **({"GPU": setup.gpus} if setup.gpus else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"params": params, "setup": setup, "trial_id": context.get_trial_id(),
                           "trial_name": context.get_trial_name()},
        scaling_config=ray.train.ScalingConfig(num_workers=setup.workers, use_gpu=setup.gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=context.get_trial_id(), storage_path=f"{setup.storage}/{setup.name}-train",
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def train_worker(config: dict[str, Any]) -> None:
    """One process of a data-parallel trial. Rank 0 logs to the sweep's MLflow child run and
    reports checkpoints; the other ranks run the same loop against a private scratch store
    (discarded), so each epoch is logged once."""
    import ray.train

    quiet_ray_logs()
    params, setup = config["params"], config["setup"]
    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    cfg = trial_config(setup, params)
    cfg.tracking.run_name = config["trial_name"]
    scratch = None
    if rank == 0:
        use_driver_store(setup)
        use_sweep_checkpoints(setup)
        run_id = restored_run(checkpoint, setup.parent_run_id, config["trial_id"])
        tags = trial_tags(setup, params, config["trial_id"])
    else:
        scratch = tempfile.mkdtemp(prefix=f"skinclr-rank{rank}-")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        os.environ["SKINCLR_CHECKPOINTS"] = f"{scratch}/checkpoints"
        run_id = RunLogger.create(cfg.experiment).run_id
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                place_checkpoint(run_id, Path(folder) / "checkpoint.pt")
        tags = {}
    try:
        run_pretrain(cfg, run_id=run_id, parent_run_id=setup.parent_run_id if rank == 0 else None, tags=tags,
                     on_epoch=report_to_train(rank), progress=False, distributed=True)
    finally:
        if scratch is not None:  # its store and checkpoints duplicate rank 0's: hundreds of MB a trial
            shutil.rmtree(scratch, ignore_errors=True)


def report_to_train(rank: int) -> Callable:
    """`on_epoch` of a data-parallel worker: every rank reports (Ray Train waits for all of
    them), rank 0 with the checkpoint."""
    import ray.train

    def on_epoch(record, checkpoint_file: Path, run_id: str) -> None:
        if rank != 0:
            ray.train.report(epoch_metrics(record, run_id))
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir(folder, checkpoint_file, run_id, record.epoch))
            ray.train.report(epoch_metrics(record, run_id), checkpoint=checkpoint)

    return on_epoch


def make_trainable(setup: TrialSetup):
    """The trainable Tune runs, with the trial's resources attached."""
    if setup.workers > 1:
        # The trial process only waits on its trainer, whose workers ask for the CPUs and GPUs;
        # Tune refuses an empty request, so it holds a token share of a CPU.
        return tune.with_resources(tune.with_parameters(run_distributed_trial, setup=setup), {"cpu": 0.01})
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": setup.cpus, "gpu": setup.gpus})
