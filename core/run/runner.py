"""One tracked run: drive a training loop, log every epoch to MLflow, checkpoint, resume.

Where a run stands has one authority: its MLflow run id and the checkpoint the runner rewrites
after every epoch under `store.checkpoint_root()/<run id>/`. Everything else only points at that pair:
a repeated command finds its run by the config's key (a tag), a Tune trial's checkpoint names the
run id and epoch, and resuming loads that one file. A finished run deletes it.

The CLI calls `run_pretrain` / `run_finetune` directly; the Ray Tune trainable calls the same
functions with `on_epoch` set (to report to Tune) and the run id it restored, so both drivers
log identically and no training loop exists twice. A data-parallel rank other than 0 runs the
same loop with `rank` set: it resumes from rank 0's checkpoint and records nothing.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from skinclr.track import store, tracking
from skinclr.config import Config, ConfigError, hash_items
from skinclr.train.engine import EpochRecord, step_precision
from skinclr.train.finetune import finetune
from skinclr.train.finetune import resolve_init
from skinclr.data.inputs import Inputs, load_inputs
from skinclr.train.methods import pretrain
from skinclr.runtime import BusyError, lock
from skinclr.runtime import check_devices, describe_device, load_checkpoint, pick_device, save_atomic
from skinclr.data.split import save_split
from skinclr.track.tracking import RunLogger
from skinclr.run.records import Reports, finish_model
from skinclr import names

OnEpoch = Callable[[EpochRecord, str], None]  # (record, run id), called once the epoch's checkpoint is on disk
CHECKPOINT = "checkpoint.pt"  # in a run's checkpoint folder: the full training state after its last epoch
REPORT_EVERY_S = 30.0  # a fine-tune run (not a trial) reports its curves and better model at most this often


@dataclass
class RunResult:
    run_id: str
    status: str
    last: dict[str, float]
    best: float | None
    epochs: int


def resume_state(run_id: str) -> dict[str, Any] | None:
    """Where a run stands: the state its checkpoint holds, or None before its first epoch ended."""
    ckpt = store.checkpoint_root() / run_id / CHECKPOINT
    return load_checkpoint(ckpt) if ckpt.is_file() else None


_claims: dict = {}  # run id -> the open lock file this process holds for it


def _claim(run_id: str, wait: float = 0.0):
    _claims[run_id] = lock(store.checkpoint_root() / run_id / "run.lock", wait, holder=f"run {run_id}")


def _release(run_id: str) -> None:
    fh = _claims.pop(run_id, None)
    if fh is not None:
        fh.close()


def prepare(cfg: Config) -> None:
    """Before any data is cached or a run opened: the devices exist, the retry budget is set."""
    check_devices(cfg)
    if cfg.tracking.retry_seconds >= 0:
        store.set_retry_seconds(cfg.tracking.retry_seconds)


def run_name(cfg: Config) -> str:
    """A run's name when the config gives none, saying what it is: stage, method or init, seed."""
    if cfg.stage == "pretrain":
        return f"pretrain {cfg.pretrain.method} seed {cfg.train.seed}"
    init = cfg.finetune.init
    start = init if init in ("scratch", "imagenet") else f"from {Path(init.removeprefix('runs:/')).name[:12]}"
    probe = " probe" if cfg.finetune.linear_probe else ""
    return f"finetune{probe} {start} seed {cfg.train.seed}"


def check_batches(cfg: Config, inputs: Inputs) -> None:
    """Refuse, before a run opens, a config that would train nothing: every epoch drops its last
    incomplete batch, so a train side smaller than one batch makes no optimizer step."""
    n = len(inputs.train_rows)
    if n < cfg.train.batch_size:
        raise ConfigError(f"the train side holds {n} image(s), fewer than train.batch_size={cfg.train.batch_size}: "
                          "every batch would be dropped as incomplete and nothing would train; set "
                          f"train.batch_size to at most {n} (or give the train side more images)")


