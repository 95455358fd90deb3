"""A sweep's plan: its config typed, checked and resolved once, before Ray starts, so a wrong
config costs seconds, not a cluster.

The library carries the `sweep:` section as data (core/config_schema.py), so one YAML file holds a
run and its sweep; `SweepRunConfig` types it. Every command loads its config through
`load_run_config`, so a `skinclr finetune` of a file with a sweep section checks that section too,
and a run's resolved config, params and run key hold the whole section, defaults included,
whichever command ran it. Because every command loads it, what needs torch, MLflow or Ray is
imported where it is used.

`resolve_plan` makes `skinclr sweep`'s plan, for one stage or each stage of the pipeline:
`search_space` checks the sweep section against the stage it sweeps and resolves what the trials
draw from; `check_inits` makes sure every pretrain run a fine-tune sweep starts from exists; the
folders are named by the config's hash (`sweep_folder`, so the same command finds them again) and
checked against `--resume`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinclr import names
from skinclr.config import Config, ConfigError, hash_items, load_config, load_yaml, require
from skinclr.train.methods import METHODS
from skinclr.tune.spaces import (METHODS_SPACE, check_keys, grid_space, load_space, narrow, pretrain_space, project_path,
                                 space_path)

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


def sweep_folder(cfg: SweepRunConfig, extra: dict[str, str] | None = None) -> Path:
    """`<sweep.storage>/<sweep.name>`; the name defaults to the stage and a hash of the config,
    so the same command finds the same folder again for --resume."""
    from skinclr.track import tracking

    storage = Path(cfg.sweep.storage or Path.home() / "ray_results").expanduser().resolve()
    key = tracking.run_key({**hash_items(cfg), **(extra or {})})[:8]
    return storage / (cfg.sweep.name or f"{cfg.sweep.stage if extra else cfg.stage}-{key}")


def check_resume(state_file: Path, resume: bool) -> None:
    """A new sweep must not land on an existing one, and --resume needs one to continue."""
    if state_file.is_file() and not resume:
        raise ConfigError(f"a sweep of this config already lives in {state_file.parent}; continue it with "
                          "--resume, or set sweep.name to start another")
    if resume and not state_file.is_file():
        raise ConfigError(f"nothing to resume in {state_file.parent}; run the same command without --resume")


def check_sweep(cfg: SweepRunConfig) -> None:
    """The sweep section's values, checked against the stage the trials run."""
    from skinclr.tune.trainables import METRICS

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
    from skinclr.train.finetune import init_run

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
