"""A sweep config: a run config plus its `sweep:` section; a pipeline's also names its fine-tune
config and the data its best model is evaluated on."""
from __future__ import annotations

from pathlib import Path

from core.config import Config, ConfigError, load_config

PIPELINE_KEYS = ("finetune_config", "eval_data")  # sweep.* keys only a pipeline config has


def load_sweep_config(path: str | Path | None, overrides: list[str] | None) -> tuple[Config, dict[str, str]]:
    """A sweep config, and the pipeline's own keys (sweep.finetune_config, sweep.eval_data) that it sets."""
    cfg = load_config(path, overrides)
    extra = {k: getattr(cfg.sweep, k) for k in PIPELINE_KEYS if getattr(cfg.sweep, k)}
    if extra and cfg.sweep.stage != "pipeline":
        raise ConfigError(f"sweep.{', sweep.'.join(extra)} only apply to sweep.stage=pipeline (got '{cfg.sweep.stage}')")
    return cfg, extra
