"""Self-supervised pretraining methods by name (`pretrain.method`): one module each on the shared
`Pretraining` base, and `pretrain`, the named method run on the engine.

`pretrain` is a generator of per-epoch records (see core/train/engine.py); it knows nothing of
MLflow or Ray. Every method's checkpoint holds its online `backbone`, which fine-tuning starts
from. Adding a method is its module, its config section (core/config_schema.py) and one line in
`METHODS`.
"""
from __future__ import annotations

from typing import Any, Iterator

from skinclr.config import Config
from skinclr.data.inputs import Inputs
from skinclr.train.engine import EpochRecord, run
from skinclr.train.methods.base import Pretraining
from skinclr.train.methods.byol import BYOL
from skinclr.train.methods.moco_v2 import MoCoV2
from skinclr.train.methods.simclr import SimCLR


def pretrain(cfg: Config, inputs: Inputs, resume: dict[str, Any] | None = None,
             distributed: bool = False, progress: bool = False) -> Iterator[EpochRecord]:
    method = METHODS[cfg.pretrain.method](cfg, inputs, distributed=distributed)
    return run(method, cfg.train, resume=resume, progress=progress)


METHODS: dict[str, type[Pretraining]] = {
    "simclr": SimCLR,
    "moco_v2": MoCoV2,
    "byol": BYOL,
}
