"""Fine-tuning and linear probing on the engine (a generator of per-epoch records), and
`finetune.init` read once: the pretrain run (by id or by name) or file a fine-tune starts from.

Plateau scheduling, early stopping and the best-model pick all watch one configurable,
optionally smoothed validation metric (val balanced accuracy by default: it jumps from epoch
to epoch on HAM10000, where val loss falls smoothly). Runs and sweeps (for each init a sweep
will try, before any trial) read the init here alone, so a trial cannot disagree with the check
its sweep made.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from skinclr import names
from skinclr.config import Config, ConfigError
from skinclr.data.inputs import Inputs, make_loader
from skinclr.names import CLASSES
from skinclr.track import store, tracking
from skinclr.track.tracking import RunLogger
from skinclr.train.augment import finetune_transform
from skinclr.train.augment_gpu import (
    DeviceBatches,
    DeviceImages,
    eval_batches,
    finetune_pipeline,
    tensor_path,
)
from skinclr.train.engine import (
    EpochRecord,
    Task,
    adam,
    compiled,
    infer,
    run,
    to_device,
)
from skinclr.train.metrics import classification_metrics
from skinclr.train.models import (
    build_classifier,
    imagenet_state_dict,
    imagenet_weights_file,
    load_backbone,
)


def init_run(init: str) -> str | None:
    """The pretrain run `finetune.init=runs:/RUN` names (RUN: a run id, or the name of a finished
    pretrain run), None for every other init; ConfigError when the store has no such run. Runs and
    sweeps (for each init a sweep will try, before any trial) read the value here alone."""
    if not init.startswith("runs:/"):
        return None
    run_id = tracking.find_run(init[len("runs:/"):].strip("/").split("/")[0], stage="pretrain")
    if run_id is None:
        raise ConfigError(f"finetune.init '{init}': no pretrain run with that id or name in the tracking store "
                          f"{store.tracking_uri()}; pass the id or name of a finished `skinclr pretrain` run "
                          "and check MLFLOW_TRACKING_URI")
    return run_id


def resolve_init(cfg: Config, workdir: Path) -> tuple[str | None, dict[str, str]]:
    """`finetune.init` -> the backbone file to start from (None: finetune reads the init itself),
    and the tags that link the run to it. Called before the data cache is built or a run opened,
    so a missing init fails at once."""
    init = cfg.finetune.init
    if init == "imagenet":
        imagenet_weights_file(cfg.model.backbone, cfg.finetune.imagenet_weights or None)
    run_id = init_run(init)
    if run_id is None:
        return None, {names.INIT_TAG: init}
    logger = RunLogger(run_id)
    for name in (names.BACKBONE_BEST, names.BACKBONE_LAST):
        path = logger.download(f"{names.BACKBONE_ARTIFACTS}/{name}", workdir)
        if path is not None:
            return str(path), {names.PRETRAIN_RUN_TAG: run_id, names.INIT_TAG: init}
    raise ConfigError(f"finetune.init '{init}': run {run_id} has no checkpoints/backbone_*.pt artifact; "
                      "is it a finished skinclr pretrain run?")


def init_backbone(model, cfg: Config, pretrain_checkpoint: str | Path | None = None) -> str:
    """Load the starting weights named by `finetune.init`; returns a description for logging.

    `runs:/RUN_ID` is resolved to a checkpoint file by the caller (it needs MLflow)."""
    init = cfg.finetune.init
    if init == "scratch":
        return "scratch"
    if init == "imagenet":
        load_backbone(model.backbone, imagenet_state_dict(cfg.model.backbone, cfg.finetune.imagenet_weights or None))
        return "imagenet"
    source = pretrain_checkpoint or init
    if not Path(source).is_file():
        raise ConfigError(f"finetune.init '{init}': no such checkpoint file; use scratch, imagenet, "
                          "runs:/RUN_ID of a pretrain run, or the path of a backbone checkpoint")
    load_backbone(model.backbone, source)
    return str(source)


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse class frequency, normalised to mean 1 (classes absent from train get weight 0)."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


class Finetuning(Task):
    """Supervised training of a classifier (the whole network, or its head on a frozen backbone)."""

    def __init__(self, cfg: Config, inputs: Inputs, pretrain_checkpoint: str | Path | None = None):
        self.cfg, self.inputs, self.pretrain_checkpoint = cfg, inputs, pretrain_checkpoint

    def setup(self, device: torch.device, resume: dict | None) -> torch.optim.Optimizer:
        cfg, ft = self.cfg, self.cfg.finetune
        self.device = device
        model = build_classifier(cfg.model.backbone, num_classes=len(CLASSES))
        self.init = init_backbone(model, cfg, self.pretrain_checkpoint) if resume is None else resume["init"]
        if ft.linear_probe:
            model.freeze_backbone()
        self.model = model.to(device, memory_format=torch.channels_last)
        self.net = compiled(self.model, cfg.train.compile)
        optimizer = adam([p for p in self.model.parameters() if p.requires_grad], cfg.train.lr, ft.weight_decay)
        self.maximize = ft.select_metric != "val_loss"
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max" if self.maximize else "min", factor=ft.lr_factor, patience=ft.lr_patience)
        weight = class_weights(self.inputs.train_labels).to(device) if ft.class_weighted_loss else None
        self.criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=ft.label_smoothing)
        self.augment = finetune_transform(cfg.data.image_size, cfg.augment.crop_min, cfg.augment.rotation,
                                          cfg.augment.color_strength)
        self.data = None
        if tensor_path(cfg.augment.device, device):
            self.use_tensor_path()
        self.history, self.best, self.best_model, self.best_report, self.stale = [], None, None, None, 0
        if resume is not None:
            self.scheduler.load_state_dict(resume["scheduler"])
            self.history, self.best, self.stale = resume["history"], resume["best"], resume["stale"]
            self.best_model, self.best_report = resume["best_model"], resume.get("best_report")
        return optimizer

    def use_tensor_path(self) -> None:
        """Augment on the training device (core/train/augment_gpu.py) instead of in CPU workers."""
        a = self.cfg.augment
        self.data = DeviceImages(self.inputs.cache, self.device)
        self.augment = finetune_pipeline(self.cfg.data.image_size, a.crop_min, a.rotation, a.color_strength,
                                         compile=self.cfg.train.compile)

    def batches(self, epoch: int):
        cfg, labels = self.cfg, self.inputs.train_labels
        weights = class_weights(labels)[labels].double() if cfg.finetune.balanced_sampler else None
        order = dict(batch_size=cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch, shuffle=True, drop_last=True)
        if self.data is not None:
            return DeviceBatches(self.data, self.inputs.train_rows, self.augment, weights=weights, **order)
        sampler = None
        if weights is not None:  # each class drawn equally often, in expectation
            sampler = torch.utils.data.WeightedRandomSampler(
                weights, len(weights), generator=torch.Generator().manual_seed(cfg.train.seed * 7 + epoch))
        return make_loader(self.inputs.cache, self.inputs.train_rows, self.augment, sampler=sampler,
                           workers=cfg.data.workers, pin_memory=self.device.type == "cuda", **order)

    def loss(self, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        return self.criterion(self.net(to_device(x, self.device)).float(), y.to(self.device)), len(y)

    def evaluate(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        ft = self.cfg.finetune
        probs, val_loss = predict(self.model, self.inputs, self.inputs.val_rows, self.cfg.data.image_size, self.device,
                                  self.data, self.cfg.finetune.tta)
        report = classification_metrics(self.inputs.val_labels, probs)
        metrics.update(val_loss=val_loss, val_accuracy=report["accuracy"],
                       val_balanced_accuracy=report["balanced_accuracy"])
        metrics.update({f"val_{what}_{name}": m[what] for name, m in report["per_class"].items()  # e.g. MEL's
                        for what in ("recall", "precision") if m[what] is not None})  # sensitivity, epoch by epoch
        self.history.append({"epoch": epoch, **metrics})
        watched = float(np.mean([h[ft.select_metric] for h in self.history[-ft.select_smoothing:]]))
        metrics["monitor_value"] = watched
        self.scheduler.step(watched)
        improved = self.best is None or (watched > self.best if self.maximize else watched < self.best)
        if improved:
            self.best, self.best_report, self.stale = watched, report, 0
            self.best_model = copy.deepcopy({k: v.cpu() for k, v in self.model.state_dict().items()})
        else:
            self.stale += 1
        return {"is_best": improved, "stop": self.stale >= ft.early_stop_patience, "report": report,
                "history": list(self.history), "best_model": self.best_model}

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale, "history": self.history, "init": self.init, "best_model":
                self.best_model, "best_report": self.best_report, "scheduler": self.scheduler.state_dict()}


def predict(model, inputs: Inputs, rows: np.ndarray, size: int, device, data: DeviceImages | None = None,
            tta: str = "none") -> tuple[np.ndarray, float]:
    """Class probabilities and mean cross-entropy (without smoothing) over cache rows, averaged
    over the test-time views of each image with `tta`."""
    logits = infer(model, eval_batches(inputs, rows, size, data), device, tta)
    labels = torch.as_tensor(inputs.cache.labels[rows])
    return logits.softmax(1).numpy(), F.cross_entropy(logits.double(), labels).item()


def saved_probs(cfg: Config, inputs: Inputs, state_dict: dict, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """A saved classifier's class probabilities (with the run's TTA) and loss on cache rows,
    outside training: what the decision rule is fitted on and the test side scored with, once,
    after the last epoch."""
    from skinclr.runtime import pick_device

    device = pick_device(cfg.train.device)
    model = build_classifier(cfg.model.backbone, num_classes=len(CLASSES))
    model.load_state_dict(state_dict)
    return predict(model.to(device, memory_format=torch.channels_last), inputs, rows, cfg.data.image_size, device,
                   tta=cfg.finetune.tta)


def finetune(cfg: Config, inputs: Inputs, resume: dict[str, Any] | None = None,
             pretrain_checkpoint: str | Path | None = None, progress: bool = False) -> Iterator[EpochRecord]:
    return run(Finetuning(cfg, inputs, pretrain_checkpoint), cfg.train, resume=resume, progress=progress,
               image_size=cfg.data.image_size)
