"""`skinclr sweep`: a Ray Tune search over one stage, or the pretrain -> fine-tune pipeline.

The driver does what must happen once: it resolves the tracking store and creates the
experiment (concurrent first use of a fresh SQLite store loses runs), decodes the images into
the cache and pins one split file, and opens the sweep's MLflow parent run. Tune then runs the
trials (ASHA stops the weak ones early; Optuna's TPE, or plain random sampling, proposes new
ones) and a Tune callback closes each trial's MLflow child run as Tune decides its fate, so no
run is left RUNNING. A sweep's folder keeps the parent run id, so `--resume` after a killed
driver continues the same parent, the same child runs and the unfinished trials' checkpoints.

The layer, one concept a module:

    sweep_config.py  the sweep's config: a run config plus its sweep section
    preflight.py     every check that can run before Ray starts
    sweep_state.py   the sweep's folder: created once, found again by --resume
    search.py        the search algorithm and the scheduler
    callbacks.py     Tune callbacks: close each trial's MLflow run, print progress
    tuner.py         one stage's sweep: the Tuner, new or restored, run to its end
    summary.py       the trials table and the best trial, on the parent run
    pipeline.py      pretrain sweep -> fine-tune -> evaluation under one run
    ray_session.py   join a cluster or start a local Ray
"""
from __future__ import annotations

from pathlib import Path

from core import names
from experiments.pipeline import pipeline_stages, run_pipeline
from experiments.preflight import check_inits, search_space
from experiments.ray_session import ray_session
from experiments.sweep_config import load_sweep_config
from experiments.sweep_state import check_resume, sweep_folder
from experiments.tuner import run_sweep


def main(config_path: str | Path | None, overrides: list[str] | None = None, resume: bool = False) -> int:
    """`skinclr sweep --config F [--set k=v ...] [--resume]`; returns the exit code."""
    cfg, extra = load_sweep_config(config_path, overrides)
    if cfg.sweep.stage == "pipeline":  # every config error surfaces before Ray starts
        pre, ft, ft_sweeps = pipeline_stages(cfg, extra)
        for stage_cfg in (pre, ft) if ft_sweeps else (pre,):
            search_space(stage_cfg)
        check_resume(sweep_folder(cfg, extra) / names.PIPELINE_STATE_FILE, resume)
    else:
        _, space = search_space(cfg)
        check_resume(sweep_folder(cfg) / names.SWEEP_STATE_FILE, resume)
        if not resume:
            check_inits(cfg, space)
    with ray_session():
        if cfg.sweep.stage == "pipeline":
            return 0 if run_pipeline(cfg, extra, resume).finished else 1
        outcome = run_sweep(cfg, resume=resume)
    if outcome.best_run_id is None:
        print(f"[sweep] no trial reported {outcome.metric}; the trials' errors are in {outcome.folder}", flush=True)
        return 1
    return 0
