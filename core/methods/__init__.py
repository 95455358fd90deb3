"""Pretraining methods by name (`pretrain.method`): one module each, on the shared `Pretraining`
base. Adding a method is its module, its config section (core/config.py) and one line here."""
from __future__ import annotations

from core.methods.base import Pretraining
from core.methods.byol import BYOL
from core.methods.moco_v2 import MoCoV2
from core.methods.simclr import SimCLR

METHODS: dict[str, type[Pretraining]] = {
    "simclr": SimCLR,
    "moco_v2": MoCoV2,
    "byol": BYOL,
}
