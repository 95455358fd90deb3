"""Every check a sweep can make before Ray starts, so a wrong config costs seconds, not a cluster.

`search_space` checks the sweep section against the stage it sweeps and resolves what the trials
draw from; `check_inits` makes sure every pretrain run a fine-tune sweep starts from exists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from skinclr.config import ConfigError
from skinclr.train.finetune import init_run
from skinclr.tune.spaces import check_keys, grid_space, load_space, narrow, space_path
from skinclr.tune.plan import SweepRunConfig
from skinclr.tune.trainables import METRICS


def check_sweep(cfg: SweepRunConfig) -> None:
    """The sweep section's values, checked against the stage the trials run."""
    s = cfg.sweep
    problems = [
        (cfg.stage in METRICS, "stage", f"a sweep runs pretrain or finetune trials, not '{cfg.stage}'"),
        (s.stage in (cfg.stage, "pipeline"), "sweep.stage",
         f"'{s.stage}' disagrees with stage '{cfg.stage}'; set both to the stage the trials run"),
        (cfg.stage != "pretrain" or cfg.monitor.every == 1, "monitor.every",
         f"must be 1 in a pretrain sweep so ASHA can compare trials every epoch (got {cfg.monitor.every})"),
        (s.num_samples >= 1, "sweep.num_samples", f"must be at least 1 (got {s.num_samples})"),
        (s.max_concurrent >= 1, "sweep.max_concurrent", f"must be at least 1 (got {s.max_concurrent})"),
        (s.grace_period >= 1, "sweep.grace_period", f"must be at least 1 (got {s.grace_period})"),
        (s.reduction_factor >= 2, "sweep.reduction_factor", f"must be at least 2 (got {s.reduction_factor})"),
        (s.grace_period <= (s.max_t or cfg.train.epochs), "sweep.grace_period",
         f"{s.grace_period} exceeds max_t {s.max_t or cfg.train.epochs}; lower it or train longer"),
        (s.cpus_per_trial > 0, "sweep.cpus_per_trial", f"must be positive (got {s.cpus_per_trial})"),
        (s.gpus_per_trial >= 0, "sweep.gpus_per_trial", f"must be 0 or more (got {s.gpus_per_trial})"),
        (s.workers_per_trial >= 1, "sweep.workers_per_trial", f"must be at least 1 (got {s.workers_per_trial})"),
        (s.workers_per_trial == 1 or cfg.stage == "pretrain", "sweep.workers_per_trial",
         "data-parallel trials exist for pretraining only; set it to 1 for fine-tuning"),
        (s.max_failures >= 0, "sweep.max_failures", f"must be 0 or more (got {s.max_failures})"),
        (s.search == "grid" or not s.grid, "sweep.grid", f"only applies to sweep.search=grid (got '{s.search}')"),
        (s.search != "grid" or not s.narrow, "sweep.narrow", "does not apply to a grid study; list the values in sweep.grid"),
    ]
    for ok, key, what in problems:
        if not ok:
            raise ConfigError(f"config key '{key}' {what}")


def search_space(cfg: SweepRunConfig) -> tuple[Path | None, dict[str, Any]]:
    """Check a stage sweep's settings and resolve its narrowed search space (a grid study's
    space is its grid; it has no file)."""
    check_sweep(cfg)
    if cfg.sweep.search == "grid":
        space_file, space = None, grid_space(cfg.sweep.grid)
    else:
        # a pretraining method other than SimCLR searches its own knobs unless sweep.space names a file
        own = cfg.stage == "pretrain" and cfg.pretrain.method != "simclr"
        space_file = space_path(f"pretrain_{cfg.pretrain.method}" if own else cfg.stage, cfg.sweep.space)
        space = narrow(load_space(space_file), cfg.sweep.narrow)
    check_keys(space, cfg)
    return space_file, space


def check_inits(cfg: SweepRunConfig, space: dict[str, Any]) -> None:
    """Every `runs:/RUN` a fine-tune sweep starts from must exist before any trial starts."""
    spec = space.get("finetune.init", cfg.finetune.init)
    inits = spec["values"] if isinstance(spec, dict) else [spec]
    for init in inits if cfg.stage == "finetune" else []:
        init_run(str(init))  # the runner's own reading of the value, so a trial cannot disagree
