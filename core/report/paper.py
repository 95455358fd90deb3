"""The paper's Table 1, Table 2 and Figures 1-3, rebuilt from MLflow runs and nothing else.

Table 1 groups finished fine-tune runs by their init (scratch, ImageNet, SimCLR; MoCo v2 and BYOL
when there are runs of them) and gives mean ± sample std over the runs of each group (seeds):
validation numbers from each run's best epoch (`best_val_*`), test numbers from the newest
`skinclr evaluate` run of the run's model. Balanced accuracy and accuracy always sit in separate,
labelled columns: the original paper reported the second under the name of the first. Table 2
and the figures describe the single best run (highest val balanced accuracy), redrawn from the
`report/` files it logged.

Sweep trials are left out: they differ in hyperparameters, not only in seed, so their spread is
not seed variance; each sweep is listed instead, with the way to its Optuna charts. The report
itself becomes an MLflow run (experiment `skinclr-report`).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run

from skinclr.train import figures, metrics as M
from skinclr import names
from skinclr.track import store, tracking
from skinclr.track.tracking import RunLogger, ending
from skinclr.report import study as S
from skinclr.report.study import PAPER_INITS, init_group, init_groups

REPORT_EXPERIMENT = "skinclr-report"
DASH = "—"
FIGURES = {"figure1_loss_curves.png": "Figure 1. Training and validation loss per epoch",
           "figure2_accuracy_curves.png": "Figure 2. Validation accuracy and balanced accuracy per epoch",
           "figure3_confusion_matrix.png": "Figure 3. Validation confusion matrix at the best epoch"}


class ReportError(ValueError):
    """No runs to report on, or a run missing what the report needs."""


def is_sweep_run(run: Run) -> bool:
    tags = run.data.tags
    return names.SWEEP_RUN_TAG in tags or names.SWEEP_PARENT_TAG in tags


def finetune_runs(experiments: list[str]) -> tuple[list[Run], int]:
    """Finished fine-tune runs with best-epoch metrics (newest first), and how many sweep runs were left out."""
    ids = experiment_ids(experiments)
    runs = mlflow.search_runs(ids, filter_string=f"attributes.status = 'FINISHED' and tags.`{names.STAGE_TAG}` = 'finetune'",
                              output_format="list")
    sweep = [r for r in runs if is_sweep_run(r)]
    kept = [r for r in runs if not is_sweep_run(r) and "best_val_balanced_accuracy" in r.data.metrics]
    if not kept:
        raise ReportError(f"no finished fine-tune run with best_val_balanced_accuracy in {', '.join(experiments)} "
                          f"({len(sweep)} sweep runs not counted); run `skinclr finetune` with experiments/paper/*.yaml")
    return kept, len(sweep)


def evaluation_runs(model_run_ids: list[str]) -> dict[str, Run]:
    """The newest finished `skinclr evaluate` run on unseen images of each model run, from any
    experiment. Test means unseen: an evaluation on the model's own training or validation images
    logs train_*/val_* numbers, never test_* ones, and is tagged with the role its images had. One
    without that tag does not count: its data fingerprint names file times as well as images, so
    a copy of the training folder would pass for other data."""
    evals = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"attributes.status = 'FINISHED' and tags.`{names.STAGE_TAG}` = 'evaluate'",
                               order_by=["attributes.start_time DESC"])
    wanted, out = set(model_run_ids), {}
    for run in evals:
        rid, tags = run.data.tags.get(names.MODEL_RUN_TAG), run.data.tags
        if rid in wanted and rid not in out and "test_balanced_accuracy" in run.data.metrics \
                and tags.get(names.DATA_ROLE_TAG) in ("test", "mixed"):
            out[rid] = run
    return out


def _test_metric(run: Run, tests: dict[str, Run], key: str) -> float | None:
    """A run's test number: its saved model on its own held-out test side (data.test_fraction),
    else its newest evaluation on unseen images."""
    if key in run.data.metrics:
        return run.data.metrics[key]
    evaluation = tests.get(run.info.run_id)
    return evaluation.data.metrics.get(key) if evaluation else None


def _cell(values: list[float], n: int) -> str:
    if not values:
        return DASH
    mean, std = M.mean_std(values)
    text = f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f}"
    return text if len(values) == n else f"{text} ({len(values)} of {n} runs)"


@dataclass
class Table1:
    frame: pd.DataFrame  # what report.md shows
    values: dict[str, dict[str, list[float]]]  # group -> column -> per-run numbers behind each cell


def table1(runs: list[Run], tests: dict[str, Run]) -> Table1:
    rows, values = [], {}
    for group in init_groups():
        members = [r for r in runs if init_group(r) == group]
        if not members and group not in PAPER_INITS:
            continue
        ids = [r.info.run_id for r in members]
        v = {"val_balanced_accuracy": [r.data.metrics["best_val_balanced_accuracy"] for r in members],
             "val_accuracy": [r.data.metrics["best_val_accuracy"] for r in members if "best_val_accuracy" in r.data.metrics],
             **{key: [x for x in (_test_metric(r, tests, key) for r in members) if x is not None]
                for key in ("test_balanced_accuracy", "test_accuracy")}}
        values[group] = v
        rows.append({"init": group, "n runs": len(members),
                     "val balanced accuracy": _cell(v["val_balanced_accuracy"], len(members)),
                     "val accuracy": _cell(v["val_accuracy"], len(members)),
                     "test balanced accuracy": _cell(v["test_balanced_accuracy"], len(members)),
                     "test accuracy": _cell(v["test_accuracy"], len(members)),
                     "runs": ", ".join(ids) or DASH})
    return Table1(pd.DataFrame(rows), values)


def table2(val_metrics: dict) -> pd.DataFrame:
    """Per-class precision, recall, F1, support (and ROC-AUC) of one run's best validation epoch."""
    frame = M.report_frame(val_metrics)
    return frame.rename(columns={"f1": "F1", "roc_auc": "ROC-AUC"})


