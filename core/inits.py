"""`finetune.init` read once: the pretrain run (by id or by name) or file a fine-tune starts from.

Runs and sweeps (for each init a sweep will try, before any trial) read the value here alone, so
a trial cannot disagree with the check its sweep made.
"""
from __future__ import annotations

from pathlib import Path

from core import names, store, tracking
from core.config import Config, ConfigError
from core.models import imagenet_weights_file
from core.tracking import RunLogger


def init_run(init: str) -> str | None:
    """The pretrain run `finetune.init=runs:/RUN` names (RUN: a run id, or the name of a finished
    pretrain run), None for every other init; ConfigError when the store has no such run. Runs and
    sweeps (for each init a sweep will try, before any trial) read the value here alone."""
    if not init.startswith("runs:/"):
        return None
    run_id = tracking.find_run(init[len("runs:/"):].strip("/").split("/")[0], stage="pretrain")
    if run_id is None:
        raise ConfigError(f"finetune.init '{init}': no pretrain run with that id or name in the tracking store "
                          f"{store.tracking_uri()}; pass the id or name of a finished `skinclr pretrain` run "
                          "and check MLFLOW_TRACKING_URI")
    return run_id


def resolve_init(cfg: Config, workdir: Path) -> tuple[str | None, dict[str, str]]:
    """`finetune.init` -> the backbone file to start from (None: finetune reads the init itself),
    and the tags that link the run to it. Called before the data cache is built or a run opened,
    so a missing init fails at once."""
    init = cfg.finetune.init
    if init == "imagenet":
        imagenet_weights_file(cfg.model.backbone, cfg.finetune.imagenet_weights or None)
    run_id = init_run(init)
    if run_id is None:
        return None, {names.INIT_TAG: init}
    logger = RunLogger(run_id)
    for name in ("checkpoints/backbone_best.pt", "checkpoints/backbone_last.pt"):
        path = logger.download(name, workdir)
        if path is not None:
            return str(path), {names.PRETRAIN_RUN_TAG: run_id, names.INIT_TAG: init}
    raise ConfigError(f"finetune.init '{init}': run {run_id} has no checkpoints/backbone_*.pt artifact; "
                      "is it a finished skinclr pretrain run?")
