"""`skinclr sweep`: a Ray Tune search over one stage, or the two-stage pipeline (a pretrain sweep,
fine-tuning from its best trial, evaluation).

The driver does what must happen once: it resolves the tracking store and creates the
experiment, decodes the images into the cache and pins one split file, and opens the sweep's
MLflow parent run. Tune then runs the trials and a callback closes each trial's MLflow child run
as Tune decides its fate, so no run is left RUNNING. A sweep's folder keeps the parent run id,
so `--resume` after a killed driver continues the same parent, the same child runs and the
unfinished trials' checkpoints. In the pipeline, fine-tuning is a sweep of its own when its
config has a sweep section, else one run; every run nests under one top-level MLflow run, and
the pipeline's folder records each finished step.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from skinclr import names
from skinclr.config import ConfigError
from skinclr.track import tracking
from skinclr.track.tracking import RunLogger
from skinclr.tune.plan import SweepRunConfig, load_sweep_config
from skinclr.tune.folder import check_resume, sweep_folder
from skinclr.tune.preflight import check_inits, search_space
from skinclr.tune.ray_session import ray_session
from skinclr.tune.spaces import project_path
from skinclr.tune.summary import SweepOutcome
from skinclr.tune.tuner import driver_tracking_uri, run_sweep


def pipeline_stages(cfg: SweepRunConfig, extra: dict[str, str]) -> tuple[SweepRunConfig, SweepRunConfig, bool]:
    """The pipeline's pretrain and fine-tune configs, and whether fine-tuning is a sweep (its
    file has a sweep section) or one run. Fine-tuning reads the pretrain stage's data and logs
    to the pipeline's experiment, so the UI nests every run under the pipeline's."""
    if not extra.get("finetune_config"):
        raise ConfigError("a pipeline needs sweep.finetune_config: the fine-tune config (with a sweep section "
                          "to sweep, without one for a single run)")
    folder = sweep_folder(cfg, extra)
    pre = copy.deepcopy(cfg)
    ft_file = project_path(extra["finetune_config"])
    ft, _ = load_sweep_config(ft_file, [])
    if ft.stage != "finetune":
        raise ConfigError(f"sweep.finetune_config '{extra['finetune_config']}' is a {ft.stage} config; "
                          "point it at a config with stage: finetune")
    ft.data = copy.deepcopy(cfg.data)
    ft.tracking.experiment = cfg.experiment
    for stage_cfg in (pre, ft):
        stage_cfg.sweep.stage = stage_cfg.stage
        stage_cfg.sweep.name = f"{folder.name}-{stage_cfg.stage}"
        stage_cfg.sweep.storage = str(folder.parent)
    ft_sweeps = "sweep" in (yaml.safe_load(ft_file.read_text()) or {})
    return pre, ft, ft_sweeps


@dataclass
class PipelineOutcome:
    """What a pipeline comes to; `skinclr quickstart` prints and promotes from it."""
    run_id: str  # the top-level MLflow run every stage nests under
    pretrain: SweepOutcome
    finetune_run_id: str | None = None  # the best fine-tuned run (the one run, or the sweep's best trial)
    finetune_value: float | None = None  # its best val balanced accuracy
    evaluation: dict | None = None  # the evaluation report, when this command evaluated
    finished: bool = False


def run_pipeline(cfg: SweepRunConfig, extra: dict[str, str], resume: bool = False,
                 on_stage: Callable[[str, str], None] | None = None) -> PipelineOutcome:
    """Pretrain sweep -> fine-tune (a sweep, or one run) from the best pretrain trial ->
    evaluation of the best fine-tuned model, all under one top-level MLflow run. The pipeline's
    folder records each finished step, so --resume picks up where it stopped.

    `on_stage(stage, source)` is called as each stage starts, with what it starts from:
    ("pretrain", ""), ("finetune", the best pretrain run id), ("evaluate", the model URI)."""
    from skinclr.run.runner import run_finetune

    announce = on_stage or (lambda stage, source: None)
    pre_cfg, ft_cfg, ft_sweeps = pipeline_stages(cfg, extra)
    driver_tracking_uri()
    tracking.ensure_experiment(cfg.experiment)
    folder = sweep_folder(cfg, extra)
    state_file = folder / names.PIPELINE_STATE_FILE
    check_resume(state_file, resume)
    if resume:
        state = json.loads(state_file.read_text())
        top = RunLogger(state["run_id"])
        top.reopen()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        top = RunLogger.create(cfg.experiment, cfg.tracking.run_name or f"pipeline-{folder.name}",
                               tags={names.PIPELINE_PARENT_TAG: "1", names.STAGE_TAG: "pipeline"})
        top.log_params(cfg.flat())
        top.log_artifact(project_path(extra["finetune_config"]), "pipeline")
        state = {"run_id": top.run_id}
        state_file.write_text(json.dumps(state))

    def sweep_stage(stage_cfg: SweepRunConfig) -> SweepOutcome:
        started = (sweep_folder(stage_cfg) / names.SWEEP_STATE_FILE).is_file()
        return run_sweep(stage_cfg, resume=started, parent_of=top.run_id)

    def record(**done) -> None:
        state.update(done)
        state_file.write_text(json.dumps(state))

    announce("pretrain", "")
    pre = sweep_stage(pre_cfg)
    outcome = PipelineOutcome(top.run_id, pre)
    if pre.best_run_id is None:
        top.end("FAILED")
        print("[pipeline] no pretrain trial finished an epoch; nothing to fine-tune", flush=True)
        return outcome
    ft_cfg.data.split_file = str(pre.folder / "split.csv")
    ft_cfg.finetune.init = f"runs:/{pre.best_run_id}"
    announce("finetune", pre.best_run_id)
    if ft_sweeps:
        ft = sweep_stage(ft_cfg)
        best_run, best_value = ft.best_run_id, ft.best_value
    elif "finetune_run_id" in state:
        best_run, best_value = state["finetune_run_id"], state["finetune_best"]
    else:
        best_run = run_finetune(ft_cfg, parent_run_id=top.run_id, tags={names.PIPELINE_RUN_TAG: top.run_id}).run_id
        best_value = tracking.client().get_run(best_run).data.metrics.get("best_val_balanced_accuracy")
        record(finetune_run_id=best_run, finetune_best=best_value)
    outcome.finetune_run_id, outcome.finetune_value = best_run, best_value
    top.set_tags({names.BEST_PRETRAIN_TAG: pre.best_run_id, names.BEST_FINETUNE_TAG: best_run or ""})
    top.log_metrics({f"best_{pre.metric}": pre.best_value,
                     **({"best_val_balanced_accuracy": best_value} if best_value is not None else {})}, step=0)
    if best_run is None:
        top.end("FAILED")
        print("[pipeline] no fine-tune trial finished an epoch", flush=True)
        return outcome
    if extra.get("eval_data") and "eval_run_id" not in state:
        from skinclr.report.evaluate import evaluate

        announce("evaluate", f"runs:/{best_run}/model")
        report = evaluate(f"runs:/{best_run}/model", extra["eval_data"], experiment=cfg.experiment)
        RunLogger(report["run_id"]).set_tags({names.PARENT_TAG: top.run_id})  # nest it under the pipeline
        top.log_metrics({"test_balanced_accuracy": report["balanced_accuracy"],
                         "test_accuracy": report["accuracy"]}, step=0)
        top.set_tags({names.EVAL_DATA_TAG: extra["eval_data"], names.EVAL_RUN_TAG: report["run_id"]})
        record(eval_run_id=report["run_id"])
        outcome.evaluation = report
        print(f"[pipeline] best model runs:/{best_run}/model on {extra['eval_data']}: balanced accuracy "
              f"{report['balanced_accuracy']:.4f}, accuracy {report['accuracy']:.4f}", flush=True)
    top.end("FINISHED")
    outcome.finished = True
    print(f"[pipeline] done: MLflow run {top.run_id}; best pretrain run {pre.best_run_id}, "
          f"best fine-tune run {best_run} (val balanced accuracy {best_value})", flush=True)
    return outcome


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