class SilentLogger:
    """The logger of a data-parallel rank other than 0: RunLogger's calls, none of them recorded
    and no store opened, since rank 0 logs every epoch once."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id or ""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


@dataclass
class Run:
    """A run as the runner holds it: where its records go, the state it resumes from, and whether
    this process is the one that writes its checkpoint and ends it."""
    logger: RunLogger | SilentLogger
    state: dict[str, Any] | None = None
    leader: bool = True

    @property
    def folder(self) -> Path:
        return store.checkpoint_root() / self.logger.run_id


def open_run(cfg: Config, inputs: Inputs, run_id: str | None, parent_run_id: str | None,
             tags: dict[str, str] | None) -> Run:
    """Resume the given run, or the newest unfinished run of the same config, or start one.

    The process holds a lock beside the run's checkpoint until the run ends, so a second
    identical command refuses, naming the run, instead of logging every epoch twice. A lock on
    the config's key makes finding and claiming the run one step for identical commands."""
    key = tracking.run_key(hash_items(cfg))  # as a sweep folder's: a renamed key keeps a run resumable
    device = pick_device(cfg.train.device)
    precision = step_precision(device, cfg.train.precision, cfg.data.image_size)
    created = False
    if run_id is None:  # (a run id given is a trial's: Tune runs one trial at a time in a process)
        with lock(store.checkpoint_root() / "locks" / f"{key}.lock", wait=60, holder=f"config {key}"):
            found = tracking.find_resumable(tracking.ensure_experiment(cfg.experiment), key) \
                if cfg.tracking.resume else None
            if found is not None:
                run_id = found.info.run_id
                try:
                    _claim(run_id)
                except BusyError as err:
                    raise BusyError(f"{err}; or set tracking.resume=false to start a separate run") from None
            else:  # born with the caller's tags: a trial's run is found by its trial id from the start
                run_id = RunLogger.create(cfg.experiment, cfg.tracking.run_name or run_name(cfg),
                                          parent_run_id=parent_run_id,
                                          tags={names.RUN_KEY_TAG: key, names.STAGE_TAG: cfg.stage, **(tags or {})}).run_id
                created = True
                _claim(run_id)
    logger, state = RunLogger(run_id), None
    try:
        with tracking.ending(logger, finish=False):  # the loop ends it; until then, a failure here does
            if not created:
                state = resume_state(run_id)
                logger.reopen()
            logger.set_tags({**inputs.tags(), names.DEVICE_TAG: describe_device(device),
                             names.PRECISION_TAG: precision, **(tags or {})})
            logger.log_params(cfg.flat())
            logger.log_datasets(inputs.sides())
            with tempfile.TemporaryDirectory() as tmp:
                logger.log_artifact(cfg.save(Path(tmp) / names.CONFIG_ARTIFACT))
                logger.log_artifact(save_split(inputs.split, Path(tmp) / "split.csv", inputs.cache))
    except BaseException:
        _release(run_id)
        raise
    return Run(logger, state)


def follow_run(run_id: str | None) -> Run:
    """A data-parallel rank other than 0: the same state rank 0 resumes from, nothing recorded."""
    return Run(SilentLogger(run_id), resume_state(run_id) if run_id else None, leader=False)


def drive(cfg: Config, loop, run: Run, on_epoch: OnEpoch | None,
          on_record: Callable[[EpochRecord, dict, Path], None] | None, progress: bool,
          finish: Callable[[], None] | None = None) -> RunResult:
    """Iterate a loop generator, logging and checkpointing each epoch; `finish` records what
    comes after the last epoch; then mark the run's end."""
    logger = run.logger
    start = run.state["epoch"] if run.state else 0
    bar = tqdm(total=cfg.train.epochs, initial=start, desc=f"{cfg.stage} {logger.run_id[:8]}", unit="epoch",
               disable=not progress)
    last, best, epoch = {}, None, start
    try:
        with tracking.ending(logger), system_metrics(cfg, logger.run_id if run.leader else None, resumed=start > 0):
            for record in loop:
                epoch, last = record.epoch, record.metrics
                logger.log_metrics(record.metrics, step=record.epoch)
                if run.leader:
                    state = record.state()
                    save_atomic(state, run.folder / CHECKPOINT)
                    if on_record:
                        on_record(record, state, run.folder)
                if on_epoch:
                    on_epoch(record, logger.run_id)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.metrics.items()
                                 if k in ("train_loss", "knn_balanced_accuracy", "val_balanced_accuracy")})
                if record.is_best:
                    best = record.metrics.get("knn_balanced_accuracy", record.metrics.get("monitor_value"))
            if finish:
                finish()
            logger.set_tags({names.EPOCHS_RUN_TAG: epoch})
    except BaseException:
        _release(logger.run_id)
        raise
    finally:
        bar.close()
    if run.leader:  # a finished run never resumes: its ~100+ MB resume state goes (models are in MLflow)
        shutil.rmtree(run.folder, ignore_errors=True)
    _release(logger.run_id)  # last: until now another process must not take the run for unfinished
    return RunResult(logger.run_id, "FINISHED", last, best, epoch)


