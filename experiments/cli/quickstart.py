"""`skinclr quickstart`: the whole platform in minutes on a laptop CPU, on synthetic data.

synthetic data -> the pipeline of `skinclr sweep` (SimCLR sweep with ASHA + Optuna, fine-tune
from the best trial, evaluation on a held-out synthetic set) -> promote to `champion`. Running
it again reuses the data and the cache and adds a new pipeline; the champion moves only if the
new model is better.
"""
from __future__ import annotations

import json
import shlex
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import skinclr.configs
from skinclr.data.images import default_workers
from skinclr.track import store, tracking

MODEL_NAME = "skinclr-quickstart"  # its registered model
# A pipeline config (its fine-tune stage is quickstart_finetune.yaml), shipped with the package.
CONFIG = Path(skinclr.configs.__file__).parent / "quickstart.yaml"


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def _synthetic(folder: Path, pool: Executor) -> tuple[Path, Path]:
    from skinclr.data.synth import make_synthetic

    return make_synthetic(folder / "train", n=600, seed=0, pool=pool), make_synthetic(folder / "test", n=210, seed=1,
                                                                                      pool=pool)


def quickstart(workdir: Path = Path("quickstart"), command: str = "") -> int:
    """The quickstart in `workdir`; `command`, the command line that started it, is tagged on
    every run it makes (default: `skinclr quickstart --workdir WORKDIR`)."""
    t0 = time.perf_counter()
    workdir = Path(workdir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")

    _step(1, f"synthetic data in {workdir / 'data'} (reused when present)")
    # A process per core draws the images while this one imports the libraries (1-1.4 s sooner).
    # The processes are forked first, before any import runs beside them (a fork during an import
    # can leave a child waiting on that import's lock for ever).
    with ProcessPoolExecutor(default_workers()) as pool, ThreadPoolExecutor(1) as drawing:
        pool.submit(int).result()  # with fork, the first task starts every process
        data = drawing.submit(_synthetic, workdir / "data", pool)
        from skinclr.track.registry import CHAMPION, alias_version, promote
        from skinclr.report.evaluate import balanced_text
        from skinclr.tune.plan import load_run_config, resolve_plan
        from skinclr.tune.tuner import ray_session
        from skinclr.tune.sweep import run_pipeline
        train, test = data.result()

    plan = resolve_plan(load_run_config(CONFIG, [f"data.root={train}", f"sweep.name=quickstart-{stamp}",
                                                 f"sweep.storage={workdir / 'ray'}", f"sweep.eval_data={test}"]),
                        command=command or shlex.join(["skinclr", "quickstart", "--workdir", str(workdir)]))

    def announce(stage: str, source: str) -> None:
        if stage == "pretrain":
            _step(2, "SimCLR sweep: 4 trials, 2 at a time, ASHA early stopping, Optuna TPE")
        elif stage == "finetune":
            _step(3, f"fine-tune from the best trial's backbone (run {source})")
        else:
            _step(4, f"evaluate on a held-out synthetic test set ({test})")

    with ray_session():
        outcome = run_pipeline(plan, on_stage=announce)
    sweep, result = outcome.pretrain, outcome.evaluation
    if sweep.best_run_id is None:
        print(f"no trial finished an epoch; see the trial errors in {sweep.folder}")
        return 1
    if not outcome.finished:
        return 1
    (workdir / f"evaluation-{stamp}.json").write_text(json.dumps(result, indent=1))
    for line in result["warnings"]:
        print(f"warning: {line}")

    _step(5, "promote to the Model Registry (alias champion moves only if the model is better)")
    print(promote(plan.cfg.experiment, metric="val_balanced_accuracy", name=MODEL_NAME))

    print("\nSimCLR sweep trials (kNN balanced accuracy on the lesion-grouped val split):")
    table = sweep.table
    cols = [c for c in table.columns if c in ("trial_id", "status", "epochs", "stopped_by")
            or c.startswith(("simclr.", "augment.", "train.lr")) or "knn_balanced_accuracy" in c]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    model_uri = f"runs:/{outcome.finetune_run_id}/model"
    last = tracking.client().get_run(outcome.finetune_run_id).data.metrics  # each metric's last epoch
    print(f"\nfine-tuned model {model_uri}")
    print(f"  val  balanced accuracy {last.get('val_balanced_accuracy', float('nan')):.4f}   "
          f"accuracy {last.get('val_accuracy', float('nan')):.4f}  (last epoch)")
    print(f"  test balanced accuracy {balanced_text(result)}   accuracy {result['accuracy']:.4f}")
    champion = alias_version(tracking.client(), MODEL_NAME, CHAMPION)
    start = "" if tracking.browse_hint() == "" else "  .venv/bin/skinclr server      # first, then open:\n"
    print(f"\ndone in {time.perf_counter() - t0:.0f} s. Browse every run, metric and artifact in the MLflow UI "
          f"(store: {store.tracking_uri()}):\n{start}"
          f"  the sweep's trials   {tracking.experiment_link(tracking.ensure_experiment(plan.cfg.experiment))}\n"
          f"  the sweep            {tracking.run_link(sweep.parent_run_id)}\n"
          f"  the fine-tuned model {tracking.run_link(outcome.finetune_run_id)}\n"
          f"  the champion         {tracking.model_link(MODEL_NAME, champion.version if champion else None)}")
    return 0
