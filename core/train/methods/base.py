"""What every pretraining method shares: two-view batches of this process's shard, the kNN
monitor, the best-epoch pick, and the online backbone in every checkpoint (what fine-tuning
starts from). `Pretraining` runs the method named by `pretrain.method`: its module's `build`
and `loss` (and `after_step`) hooks supply the model and the loss.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from skinclr.train.augment import simclr_transform
from skinclr.train.augment_gpu import DeviceBatches, DeviceImages, eval_batches, simclr_pipeline, tensor_path
from skinclr.config import Config
from skinclr.train.engine import Task, adam, compiled, infer, to_device
from skinclr.data.inputs import Inputs, make_loader
from skinclr.train.metrics import knn_balanced_accuracy


class Pretraining(Task):
    """A self-supervised method on the engine. The model its module builds has a `backbone` (the
    online encoder's, the one monitored and exported); the module's `ONLINE_PARTS` name the
    modules that get gradients, in forward order (data-parallel runs wrap them in
    DistributedDataParallel)."""

    def __init__(self, cfg: Config, inputs: Inputs, distributed: bool = False, method=None):
        from skinclr.train.methods import METHODS

        self.cfg, self.inputs, self.distributed = cfg, inputs, distributed
        self.method = method or METHODS[cfg.pretrain.method].module
        self.online_parts = getattr(self.method, "ONLINE_PARTS", ("backbone", "projector"))
        self.rank, self.world = rank_world(distributed)
        self.rows = inputs.train_rows[self.rank::self.world]  # each process sees its own shard
        self.best = -1.0

    def build(self) -> nn.Module:
        return self.method.build(self)

    def loss(self, batch) -> tuple[Tensor, int]:
        return self.method.loss(self, batch)

    def after_step(self) -> None:
        if hasattr(self.method, "after_step"):
            self.method.after_step(self)

    def views_to_device(self, batch) -> tuple[Tensor, int]:
        """A two-view batch as one tensor on the device (both views in one forward pass), and its image count."""
        (v1, v2), _ = batch
        return to_device(torch.cat([v1, v2]), self.device), len(v1)

    def setup(self, device: torch.device, resume: dict | None) -> torch.optim.Optimizer:
        cfg = self.cfg
        self.device = device
        self.model = self.build().to(device, memory_format=torch.channels_last)
        optimizer = adam([p for p in self.model.parameters() if p.requires_grad], cfg.train.lr)
        net = nn.Sequential(*(getattr(self.model, name) for name in self.online_parts))
        if self.distributed:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = compiled(net, cfg.train.compile)
        a = cfg.augment
        self.views = simclr_transform(cfg.data.image_size, a.crop_min, a.color_strength, a.blur_prob, a.gray_prob)
        self.data = None
        if tensor_path(a.device, device):
            self.use_tensor_path()
        self.bank_rows = monitor_bank(self.inputs, cfg)
        if resume is not None:
            self.best = resume["best"]
        return optimizer

    def use_tensor_path(self) -> None:
        """Augment on the training device (core/train/augment_gpu.py) instead of in CPU workers."""
        a = self.cfg.augment
        self.data = DeviceImages(self.inputs.cache, self.device)
        self.views = simclr_pipeline(self.cfg.data.image_size, a.crop_min, a.color_strength, a.blur_prob, a.gray_prob,
                                     compile=self.cfg.train.compile)

    def batches(self, epoch: int):
        order = dict(batch_size=self.cfg.train.batch_size, seed=self.cfg.train.seed + 1000 * self.rank, epoch=epoch,
                     shuffle=True, drop_last=True)
        if self.data is not None:
            return DeviceBatches(self.data, self.rows, self.views, views=2, **order)
        return make_loader(self.inputs.cache, self.rows, self.views, workers=self.cfg.data.workers,
                           pin_memory=self.device.type == "cuda", **order)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of this shard (momentum schedules span the whole run)."""
        n = len(self.rows) // self.cfg.train.batch_size
        cap = self.cfg.train.max_steps_per_epoch
        return min(n, cap) if cap else n

    def evaluate(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        cfg = self.cfg
        if epoch % cfg.monitor.every and epoch != cfg.train.epochs:
            return {}
        t0 = time.perf_counter()
        knn = knn_monitor(self.model.backbone, self.inputs, cfg, self.device, self.bank_rows, self.data)
        metrics["monitor_seconds"] = time.perf_counter() - t0
        metrics["knn_balanced_accuracy"] = knn
        is_best = knn > self.best
        self.best = max(self.best, knn)
        return {"is_best": is_best}

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "backbone": self.model.backbone.state_dict()}


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy that only an EMA moves (MoCo's key encoder, BYOL's target)."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
    t, o = list(target.parameters()), list(online.parameters())
    torch._foreach_lerp_(t, o, 1.0 - momentum)


def gather(keys: Tensor) -> Tensor:
    """Every process's keys in rank order, so all processes keep the same (MoCo) queue."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return keys
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts)


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


def knn_monitor(backbone: nn.Module, inputs: Inputs, cfg: Config, device: torch.device, bank_rows: np.ndarray,
                data: DeviceImages | None = None) -> float:
    """Balanced accuracy of a cosine kNN on frozen features: comparable across methods and
    temperatures, unlike their loss values, so sweeps can select and stop on it."""
    size = cfg.data.image_size
    bank = infer(backbone, eval_batches(inputs, bank_rows, size, data), device)
    query = infer(backbone, eval_batches(inputs, inputs.val_rows, size, data), device)
    return knn_balanced_accuracy(bank, inputs.cache.labels[bank_rows], query, inputs.val_labels,
                                 k=cfg.monitor.k, balanced=cfg.monitor.balanced)


def rank_world(distributed: bool) -> tuple[int, int]:
    if distributed and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
