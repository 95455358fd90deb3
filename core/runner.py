"""One tracked run: drive a training loop, log every epoch to MLflow, checkpoint, resume.

The CLI calls `run_pretrain` / `run_finetune` directly; the Ray Tune trainable calls the same
functions with `on_epoch` set (to report to Tune) and the run id it restored, so both drivers
log identically and no training loop exists twice.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from core import tracking
from core.config import Config, ConfigError
from core.engine import EpochRecord
from core.finetune import finetune
from core.inputs import Inputs, resolve_inputs
from core.models import imagenet_weights_file
from core.pretrain import pretrain
from core.runtime import (BusyError, check_devices, describe_device, load_checkpoint, lock, pick_device,
                          pixel_digest, save_atomic)
from core.tracking import RunLogger
from core import names

OnEpoch = Callable[[EpochRecord, Path, str], None]  # (record, checkpoint file, run id)


@dataclass
class RunResult:
    run_id: str
    status: str
    last: dict[str, float]
    best: float | None
    epochs: int


def checkpoint_root() -> Path:
    """Resume checkpoints live beside the local store (or in $SKINCLR_CHECKPOINTS)."""
    if os.environ.get("SKINCLR_CHECKPOINTS"):
        return Path(os.environ["SKINCLR_CHECKPOINTS"])
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "checkpoints"
    return Path.home() / ".cache" / "skinclr" / "checkpoints"


_claims: dict = {}  # run id -> the open lock file this process holds for it


def _claim(run_id: str, wait: float = 0.0):
    _claims[run_id] = lock(checkpoint_root() / run_id / "run.lock", wait, holder=f"run {run_id}")


def _release(run_id: str) -> None:
    fh = _claims.pop(run_id, None)
    if fh is not None:
        fh.close()


def prepare(cfg: Config) -> None:
    """Before any data is cached or a run opened: the devices exist, the retry budget is set."""
    check_devices(cfg)
    if cfg.tracking.retry_seconds >= 0:
        tracking.set_retry_seconds(cfg.tracking.retry_seconds)


def open_run(cfg: Config, inputs: Inputs, run_id: str | None, parent_run_id: str | None,
             tags: dict[str, str] | None) -> tuple[RunLogger, dict[str, Any] | None]:
    """Resume the given run, or the newest unfinished run of the same config, or start one.

    The process holds a lock beside the run's checkpoint until the run ends, so a second
    identical command refuses, naming the run, instead of logging every epoch twice. A lock on
    the config's key makes finding and claiming the run one step for identical commands."""
    key = tracking.run_key(cfg.flat())
    device = describe_device(pick_device(cfg.train.device))
    created = False
    if run_id is None:  # (a run id given is a trial's, and Tune runs one process per trial)
        with lock(checkpoint_root() / "locks" / f"{key}.lock", wait=60, holder=f"config {key}"):
            found = tracking.find_resumable(tracking.ensure_experiment(cfg.experiment), key) \
                if cfg.tracking.resume else None
            if found is not None:
                run_id = found.info.run_id
                try:
                    _claim(run_id)
                except BusyError as err:
                    raise BusyError(f"{err}; or set tracking.resume=false to start a separate run") from None
            else:
                run_id = RunLogger.create(cfg.experiment, cfg.tracking.run_name, parent_run_id=parent_run_id,
                                          tags={names.RUN_KEY_TAG: key, names.STAGE_TAG: cfg.stage}).run_id
                created = True
                _claim(run_id)
    logger, state = RunLogger(run_id), None
    try:
        if not created:
            ckpt = checkpoint_root() / run_id / "checkpoint.pt"
            if ckpt.is_file():
                state = load_checkpoint(ckpt)
            logger.reopen()
        logger.set_tags({**inputs.tags(), names.DEVICE_TAG: device, **(tags or {})})
        logger.log_params(cfg.flat())
        with tempfile.TemporaryDirectory() as tmp:
            logger.log_artifact(cfg.save(Path(tmp) / names.CONFIG_ARTIFACT))
            split = Path(tmp) / "split.csv"
            columns = ["image", "label", "lesion_id", "split"] + (["labelled"] if "labelled" in inputs.split else [])
            table = inputs.split[columns].copy()
            # what the model saw of each image: evaluation tells its own images from others of the same id
            images = inputs.cache.images
            table["pixels"] = [pixel_digest(images[r]) for r in inputs.cache.rows(table["image"])]
            table.to_csv(split, index=False)
            logger.log_artifact(split)
    except BaseException as err:
        _release(run_id)
        if not isinstance(err, tracking.StoreError):
            logger.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return logger, state


