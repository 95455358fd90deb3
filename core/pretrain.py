"""The SimCLR loop: a generator of per-epoch records.

It knows nothing of MLflow or Ray. A driver iterates it, logs `record.metrics` and, when it
wants a checkpoint, calls `record.state()`; passing that state back as `resume=` continues the
run exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from core.augment import eval_transform, simclr_transform
from core.config import Config
from core.inputs import Inputs, make_loader
from core.losses import NTXentLoss
from core.metrics import knn_balanced_accuracy
from core.models import build_simclr
from core.runtime import pick_device, rng_state, seed_everything, set_rng_state, set_threads


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    metrics: dict[str, float]
    state: Callable[[], dict[str, Any]]  # full training state, for checkpoints and resuming
    is_best: bool = False  # the monitored metric improved this epoch
    stop: bool = False  # the loop ends after this record (early stopping)
    extra: dict[str, Any] = field(default_factory=dict)


def autocast(device: torch.device):
    """bf16 on CUDA; full precision on the CPU, where bf16 convolutions are slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def steps(loader, epoch: int, progress: bool):
    """The loader, with a transient per-epoch step bar when asked for."""
    return tqdm(loader, desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, inputs: Inputs, rows: np.ndarray, size: int,
                     device: torch.device, batch_size: int = 256) -> torch.Tensor:
    was_training = backbone.training
    backbone.eval()
    loader = make_loader(inputs.cache, rows, eval_transform(size), batch_size=batch_size, seed=0)
    feats = []
    for x, _ in loader:
        with autocast(device):
            feats.append(backbone(x.to(device, memory_format=torch.channels_last)).float().cpu())
    backbone.train(was_training)
    return torch.cat(feats)


def knn_monitor(backbone, inputs: Inputs, cfg: Config, device, bank_rows: np.ndarray) -> float:
    """Balanced accuracy of a cosine kNN on frozen features: comparable across temperatures,
    unlike the NT-Xent value, so sweeps can select and stop on it."""
    size = cfg.data.image_size
    bank = extract_features(backbone, inputs, bank_rows, size, device)
    query = extract_features(backbone, inputs, inputs.val_rows, size, device)
    return knn_balanced_accuracy(bank, inputs.cache.labels[bank_rows], query, inputs.val_labels,
                                 k=cfg.monitor.k, balanced=cfg.monitor.balanced)


def monitor_bank(inputs: Inputs, cfg: Config) -> np.ndarray:
    """The kNN bank: the train split, or a fixed class-stratified subset of it to bound cost."""
    rows = inputs.train_rows
    cap = cfg.monitor.max_bank
    if not cap or cap >= len(rows):
        return rows
    rng = np.random.default_rng(cfg.train.seed)
    labels = inputs.cache.labels[rows]
    keep = []
    for c in np.unique(labels):
        members = rows[labels == c]
        n = max(1, round(cap * len(members) / len(rows)))
        keep.append(rng.choice(members, size=min(n, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def pretrain(cfg: Config, inputs: Inputs, resume: dict[str, Any] | None = None,
             distributed: bool = False, progress: bool = False) -> Iterator[EpochRecord]:
    device = pick_device(cfg.train.device)
    set_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    model = build_simclr(cfg.model.backbone, cfg.model.proj_hidden, cfg.model.proj_dim)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    loss_fn = NTXentLoss(cfg.simclr.temperature, gather=distributed)
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    a = cfg.augment
    views = simclr_transform(cfg.data.image_size, a.crop_min, a.color_strength, a.blur_prob, a.gray_prob)
    rank, world = _rank_world(distributed)
    train_rows = inputs.train_rows[rank::world]  # each process sees its own shard
    bank_rows = monitor_bank(inputs, cfg)

    start, best = 1, -1.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
        start, best = resume["epoch"] + 1, resume["best"]

    for epoch in range(start, cfg.train.epochs + 1):
        model.train()
        loader = make_loader(inputs.cache, train_rows, views, batch_size=cfg.train.batch_size,
                             seed=cfg.train.seed + 1000 * rank, epoch=epoch, shuffle=True, drop_last=True,
                             workers=cfg.data.workers, pin_memory=device.type == "cuda")
        t0, seen, total = time.perf_counter(), 0, 0.0
        for step, ((v1, v2), _) in enumerate(steps(loader, epoch, progress)):
            if cfg.train.max_steps_per_epoch and step >= cfg.train.max_steps_per_epoch:
                break
            x = torch.cat([v1, v2]).to(device, non_blocking=True, memory_format=torch.channels_last)
            with autocast(device):
                z1, z2 = net(x).float().chunk(2)
                loss = loss_fn(z1, z2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(v1)
            seen += len(v1)
        train_seconds = time.perf_counter() - t0
        metrics = {"train_loss": total / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
                   "epoch_seconds": train_seconds, "images_per_second": seen * world / train_seconds}
        is_best = False
        if epoch % cfg.monitor.every == 0 or epoch == cfg.train.epochs:
            t1 = time.perf_counter()
            knn = knn_monitor(model.backbone, inputs, cfg, device, bank_rows)
            metrics["monitor_seconds"] = time.perf_counter() - t1
            metrics["knn_balanced_accuracy"] = knn
            metrics["epoch_seconds"] += metrics["monitor_seconds"]
            is_best = knn > best
            best = max(best, knn)

        def state(epoch=epoch, best=best) -> dict[str, Any]:
            return {"epoch": epoch, "best": best, "model": model.state_dict(),
                    "backbone": model.backbone.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": rng_state()}

        yield EpochRecord(epoch, metrics, state, is_best=is_best)


def _rank_world(distributed: bool) -> tuple[int, int]:
    if distributed and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
