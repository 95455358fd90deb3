"""The fine-tune / linear-probe loop: a generator of per-epoch records.

Plateau scheduling, early stopping and the best-model pick all watch one configurable,
optionally smoothed validation metric (val balanced accuracy by default: it jumps from epoch
to epoch on HAM10000, where val loss falls smoothly).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from core.augment import eval_transform, finetune_transform
from core.config import Config, ConfigError
from core.data import CLASSES
from core.inputs import Inputs, make_loader
from core.metrics import classification_metrics
from core.models import build_classifier, imagenet_state_dict, load_backbone
from core.pretrain import EpochRecord, autocast, steps
from core.runtime import pick_device, rng_state, seed_everything, set_rng_state, set_threads


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


@torch.no_grad()
def predict_probs(model, inputs: Inputs, rows: np.ndarray, size: int, device, batch_size: int = 256):
    """Class probabilities and mean cross-entropy (without smoothing) over cache rows."""
    model.eval()
    loader = make_loader(inputs.cache, rows, eval_transform(size), batch_size=batch_size, seed=0)
    probs, loss, n = [], 0.0, 0
    for x, y in loader:
        with autocast(device):
            logits = model(x.to(device, memory_format=torch.channels_last)).float()
        loss += F.cross_entropy(logits, y.to(device), reduction="sum").item()
        n += len(y)
        probs.append(logits.softmax(1).cpu())
    return torch.cat(probs).numpy(), loss / max(n, 1)


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse class frequency, normalised to mean 1 (classes absent from train get weight 0)."""
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def finetune(cfg: Config, inputs: Inputs, resume: dict[str, Any] | None = None,
             pretrain_checkpoint: str | Path | None = None, progress: bool = False) -> Iterator[EpochRecord]:
    device = pick_device(cfg.train.device)
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    ft = cfg.finetune
    model = build_classifier(cfg.model.backbone, num_classes=len(CLASSES))
    init = init_backbone(model, cfg, pretrain_checkpoint) if resume is None else resume["init"]
    if ft.linear_probe:
        model.freeze_backbone()
    model = model.to(device, memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=ft.weight_decay)
    maximize = ft.monitor != "val_loss"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max" if maximize else "min", factor=ft.lr_factor, patience=ft.lr_patience)
    weight = class_weights(inputs.train_labels).to(device) if ft.class_weighted_loss else None
    criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=ft.label_smoothing)
    augment = finetune_transform(cfg.data.image_size, cfg.augment.crop_min, cfg.augment.rotation,
                                 cfg.augment.color_strength)

    start, history, best, best_state, stale = 1, [], None, None, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        start, history, best, stale = resume["epoch"] + 1, resume["history"], resume["best"], resume["stale"]
        best_state = resume["best_model"]

    for epoch in range(start, cfg.train.epochs + 1):
        sampler = None
        if ft.balanced_sampler:  # each class drawn equally often, in expectation
            w = class_weights(inputs.train_labels)[inputs.train_labels].double()
            sampler = torch.utils.data.WeightedRandomSampler(
                w, len(w), generator=torch.Generator().manual_seed(cfg.train.seed * 7 + epoch))
        loader = make_loader(inputs.cache, inputs.train_rows, augment, batch_size=cfg.train.batch_size,
                             seed=cfg.train.seed, epoch=epoch, shuffle=True, sampler=sampler, drop_last=True,
                             workers=cfg.data.workers, pin_memory=device.type == "cuda")
        model.train()
        t0, seen, total = time.perf_counter(), 0, 0.0
        for step, (x, y) in enumerate(steps(loader, epoch, progress)):
            if cfg.train.max_steps_per_epoch and step >= cfg.train.max_steps_per_epoch:
                break
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            with autocast(device):
                loss = criterion(model(x).float(), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
        train_seconds = time.perf_counter() - t0
        probs, val_loss = predict_probs(model, inputs, inputs.val_rows, cfg.data.image_size, device)
        report = classification_metrics(inputs.val_labels, probs)
        metrics = {"train_loss": total / max(seen, 1), "val_loss": val_loss,
                   "val_accuracy": report["accuracy"], "val_balanced_accuracy": report["balanced_accuracy"],
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
                   "images_per_second": seen / train_seconds}
        history.append({"epoch": epoch, **metrics})
        watched = float(np.mean([h[ft.monitor] for h in history[-ft.monitor_smoothing:]]))
        metrics["monitor_value"] = watched
        scheduler.step(watched)
        improved = best is None or (watched > best if maximize else watched < best)
        if improved:
            best, stale = watched, 0
            best_state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
        else:
            stale += 1
        stop = stale >= ft.early_stop_patience

        def state(epoch=epoch, best=best, stale=stale) -> dict[str, Any]:
            return {"epoch": epoch, "best": best, "stale": stale, "history": history, "init": init,
                    "model": model.state_dict(), "best_model": best_state,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}

        yield EpochRecord(epoch, metrics, state, is_best=improved, stop=stop,
                          extra={"val_probs": probs, "report": report, "history": list(history), "init": init,
                                 "best_model": best_state})
        if stop:
            return
