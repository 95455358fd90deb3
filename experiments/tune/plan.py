"""A sweep config: a run config plus its `sweep:` section, typed and checked here, above the
library.

The library carries the section as data (core/config_schema.py), so one YAML file holds a run and its
sweep; `SweepRunConfig` types it. Every command loads its config through `load_run_config`, so a
`skinclr finetune` of a file with a sweep section checks that section too, and a run's resolved
config, params and run key hold the whole section, defaults included, whichever command ran it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinclr.config import Config, ConfigError, load_config, require

PIPELINE_KEYS = ("finetune_config", "eval_data")  # sweep.* keys only a pipeline config has


@dataclass
class SweepConfig:
    """The `sweep:` section: what the trials draw from, how many run and how, and where they live."""
    stage: str = "pretrain"  # pretrain | finetune | pipeline
    space: str = ""  # search-space YAML; empty: search_spaces/finetune.yaml, or the method's ranges + pretrain.yaml; "methods": every method's
    narrow: dict = field(default_factory=dict)  # key -> fixed value or {low, high} / [choices]
    num_samples: int = 8  # trials (a grid study runs each combination of sweep.grid once instead)
    max_concurrent: int = 2
    search: str = "optuna"  # optuna | random | grid (every combination of sweep.grid, no ASHA)
    grid: dict = field(default_factory=dict)  # grid search: config key -> list of values
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int = 0  # 0: train.epochs
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1  # >1: data-parallel trials (Ray Train TorchTrainer)
    max_failures: int = 1
    storage: str = ""  # Ray results folder; empty: ~/ray_results
    name: str = ""
    finetune_config: str = ""  # pipeline: the fine-tune stage's config (with a sweep section: swept)
    eval_data: str = ""  # pipeline: a labelled folder the best fine-tuned model is evaluated on


@dataclass
class SweepRunConfig(Config):
    """Core's run config with the sweep section typed: what every command of the project loads."""
    sweep: SweepConfig = field(default_factory=SweepConfig)


def load_run_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                    stage: str | None = None) -> SweepRunConfig:
    """`skinclr.config.load_config` with the sweep section typed and its values checked."""
    cfg = load_config(path, overrides, stage, schema=SweepRunConfig)
    require(cfg, [(cfg.sweep.search in ("optuna", "random", "grid"), "sweep.search", "must be optuna, random or grid")])
    return cfg


def pipeline_keys(cfg: SweepRunConfig) -> dict[str, str]:
    """The pipeline's own keys (sweep.finetune_config, sweep.eval_data) that a config sets."""
    extra = {k: getattr(cfg.sweep, k) for k in PIPELINE_KEYS if getattr(cfg.sweep, k)}
    if extra and cfg.sweep.stage != "pipeline":
        raise ConfigError(f"sweep.{', sweep.'.join(extra)} only apply to sweep.stage=pipeline (got '{cfg.sweep.stage}')")
    return extra


def load_sweep_config(path: str | Path | None,
                      overrides: list[str] | None) -> tuple[SweepRunConfig, dict[str, str]]:
    """A sweep config, and the pipeline's own keys that it sets."""
    cfg = load_run_config(path, overrides)
    return cfg, pipeline_keys(cfg)


@dataclass
class StagePlan:
    """One stage's sweep, resolved once: its config, the space as declared (a grid study: its
    grid) and narrowed (what its trials draw from), its folder, and whether it continues."""
    cfg: SweepRunConfig
    drawn_from: dict[str, Any]
    space: dict[str, Any]
    folder: Path
    resume: bool = False
    command: str = ""  # the command line that reproduces the sweep: its runs' names.COMMAND_TAG


def command_tags(command: str) -> dict[str, str]:
    """The tag naming the command that made a run (none when no command line is known)."""
    from skinclr import names

    return {names.COMMAND_TAG: command} if command else {}


@dataclass
class SweepPlan:
    """`skinclr sweep` resolved once, before Ray starts, and handed down: nothing below reads a
    YAML file again or recomputes a folder. One stage's sweep (`stage`), or the pipeline: its
    pretrain sweep, then its fine-tuning, a sweep (`finetune`) or one run (`finetune_run`)."""
    cfg: SweepRunConfig
    extra: dict[str, str]
    folder: Path
    resume: bool = False
    stage: StagePlan | None = None
    pretrain: StagePlan | None = None
    finetune: StagePlan | None = None
    finetune_run: SweepRunConfig | None = None
    finetune_file: Path | None = None  # the pipeline's fine-tune config, logged on its top run
    command: str = ""  # the command line that reproduces it, tagged on every run it makes

    def stages(self) -> list[StagePlan]:
        return [s for s in (self.stage, self.pretrain, self.finetune) if s is not None]
