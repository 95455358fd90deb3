"""SimCLR (Chen et al. 2020): NT-Xent between the projections of two views of each image; the
batch's other views are the negatives (the global batch's, across data-parallel processes)."""
from __future__ import annotations

from torch import Tensor, nn

from skinclr.train.losses import NTXentLoss
from skinclr.train.methods.base import Pretraining, views_to_device
from skinclr.train.models import build_simclr


class SimCLR(Pretraining):
    title = "SimCLR"

    def build(self) -> nn.Module:
        m = self.cfg.model
        self.loss_fn = NTXentLoss(self.cfg.simclr.temperature, gather=self.distributed)
        return build_simclr(m.backbone, m.proj_hidden, m.proj_dim)

    def loss(self, batch) -> tuple[Tensor, int]:
        x, n = views_to_device(batch, self.device)
        z1, z2 = self.net(x).float().chunk(2)
        return self.loss_fn(z1, z2), n
