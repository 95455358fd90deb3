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

import torch
from torch import Tensor, nn

from skinclr.train.losses import byol_loss
from skinclr.train.methods.base import Pretraining, momentum_copy, momentum_update, views_to_device
from skinclr.train.models import Projector, build_backbone


class BYOLNet(nn.Module):
    def __init__(self, backbone: str, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.backbone, dim = build_backbone(backbone)
        self.projector = Projector(dim, proj_hidden, proj_dim, batch_norm=True)
        self.predictor = Projector(proj_dim, proj_hidden, proj_dim, batch_norm=True)
        self.target_backbone, self.target_projector = momentum_copy(self.backbone), momentum_copy(self.projector)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        return self.target_projector(self.target_backbone(x)).float()


def cosine_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: base at step 0, rising along a half cosine to 1 at step `total`."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1.0) / 2.0


class BYOL(Pretraining):
    title = "BYOL"
    online_parts = ("backbone", "projector", "predictor")
    step: int | None = None  # the model's step counter, mirrored here

    def build(self) -> nn.Module:
        m = self.cfg.model
        return BYOLNet(m.backbone, m.proj_hidden, m.proj_dim)

    def loss(self, batch) -> tuple[Tensor, int]:
        x, n = views_to_device(batch, self.device)
        p1, p2 = self.net(x).float().chunk(2)
        z1, z2 = self.model.targets(x).chunk(2)
        return byol_loss(p1, z2) + byol_loss(p2, z1), n

    def after_step(self) -> None:
        m = self.model
        if self.step is None:  # read once (a resumed model's counter); a GPU sync per step would cost
            self.step = int(m.step)
        tau = cosine_momentum(self.cfg.byol.momentum, self.step, self.steps_per_epoch() * self.cfg.train.epochs)
        momentum_update(m.target_backbone, m.backbone, tau)
        momentum_update(m.target_projector, m.projector, tau)
        self.step += 1
        m.step += 1
