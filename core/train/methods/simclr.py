"""SimCLR (Chen et al. 2020): NT-Xent between the projections of two views of each image; the
batch's other views are the negatives (the global batch's, across data-parallel processes)."""
from __future__ import annotations

from dataclasses import dataclass

from skinclr.config_schema import MethodConfig

TITLE = "SimCLR"


@dataclass
class Settings(MethodConfig):
    temperature: float = 0.5

    def checks(self):
        return [(self.temperature > 0, "temperature", "must be positive")]


SPACE = {"simclr.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0}}  # NT-Xent sharpness


def build(task):
    from skinclr.train.losses import NTXentLoss
    from skinclr.train.models import build_simclr

    m = task.cfg.model
    task.loss_fn = NTXentLoss(task.cfg.simclr.temperature, gather=task.distributed)
    return build_simclr(m.backbone, m.proj_hidden, m.proj_dim)


def loss(task, batch):
    x, n = task.views_to_device(batch)
    z1, z2 = task.net(x).float().chunk(2)
    return task.loss_fn(z1, z2), n
