"""Every check a sweep can make before Ray starts, so a wrong config costs seconds, not a cluster,
and the sweep's plan resolved once from them.

`search_space` checks the sweep section against the stage it sweeps and resolves what the trials
draw from; `check_inits` makes sure every pretrain run a fine-tune sweep starts from exists;
`resolve_plan` does both, for one stage or each stage of the pipeline, finds the folders and
checks them against `--resume`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from skinclr import names
from skinclr.config import ConfigError, load_yaml
from skinclr.train.finetune import init_run
from skinclr.tune.folder import check_resume, sweep_folder
from skinclr.tune.plan import StagePlan, SweepPlan, SweepRunConfig, load_sweep_config, pipeline_keys
from skinclr.train.methods import METHODS
from skinclr.tune.spaces import (METHODS_SPACE, check_keys, grid_space, load_space, narrow, pretrain_space, project_path,
                                 space_path)
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


def search_space(cfg: SweepRunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a stage sweep's settings and resolve what its trials draw from: (the space as
    declared, the space after `sweep.narrow`). A grid study's space is its grid; a pretraining
    sweep's, unless `sweep.space` names a file, is its method's ranges and the shared ones
    (`sweep.space: methods`: every registered method's, choosing the method too)."""
    check_sweep(cfg)
    if cfg.sweep.search == "grid":
        full = grid_space(cfg.sweep.grid)
        space = full
    else:
        if cfg.stage == "pretrain" and cfg.sweep.space in ("", METHODS_SPACE):
            full = pretrain_space(list(METHODS) if cfg.sweep.space == METHODS_SPACE else [cfg.pretrain.method])
        else:
            full = load_space(space_path(cfg.stage, cfg.sweep.space))
        space = narrow(full, cfg.sweep.narrow)
    check_keys(space, cfg)
    return full, space


def check_inits(cfg: SweepRunConfig, space: dict[str, Any]) -> None:
    """Every `runs:/RUN` a fine-tune sweep starts from must exist before any trial starts."""
    spec = space.get("finetune.init", cfg.finetune.init)
    inits = spec["values"] if isinstance(spec, dict) else [spec]
    for init in inits if cfg.stage == "finetune" else []:
        init_run(str(init))  # the runner's own reading of the value, so a trial cannot disagree


def stage_plan(cfg: SweepRunConfig, resume: bool = False, folder: Path | None = None) -> StagePlan:
    """One stage's sweep: its settings checked, its space narrowed, its folder found."""
    drawn_from, space = search_space(cfg)
    return StagePlan(cfg, drawn_from, space, folder or sweep_folder(cfg), resume)


def pipeline_plan(cfg: SweepRunConfig, extra: dict[str, str], folder: Path, resume: bool) -> SweepPlan:
    """The pipeline's pretrain sweep and its fine-tuning: a sweep when the fine-tune config has a
    sweep section, else one run. Fine-tuning reads the pretrain stage's data and logs to the
    pipeline's experiment, so the UI nests every run under the pipeline's."""
    if not extra.get("finetune_config"):
        raise ConfigError("a pipeline needs sweep.finetune_config: the fine-tune config (with a sweep section "
                          "to sweep, without one for a single run)")
    ft_file = project_path(extra["finetune_config"])
    ft, _ = load_sweep_config(ft_file, [])
    if ft.stage != "finetune":
        raise ConfigError(f"sweep.finetune_config '{extra['finetune_config']}' is a {ft.stage} config; "
                          "point it at a config with stage: finetune")
    pre = copy.deepcopy(cfg)
    ft.data = copy.deepcopy(cfg.data)
    ft.tracking.experiment = cfg.experiment
    for stage_cfg in (pre, ft):
        stage_cfg.sweep.stage = stage_cfg.stage
        stage_cfg.sweep.name = f"{folder.name}-{stage_cfg.stage}"
        stage_cfg.sweep.storage = str(folder.parent)
    ft_sweeps = "sweep" in load_yaml(ft_file, "sweep.finetune_config")
    return SweepPlan(cfg, extra, folder, resume, pretrain=stage_plan(pre), finetune_file=ft_file,
                     finetune=stage_plan(ft) if ft_sweeps else None, finetune_run=None if ft_sweeps else ft)


def resolve_plan(cfg: SweepRunConfig, resume: bool = False, command: str = "") -> SweepPlan:
    """`skinclr sweep` of a loaded config, checked and resolved once: every config error, a sweep
    already there (without --resume) or nothing to resume surfaces here, before Ray starts.
    `command`: the command line that reproduces it, tagged on every run it makes."""
    extra = pipeline_keys(cfg)
    folder = sweep_folder(cfg, extra)
    if cfg.sweep.stage == "pipeline":
        plan = pipeline_plan(cfg, extra, folder, resume)
        check_resume(folder / names.PIPELINE_STATE_FILE, resume)
    else:
        stage = stage_plan(cfg, resume, folder)
        check_resume(folder / names.SWEEP_STATE_FILE, resume)
        if not resume:
            check_inits(cfg, stage.space)
        plan = SweepPlan(cfg, extra, folder, resume, stage=stage)
    plan.command = command
    for stage in plan.stages():
        stage.command = command
    return plan