@contextmanager
def system_metrics(cfg: Config, run_id: str | None, resumed: bool):
    """MLflow's own system metrics (`system/...`: CPU, memory, disk, network and, where present,
    GPU utilisation and memory) sampled every 10 s on a background thread while the run trains
    (`tracking.system_metrics`). A process-wide sampler: a trial sharing a GPU sees the whole card."""
    if not (cfg.tracking.system_metrics and run_id):
        yield
        return
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop notices are not news
    monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=store.tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def run_pretrain(cfg: Config, *, resolved: str | Path | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 on_epoch: OnEpoch | None = None, progress: bool = True, distributed: bool = False,
                 rank: int = 0) -> RunResult:
    """`resolved`: a sweep driver's resolved-inputs file (None: read the folder); `rank`: this
    process's place in a data-parallel run (only rank 0 records)."""
    prepare(cfg)
    inputs = load_inputs(cfg, resolved, progress=progress)
    check_batches(cfg, inputs)
    run = open_run(cfg, inputs, run_id, parent_run_id, tags) if rank == 0 else follow_run(run_id)
    logger = run.logger

    def on_record(record: EpochRecord, st: dict, ckpt_dir: Path) -> None:
        """The backbone alone, as a plain state_dict: what fine-tuning starts from."""
        save_atomic(st["backbone"], ckpt_dir / names.BACKBONE_LAST)
        if record.is_best:
            save_atomic(st["backbone"], ckpt_dir / names.BACKBONE_BEST)
        if record.is_best or record.epoch == cfg.train.epochs:
            for name in (names.BACKBONE_LAST, names.BACKBONE_BEST):
                if (ckpt_dir / name).is_file():
                    logger.log_artifact(ckpt_dir / name, names.BACKBONE_ARTIFACTS)

    loop = pretrain(cfg, inputs, resume=run.state, distributed=distributed, progress=progress)
    return drive(cfg, loop, run, on_epoch, on_record, progress)


def run_finetune(cfg: Config, *, resolved: str | Path | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 on_epoch: OnEpoch | None = None, progress: bool = True) -> RunResult:
    """`resolved`: a sweep driver's resolved-inputs file (None: read the folder)."""
    prepare(cfg)
    with tempfile.TemporaryDirectory() as work:
        checkpoint, init_tags = resolve_init(cfg, Path(work))
        inputs = load_inputs(cfg, resolved, progress=progress)
        check_batches(cfg, inputs)
        run = open_run(cfg, inputs, run_id, parent_run_id, {**init_tags, **(tags or {})})
        loop = finetune(cfg, inputs, resume=run.state, pretrain_checkpoint=checkpoint, progress=progress)
        reports = Reports(cfg, run.logger, run.folder / "report", inputs.example_path(), REPORT_EVERY_S, run.state)

        def finish() -> None:  # the last report; the saved model's decision rule and test score, once
            reports.flush()
            finish_model(cfg, run.logger, inputs, reports.model, Path(work) / "final", reports.epoch)

        result = drive(cfg, loop, run, on_epoch, lambda record, *_: reports.add(record, now=on_epoch is not None),
                       progress, finish)
    if result.epochs < cfg.train.epochs:
        RunLogger(result.run_id).set_tags({names.EARLY_STOPPED_TAG: result.epochs})
    return result
