"""A toy pretraining method, as a contributor would add one: each view's projection is pulled
toward the other's (cosine similarity, one side held fixed). It exists for the registry's tests."""
from __future__ import annotations

from dataclasses import dataclass

from skinclr.config_schema import MethodConfig

TITLE = "Toy"


@dataclass
class Settings(MethodConfig):
    scale: float = 1.0  # the loss's weight

    def checks(self):
        return [(self.scale > 0, "scale", "must be positive")]


SPACE = {"toy.scale": {"type": "uniform", "low": 0.5, "high": 2.0}}


def build(task):
    from skinclr.train.models import build_simclr

    m = task.cfg.model
    return build_simclr(m.backbone, m.proj_hidden, m.proj_dim)


def loss(task, batch):
    import torch.nn.functional as F

    x, n = task.views_to_device(batch)
    z1, z2 = task.net(x).float().chunk(2)
    similarity = F.cosine_similarity(z1, z2.detach()).mean() + F.cosine_similarity(z2, z1.detach()).mean()
    return -task.cfg.toy.scale * similarity / 2, n
