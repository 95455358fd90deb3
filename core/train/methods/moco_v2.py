"""MoCo v2 (Chen et al. 2020, after He et al. 2019): queries from the online encoder, keys from
its momentum copy; each query's positive is the key of its other view, the negatives a queue
of keys from earlier batches. InfoNCE with a temperature, MLP projection head.

Symmetrised, as in MoCo v3 and solo-learn's MoCo v2+: both views serve as query and as key, so
every image gives two loss terms per step (the loss is their mean). There is no shuffled
BatchNorm: on one device a shuffle leaves the batch statistics unchanged. The queue and its
write position are buffers of the model, so a resumed run continues with the very same keys.
"""
from __future__ import annotations

from dataclasses import dataclass

from skinclr.config_schema import MethodConfig

TITLE = "MoCo v2"


@dataclass
class Settings(MethodConfig):
    temperature: float = 0.2  # MoCo v2's
    queue_size: int = 4096  # negatives kept from earlier batches (MoCo: 65,536 for ImageNet's 1.28M images)
    momentum: float = 0.99  # key encoder EMA per step (MoCo: 0.999 over ~500k steps; short runs need it faster)

    def checks(self):
        return [(self.temperature > 0, "temperature", "must be positive"),
                (self.queue_size >= 1, "queue_size", "must be at least 1"),
                (0.0 <= self.momentum < 1.0, "momentum", "must lie in [0, 1)")]


SPACE = {"moco_v2.temperature": {"type": "loguniform", "low": 0.05, "high": 0.5},
         "moco_v2.momentum": {"type": "uniform", "low": 0.9, "high": 0.999},  # per step; slower keys want longer runs
         "moco_v2.queue_size": {"type": "choice", "values": [1024, 4096, 8192]}}  # the train split: 8,584 images


def network(backbone: str, proj_hidden: int, proj_dim: int, queue_size: int):
    """Online backbone and projector, their momentum copies, and the queue of keys as buffers."""
    import torch
    from torch import nn

    from skinclr.train.methods.base import momentum_copy
    from skinclr.train.models import Projector, build_backbone

    net = nn.Module()
    net.backbone, dim = build_backbone(backbone)
    net.projector = Projector(dim, proj_hidden, proj_dim)
    net.key_backbone, net.key_projector = momentum_copy(net.backbone), momentum_copy(net.projector)
    net.register_buffer("queue", nn.functional.normalize(torch.randn(queue_size, proj_dim), dim=1))
    net.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
    return net


def keys(net, x):
    """The momentum encoder's normalised projections: the keys (no gradient)."""
    import torch
    from torch import nn

    with torch.no_grad():
        return nn.functional.normalize(net.key_projector(net.key_backbone(x)).float(), dim=1)


def enqueue(net, keys) -> None:
    """Overwrite the oldest keys with these (a ring buffer: any batch and queue size work)."""
    import torch

    with torch.no_grad():
        size = len(net.queue)
        keys = keys[-size:]
        slots = (net.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        net.queue[slots] = keys.to(net.queue.dtype)
        net.queue_ptr.copy_((net.queue_ptr + len(keys)) % size)


def build(task):
    m = task.cfg.model
    return network(m.backbone, m.proj_hidden, m.proj_dim, task.cfg.moco_v2.queue_size)


def loss(task, batch):
    import torch

    from skinclr.train.losses import info_nce

    x, n = task.views_to_device(batch)
    q1, q2 = task.net(x).float().chunk(2)
    k1, k2 = keys(task.model, x).chunk(2)
    queue, t = task.model.queue, task.cfg.moco_v2.temperature
    task.new_keys = torch.cat([k1, k2])
    return (info_nce(q1, k2, queue, t) + info_nce(q2, k1, queue, t)) / 2, n


def after_step(task) -> None:
    from skinclr.train.methods.base import gather, momentum_update

    m = task.model
    momentum_update(m.key_backbone, m.backbone, task.cfg.moco_v2.momentum)
    momentum_update(m.key_projector, m.projector, task.cfg.moco_v2.momentum)
    enqueue(m, gather(task.new_keys))
