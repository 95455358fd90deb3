"""MoCo v2 (Chen et al. 2020, after He et al. 2019): queries from the online encoder, keys from
its momentum copy; each query's positive is the key of its other view, the negatives a queue
of keys from earlier batches. InfoNCE with a temperature, MLP projection head.

Symmetrised, as in MoCo v3 and solo-learn's MoCo v2+: both views serve as query and as key, so
every image gives two loss terms per step (the loss is their mean). There is no shuffled
BatchNorm: on one device a shuffle leaves the batch statistics unchanged. The queue and its
write position are buffers of the model, so a resumed run continues with the very same keys.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from skinclr.train.losses import info_nce
from skinclr.train.methods.base import Pretraining, momentum_copy, momentum_update, views_to_device
from skinclr.train.models import Projector, build_backbone


class MoCoNet(nn.Module):
    def __init__(self, backbone: str, proj_hidden: int, proj_dim: int, queue_size: int):
        super().__init__()
        self.backbone, dim = build_backbone(backbone)
        self.projector = Projector(dim, proj_hidden, proj_dim)
        self.key_backbone, self.key_projector = momentum_copy(self.backbone), momentum_copy(self.projector)
        self.register_buffer("queue", nn.functional.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.key_projector(self.key_backbone(x)).float(), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Overwrite the oldest keys with these (a ring buffer: any batch and queue size work)."""
        size = len(self.queue)
        keys = keys[-size:]
        slots = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)


class MoCoV2(Pretraining):
    title = "MoCo v2"

    def build(self) -> nn.Module:
        m, c = self.cfg.model, self.cfg.moco_v2
        return MoCoNet(m.backbone, m.proj_hidden, m.proj_dim, c.queue_size)

    def loss(self, batch) -> tuple[Tensor, int]:
        x, n = views_to_device(batch, self.device)
        q1, q2 = self.net(x).float().chunk(2)
        k1, k2 = self.model.keys(x).chunk(2)
        queue, t = self.model.queue, self.cfg.moco_v2.temperature
        self.new_keys = torch.cat([k1, k2])
        return (info_nce(q1, k2, queue, t) + info_nce(q2, k1, queue, t)) / 2, n

    def after_step(self) -> None:
        m = self.model
        momentum_update(m.key_backbone, m.backbone, self.cfg.moco_v2.momentum)
        momentum_update(m.key_projector, m.projector, self.cfg.moco_v2.momentum)
        m.enqueue(gather(self.new_keys))


def gather(keys: Tensor) -> Tensor:
    """Every process's keys in rank order, so all processes keep the same queue."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return keys
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts)