def drive(cfg: Config, loop, logger: RunLogger, state: dict | None, on_epoch: OnEpoch | None,
          on_record: Callable[[EpochRecord, dict, Path], None] | None, progress: bool) -> RunResult:
    """Iterate a loop generator, logging and checkpointing each epoch; mark the run's end."""
    ckpt_dir = checkpoint_root() / logger.run_id
    start = state["epoch"] if state else 0
    bar = tqdm(total=cfg.train.epochs, initial=start, desc=f"{cfg.stage} {logger.run_id[:8]}", unit="epoch",
               disable=not progress)
    last, best, epoch = {}, None, start
    try:
        for record in loop:
            epoch, last = record.epoch, record.metrics
            logger.log_metrics(record.metrics, step=record.epoch)
            state = record.state()
            ckpt = save_atomic(state, ckpt_dir / "checkpoint.pt")
            if on_record:
                on_record(record, state, ckpt_dir)
            if on_epoch:
                on_epoch(record, ckpt, logger.run_id)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.metrics.items()
                             if k in ("train_loss", "knn_balanced_accuracy", "val_balanced_accuracy")})
            if record.is_best:
                best = record.metrics.get("knn_balanced_accuracy", record.metrics.get("monitor_value"))
    except BaseException as err:
        try:
            if isinstance(err, KeyboardInterrupt):
                logger.end("KILLED")
            elif not isinstance(err, tracking.StoreError):  # a store that is gone leaves it RUNNING, resumable
                logger.end("FAILED")
        finally:
            _release(logger.run_id)
        raise
    finally:
        bar.close()
    logger.set_tags({names.EPOCHS_RUN_TAG: epoch})
    logger.end("FINISHED")
    # A finished run never resumes: its ~100+ MB resume state goes (models and backbones are in MLflow).
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    _release(logger.run_id)  # last: until now another process must not take the run for unfinished
    return RunResult(logger.run_id, "FINISHED", last, best, epoch)


def run_pretrain(cfg: Config, *, inputs: Inputs | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 on_epoch: OnEpoch | None = None, progress: bool = True, distributed: bool = False) -> RunResult:
    prepare(cfg)
    inputs = inputs or resolve_inputs(cfg, progress=progress)
    logger, state = open_run(cfg, inputs, run_id, parent_run_id, tags)

    def on_record(record: EpochRecord, st: dict, ckpt_dir: Path) -> None:
        """The backbone alone, as a plain state_dict: what fine-tuning starts from."""
        save_atomic(st["backbone"], ckpt_dir / "backbone_last.pt")
        if record.is_best:
            save_atomic(st["backbone"], ckpt_dir / "backbone_best.pt")
        if record.is_best or record.epoch == cfg.train.epochs:
            for name in ("backbone_last.pt", "backbone_best.pt"):
                if (ckpt_dir / name).is_file():
                    logger.log_artifact(ckpt_dir / name, "checkpoints")

    loop = pretrain(cfg, inputs, resume=state, distributed=distributed, progress=progress)
    return drive(cfg, loop, logger, state, on_epoch, on_record, progress)


