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

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from skinclr import names
from skinclr.track import tracking
from skinclr.track.tracking import RunLogger
from skinclr.tune.plan import StagePlan, SweepPlan, command_tags, load_run_config, resolve_plan
from skinclr.tune.records import SweepOutcome
from skinclr.tune.spaces import parent_params
from skinclr.tune.tuner import driver_tracking_uri, ray_session, run_sweep


@dataclass
class PipelineOutcome:
    """What a pipeline comes to; `skinclr quickstart` prints and promotes from it."""
    run_id: str  # the top-level MLflow run every stage nests under
    pretrain: SweepOutcome
    finetune_run_id: str | None = None  # the best fine-tuned run (the one run, or the sweep's best trial)
    finetune_value: float | None = None  # its best val balanced accuracy
    evaluation: dict | None = None  # the evaluation report, when this command evaluated
    finished: bool = False


def run_pipeline(plan: SweepPlan, on_stage: Callable[[str, str], None] | None = None) -> PipelineOutcome:
    """Pretrain sweep -> fine-tune (a sweep, or one run) from the best pretrain trial ->
    evaluation of the best fine-tuned model, all under one top-level MLflow run. The pipeline's
    folder records each finished step, so --resume picks up where it stopped.

    `on_stage(stage, source)` is called as each stage starts, with what it starts from:
    ("pretrain", ""), ("finetune", the best pretrain run id), ("evaluate", the model URI)."""
    from skinclr.run.runner import run_finetune

    announce = on_stage or (lambda stage, source: None)
    cfg, extra, folder = plan.cfg, plan.extra, plan.folder
    driver_tracking_uri()
    tracking.ensure_experiment(cfg.experiment)
    state_file = folder / names.PIPELINE_STATE_FILE
    if plan.resume:
        state = json.loads(state_file.read_text())
        top = RunLogger(state["run_id"])
        top.reopen()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        top = RunLogger.create(cfg.experiment, cfg.tracking.run_name or f"pipeline-{folder.name}",
                               tags={names.PIPELINE_PARENT_TAG: "1", names.STAGE_TAG: "pipeline",
                                     **command_tags(plan.command)})
        top.log_params(parent_params(cfg.flat(), plan.pretrain.space))  # swept keys: their distribution
        top.log_artifact(plan.finetune_file, "pipeline")
        state = {"run_id": top.run_id, "command": plan.command}
        state_file.write_text(json.dumps(state))
    command = state.get("command") or plan.command  # what began the pipeline, for every run it makes
    for stage in plan.stages():
        stage.command = command

    def sweep_stage(stage: StagePlan) -> SweepOutcome:
        stage.resume = (stage.folder / names.SWEEP_STATE_FILE).is_file()  # this pipeline began it before
        return run_sweep(stage, parent_of=top.run_id)

    def record(**done) -> None:
        state.update(done)
        state_file.write_text(json.dumps(state))

    with tracking.ending(top, finish=False):  # an error or Ctrl-C ends it FAILED or KILLED
        announce("pretrain", "")
        pre = sweep_stage(plan.pretrain)
        outcome = PipelineOutcome(top.run_id, pre)
        if pre.best_run_id is None:
            top.end("FAILED")
            print("[pipeline] no pretrain trial finished an epoch; nothing to fine-tune", flush=True)
            return outcome
        ft_cfg = plan.finetune.cfg if plan.finetune else plan.finetune_run
        ft_cfg.data.split_file = str(pre.folder / "split.csv")
        ft_cfg.finetune.init = f"runs:/{pre.best_run_id}"
        announce("finetune", pre.best_run_id)
        if plan.finetune:
            ft = sweep_stage(plan.finetune)
            best_run, best_value = ft.best_run_id, ft.best_value
        elif "finetune_run_id" in state:
            best_run, best_value = state["finetune_run_id"], state["finetune_best"]
        else:
            best_run = run_finetune(ft_cfg, parent_run_id=top.run_id,
                                    tags={names.PIPELINE_RUN_TAG: top.run_id, **command_tags(command)}).run_id
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
            from skinclr.report.evaluate import balanced_text, evaluate

            announce("evaluate", f"runs:/{best_run}/model")
            report = evaluate(f"runs:/{best_run}/model", extra["eval_data"], experiment=cfg.experiment)
            RunLogger(report["run_id"]).set_tags({names.PARENT_TAG: top.run_id, names.PIPELINE_RUN_TAG: top.run_id,
                                                  **command_tags(command)})  # nest it under the pipeline
            top.log_metrics({"test_balanced_accuracy": report["balanced_accuracy"],
                             "test_accuracy": report["accuracy"]}, step=0)
            top.set_tags({names.EVAL_DATA_TAG: extra["eval_data"], names.EVAL_RUN_TAG: report["run_id"]})
            record(eval_run_id=report["run_id"])
            outcome.evaluation = report
            print(f"[pipeline] best model runs:/{best_run}/model on {extra['eval_data']}: balanced accuracy "
                  f"{balanced_text(report)}, accuracy {report['accuracy']:.4f}", flush=True)
        top.end("FINISHED")
        outcome.finished = True
        print(f"[pipeline] done: MLflow run {top.run_id}; best pretrain run {pre.best_run_id}, "
              f"best fine-tune run {best_run} (val balanced accuracy {best_value})", flush=True)
        return outcome


def run_plan(plan: SweepPlan) -> int:
    """`skinclr sweep` of a resolved plan (every config error already surfaced); the exit code."""
    with ray_session():
        if plan.stage is None:
            return 0 if run_pipeline(plan).finished else 1
        outcome = run_sweep(plan.stage)
    if outcome.best_run_id is None:
        print(f"[sweep] no trial reported {outcome.metric}; the trials' errors are in {outcome.folder}", flush=True)
        return 1
    return 0


def command_line(config_path: str | Path | None, overrides: list[str] | None = None, resume: bool = False) -> str:
    """The `skinclr sweep` command line that does what `main` is asked to."""
    args = ["skinclr", "sweep", *(["--config", str(config_path)] if config_path else [])]
    for override in overrides or []:
        args += ["--set", override]
    return shlex.join(args + (["--resume"] if resume else []))


def main(config_path: str | Path | None, overrides: list[str] | None = None, resume: bool = False) -> int:
    """`skinclr sweep --config F [--set k=v ...] [--resume]` from Python; the exit code."""
    return run_plan(resolve_plan(load_run_config(config_path, overrides), resume,
                                 command=command_line(config_path, overrides, resume)))
