"""The one reading of `finetune.init`: a pretrain run by id or by name, refused when it cannot
give a backbone, before any work."""
from __future__ import annotations

import pytest

from skinclr.config import ConfigError, load_config
from skinclr.train.finetune import init_run, resolve_init
from skinclr.names import STAGE_TAG
from skinclr.track.tracking import RunLogger


def pretrain_run(name: str = "", status: str = "FINISHED", stage: str = "pretrain") -> str:
    logger = RunLogger.create("runner-inits", name, tags={STAGE_TAG: stage})
    logger.end(status)
    return logger.run_id


def test_finetune_init_names_a_pretrain_run_by_id_or_by_name():
    assert [init_run(i) for i in ("scratch", "imagenet", "/some/backbone.pt")] == [None, None, None]
    older = pretrain_run("simclr-a")
    newest = pretrain_run("simclr-a")
    pretrain_run("simclr-a", status="KILLED")  # unfinished: never what a name means
    assert init_run(f"runs:/{older}") == older
    assert init_run(f"runs:/{older}/checkpoints/backbone_best.pt") == older
    assert init_run("runs:/simclr-a") == newest
    with pytest.raises(ConfigError, match="finetune.init 'runs:/nope': no pretrain run with that id or name"):
        init_run("runs:/nope")
    pretrain_run("tuned", stage="finetune")
    with pytest.raises(ConfigError, match="no pretrain run"):  # a name stands for pretrain runs only
        init_run("runs:/tuned")


def test_a_pretrain_run_without_backbones_is_refused_before_any_work(synth_dir, tmp_path):
    cfg = load_config(None, {"data.root": str(synth_dir), "finetune.init": f"runs:/{pretrain_run()}"}, stage="finetune")
    with pytest.raises(ConfigError, match="has no checkpoints/backbone_"):
        resolve_init(cfg, tmp_path)