def _markdown(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub table without the optional `tabulate` dependency."""
    if index:
        frame = frame.reset_index(names="")
    def fmt(v):
        if isinstance(v, float):
            return DASH if pd.isna(v) else f"{v:.4f}"
        return str(v)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _download_json(run_id: str, artifact: str, dst: Path):
    path = RunLogger(run_id).download(artifact, dst)
    if path is None:
        raise ReportError(f"run {run_id} has no '{artifact}' artifact; is it a complete skinclr fine-tune run?")
    return json.loads(path.read_text())


def experiment_ids(experiments: list[str]) -> list[str]:
    c = tracking.client()
    ids = []
    for name in experiments:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(sorted(e.name for e in c.search_experiments())) or "none"
            raise ReportError(f"no experiment '{name}' in {store.tracking_uri()} (experiments: {known}); "
                              "check --experiment and MLFLOW_TRACKING_URI")
        ids.append(exp.experiment_id)
    return ids


def build_report(experiments: list[str], out: Path, study: str | None = None, command: str = "") -> Path:
    """Write report.md with its tables and figures to `out`, log them as a new run of experiment
    `skinclr-report` (tag `skinclr.report=1`), and return report.md's path.

    The paper's tables come from the plain fine-tune runs; the study section from a grid study
    (`study`, else the newest one in the experiments): label efficiency when it spans label
    fractions, a table by init otherwise; then every sweep, with where its charts are. An experiment
    holding only a study (or sweeps) gets only those sections. `command`: the command line, tagged on the run."""
    out = Path(out)
    ids = experiment_ids(list(experiments))
    try:
        runs, n_sweep = finetune_runs(list(experiments))
    except ReportError as err:
        runs, n_sweep, no_runs = [], 0, err
    try:
        parent = S.find_study(ids, study)
    except S.StudyError as err:
        raise ReportError(str(err)) from None
    sweeps = S.sweep_parents(ids)
    if not runs and parent is None and not sweeps:
        raise no_runs
    out.mkdir(parents=True, exist_ok=True)
    parts, files, tags = [], [], {names.COMMAND_TAG: command} if command else {}
    if runs:
        section, written, best_id = _paper_section(runs, n_sweep, out)
        parts += section
        files += written
        tags[names.BEST_RUN_TAG] = best_id
    if parent is not None:
        try:
            frame = S.study_frame(parent)
        except S.StudyError as err:
            raise ReportError(str(err)) from None
        section, written = _study_section(frame, parent, out)
        parts += section
        files += written
        tags[names.STUDY_RUN_TAG] = parent.info.run_id
    if sweeps:
        parts += [f"## Sweeps ({len(sweeps)})", "Each sweep's parent run holds its trials table (`sweep/trials.csv`) and "
                  "Optuna's interactive charts of its trials (optimization history, parameter importances, parallel "
                  "coordinates), which the run's Artifacts tab in the MLflow UI shows.", _markdown(S.sweeps_table(sweeps))]

    logger = RunLogger.create(REPORT_EXPERIMENT, run_name="report", tags={
        names.REPORT_TAG: "1", names.STAGE_TAG: "report", names.REPORT_EXPERIMENTS_TAG: ",".join(experiments), **tags})
    with ending(logger):
        logger.log_params({"experiments": ",".join(experiments), "runs": len(runs), "sweep_runs_left_out": n_sweep})
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = [
            "# skinclr: ISIC 2018 Task 3 results",
            f"Rebuilt from MLflow runs of experiment(s) {', '.join(f'`{e}`' for e in experiments)} in "
            f"`{store.tracking_uri()}` on {when}; this report is MLflow run `{logger.run_id}` "
            f"(experiment `{REPORT_EXPERIMENT}`).",
            "**Balanced accuracy** is the mean recall over the classes (the official ISIC 2018 metric); "
            "**accuracy** is the fraction of images classified correctly. They are different numbers and are "
            "never merged into one column. Validation numbers come from a lesion-grouped split of the training "
            "data and are chosen by it (best epoch): they overstate what an independent test set shows.",
        ]
        (out / "report.md").write_text("\n\n".join(header + parts) + "\n")
        for name in ("report.md", *files):
            logger.log_artifact(out / name)
    return out / "report.md"


def _paper_section(runs: list[Run], n_sweep: int, out: Path) -> tuple[list[str], list[str], str]:
    """Table 1, Table 2 and Figures 1-3 (files written to `out`): text parts, file names, best run."""
    tests = evaluation_runs([r.info.run_id for r in runs])
    t1 = table1(runs, tests)
    best = max(runs, key=lambda r: r.data.metrics["best_val_balanced_accuracy"])
    bid = best.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        val_metrics = _download_json(bid, "report/val_metrics.json", Path(tmp))
        history = _download_json(bid, "report/history.json", Path(tmp))
    t2 = table2(val_metrics)
    figures.plot_loss_curves(history, out / "figure1_loss_curves.png")
    figures.plot_accuracy_curves(history, out / "figure2_accuracy_curves.png")
    figures.plot_confusion_matrix(val_metrics, out / "figure3_confusion_matrix.png",
                            title=f"run {bid[:8]} ({init_group(best)}), val, epoch {best.data.tags.get(names.BEST_EPOCH_TAG, '?')}")
    t1.frame.to_csv(out / "table1.csv", index=False)
    t2.to_csv(out / "table2.csv")
    parts = [
        f"## Table 1. Balanced accuracy and accuracy by initialisation ({len(runs)} fine-tune runs)",
        _markdown(t1.frame),
        "Validation: each run's best epoch (`best_val_balanced_accuracy`, `best_val_accuracy`). Test: the newest "
        f"`skinclr evaluate` run of the run's model on images it never trained or validated on ({DASH} when it has "
        "none). Mean ± sample standard deviation over runs (seeds); one run shows its value alone."
        + (f" {n_sweep} sweep runs are left out: they vary hyperparameters, not only the seed (their sweeps are "
           "listed below)." if n_sweep else ""),
        f"## Table 2. Per-class results of the best run (`{bid}`, {init_group(best)})",
        f"Validation set of {val_metrics['num_samples']} images at epoch {best.data.tags.get(names.BEST_EPOCH_TAG, '?')}: "
        f"balanced accuracy {val_metrics['balanced_accuracy']:.4f}, accuracy {val_metrics['accuracy']:.4f}. "
        f"\"macro avg\" recall equals balanced accuracy, \"weighted avg\" recall equals accuracy; {DASH} marks a class "
        "absent from the validation set.",
        _markdown(t2, index=True),
    ]
    parts += [f"## {caption} (run `{bid}`)\n\n![{caption}]({name})" for name, caption in FIGURES.items()]
    return parts, ["table1.csv", "table2.csv", *FIGURES], bid


def _study_section(frame: pd.DataFrame, parent: Run, out: Path) -> tuple[list[str], list[str]]:
    """One grid study (files written to `out`): over label fractions, the label-efficiency figure
    and table; over inits alone (pretraining methods, seeds), the table by init. Text parts, file names."""
    pid = parent.info.run_id
    table = S.study_table(frame)
    note = ("Mean ± sample standard deviation over seeds of each run's best epoch; \"pretraining\" gives each "
            "pretraining run's kNN monitor (balanced accuracy) at its first, middle and last monitored epoch.")
    if frame["label_fraction"].nunique() < 2:
        table = table.drop(columns="label fraction")
        table.to_csv(out / "study.csv", index=False)
        return [f"## Study `{pid}`: by init ({len(frame)} finished runs)",
                "Each run fine-tunes with the same settings; the runs differ in their init and seed. " + note,
                _markdown(table), f"Optuna charts of the study: {S.charts_text(parent)}."], ["study.csv"]
    table.to_csv(out / "label_efficiency.csv", index=False)
    S.plot_label_efficiency(frame, out / "label_efficiency.png",
                            title=f"label efficiency, study {pid[:8]}: mean ± 1 std over seeds, lesion-grouped val")
    return [
        f"## Label efficiency (study `{pid}`, {len(frame)} finished runs)",
        "Each run fine-tunes on a lesion-grouped, class-stratified subset of the train side "
        "(`data.label_fraction`); the val side is the same for all. " + note,
        _markdown(table),
        "![label efficiency](label_efficiency.png)",
        f"Optuna charts of the study: {S.charts_text(parent)}.",
    ], ["label_efficiency.csv", "label_efficiency.png"]
