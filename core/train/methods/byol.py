"""BYOL (Grill et al. 2020): the online network (backbone, projector, predictor) predicts the
target network's projection of the other view; the target is an EMA of the online backbone
and projector, its rate raised from `byol.momentum` to 1 along a cosine over the run. No
negatives. Symmetric loss: each view is predicted from the other, and the two terms add.
Both views come from the project's SimCLR augmentation, as for every method here (BYOL's
paper blurs and solarizes its two views with different probabilities).

The step counter that drives the schedule is a buffer of the model, so a resumed run picks
up the schedule where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from skinclr.config_schema import MethodConfig

TITLE = "BYOL"
ONLINE_PARTS = ("backbone", "projector", "predictor")


@dataclass
class Settings(MethodConfig):
    momentum: float = 0.99  # the target's EMA rate at step 0, raised to 1 along a cosine over the run (BYOL: 0.996)

    def checks(self):
        return [(0.0 <= self.momentum < 1.0, "momentum", "must lie in [0, 1)")]


SPACE = {"byol.momentum": {"type": "uniform", "low": 0.9, "high": 0.999}}  # BYOL has no temperature, no negatives


def cosine_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: base at step 0, rising along a half cosine to 1 at step `total`."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1.0) / 2.0


def build(task):
    import torch
    from torch import nn

    from skinclr.train.methods.base import momentum_copy
    from skinclr.train.models import Projector, build_backbone

    m = task.cfg.model
    net = nn.Module()
    net.backbone, dim = build_backbone(m.backbone)
    net.projector = Projector(dim, m.proj_hidden, m.proj_dim, batch_norm=True)
    net.predictor = Projector(m.proj_dim, m.proj_hidden, m.proj_dim, batch_norm=True)
    net.target_backbone, net.target_projector = momentum_copy(net.backbone), momentum_copy(net.projector)
    net.register_buffer("step", torch.zeros((), dtype=torch.long))
    task.step = None  # the model's step counter, mirrored on the first step (a resumed model's)
    return net


def targets(net, x):
    """The target network's projections (no gradient): what the online network predicts."""
    import torch

    with torch.no_grad():
        return net.target_projector(net.target_backbone(x)).float()


def loss(task, batch):
    from skinclr.train.losses import byol_loss

    x, n = task.views_to_device(batch)
    p1, p2 = task.net(x).float().chunk(2)
    z1, z2 = targets(task.model, x).chunk(2)
    return byol_loss(p1, z2) + byol_loss(p2, z1), n


def after_step(task) -> None:
    from skinclr.train.methods.base import momentum_update

    m = task.model
    if task.step is None:  # read once; a GPU sync per step would cost
        task.step = int(m.step)
    tau = cosine_momentum(task.cfg.byol.momentum, task.step, task.steps_per_epoch() * task.cfg.train.epochs)
    momentum_update(m.target_backbone, m.backbone, tau)
    momentum_update(m.target_projector, m.projector, tau)
    task.step += 1
    m.step += 1