def resolve_init(cfg: Config, workdir: Path) -> tuple[str | None, dict[str, str]]:
    """`finetune.init=runs:/RUN` -> that pretrain run's best backbone file, and link tags.

    RUN is a run id, or a run name (`tracking.run_name` of a pretrain run: its newest finished run).
    Called before the data cache is built or a run opened, so a missing init fails at once."""
    init = cfg.finetune.init
    if init == "imagenet":
        imagenet_weights_file(cfg.model.backbone, cfg.finetune.imagenet_weights or None)
    if not init.startswith("runs:/"):
        return None, ({names.INIT_TAG: init})
    run_id = tracking.find_run(init[len("runs:/"):].strip("/").split("/")[0], stage="pretrain")
    if run_id is None:
        raise ConfigError(f"finetune.init '{init}': no run with that id or name in the tracking store "
                          f"{tracking.tracking_uri()}; check MLFLOW_TRACKING_URI and the run id")
    logger = RunLogger(run_id)
    for name in ("checkpoints/backbone_best.pt", "checkpoints/backbone_last.pt"):
        path = logger.download(name, workdir)
        if path is not None:
            return str(path), {names.PRETRAIN_RUN_TAG: run_id, names.INIT_TAG: init}
    raise ConfigError(f"finetune.init '{init}': run {run_id} has no checkpoints/backbone_*.pt artifact; "
                      "is it a finished skinclr pretrain run?")


def run_finetune(cfg: Config, *, inputs: Inputs | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 on_epoch: OnEpoch | None = None, progress: bool = True) -> RunResult:
    from core import metrics as M
    from core.serving import log_model

    prepare(cfg)
    with tempfile.TemporaryDirectory() as work:
        checkpoint, init_tags = resolve_init(cfg, Path(work))
        inputs = inputs or resolve_inputs(cfg, progress=progress)
        logger, state = open_run(cfg, inputs, run_id, parent_run_id, {**init_tags, **(tags or {})})

        def on_record(record: EpochRecord, st: dict, ckpt_dir: Path) -> None:
            """Curves every epoch; the best model and its figures whenever the monitor improves,
            so a trial stopped early by a scheduler still leaves a complete run."""
            out = ckpt_dir / "report"
            out.mkdir(parents=True, exist_ok=True)
            history = record.history
            M.plot_loss_curves(history, out / "loss_curves.png")
            M.plot_accuracy_curves(history, out / "accuracy_curves.png")
            (out / "history.json").write_text(json.dumps(history, indent=1))
            files = [out / "loss_curves.png", out / "accuracy_curves.png", out / "history.json"]
            if record.is_best:
                report = record.report
                M.plot_confusion_matrix(report, out / names.CONFUSION_PNG, title=f"val, epoch {record.epoch}")
                M.write_confusion_csv(report, out / names.CONFUSION_CSV, normalized=False)
                M.write_confusion_csv(report, out / names.CONFUSION_NORMALIZED_CSV, normalized=True)
                M.report_frame(report).to_csv(out / names.CLASSIFICATION_REPORT_CSV)
                (out / "classification_report.txt").write_text(M.report_text(report))
                (out / "val_metrics.json").write_text(json.dumps(report, indent=1))
                files += [out / n for n in (names.CONFUSION_PNG, names.CONFUSION_CSV,
                                            names.CONFUSION_NORMALIZED_CSV, names.CLASSIFICATION_REPORT_CSV,
                                            "classification_report.txt", "val_metrics.json")]
                log_model(logger, record.best_model, cfg.model.backbone, cfg.data.image_size,
                          cfg.data.aspect)
                logger.log_metrics({"best_val_balanced_accuracy": report["balanced_accuracy"],
                                    "best_val_accuracy": report["accuracy"]}, step=record.epoch)
                logger.set_tags({names.BEST_EPOCH_TAG: record.epoch})
            for f in files:
                logger.log_artifact(f, "report")

        loop = finetune(cfg, inputs, resume=state, pretrain_checkpoint=checkpoint, progress=progress)
        result = drive(cfg, loop, logger, state, on_epoch, on_record, progress)
    if result.epochs < cfg.train.epochs:
        RunLogger(result.run_id).set_tags({names.EARLY_STOPPED_TAG: result.epochs})
    return result
