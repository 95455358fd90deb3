"""Self-supervised pretraining: the method named by `pretrain.method`, run on the engine.

A generator of per-epoch records (see core/engine.py); it knows nothing of MLflow or Ray.
Every method's checkpoint holds its online `backbone`, which fine-tuning starts from.
"""
from __future__ import annotations

from typing import Any, Iterator

from core.config import Config
from core.engine import EpochRecord, run
from core.inputs import Inputs
from core.methods import METHODS


def pretrain(cfg: Config, inputs: Inputs, resume: dict[str, Any] | None = None,
             distributed: bool = False, progress: bool = False) -> Iterator[EpochRecord]:
    method = METHODS[cfg.pretrain.method](cfg, inputs, distributed=distributed)
    return run(method, cfg.train, resume=resume, progress=progress)
