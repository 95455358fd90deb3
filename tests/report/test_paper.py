"""The paper report rebuilt from real tiny runs: every number in it is a run's number."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinclr.track import tracking
from skinclr.report.paper import ReportError, build_report
from skinclr.track.tracking import RunLogger
from tests.track.test_registry import REPO, finetune_run

PRETRAIN = ["data.image_size=32", "train.epochs=1", "train.batch_size=16", "train.max_steps_per_epoch=3",
            "monitor.max_bank=64", "data.workers=0"]


@pytest.fixture(scope="module")
def report_db(synth_dir, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two scratch seeds (both evaluated on held-out images, one also on its training data), one
    fine-tune from a tiny SimCLR run (not evaluated)."""
    from skinclr.config import load_config
    from skinclr.report.evaluate import evaluate
    from skinclr.run.runner import run_pretrain

    root = tmp_path_factory.mktemp("report-store")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp_.setenv("SKINCLR_CACHE", str(root / "cache"))
        cfg = load_config(REPO / "experiments" / "paper" / "simclr_pretrain.yaml", [f"data.root={synth_dir}", *PRETRAIN],
                          stage="pretrain")
        pretrain = run_pretrain(cfg, progress=False).run_id
        ids = {"scratch0": finetune_run(synth_dir, "train.seed=0"),
               "scratch1": finetune_run(synth_dir, "train.seed=1"),
               "simclr": finetune_run(synth_dir, "train.seed=0", f"finetune.init=runs:/{pretrain}",
                                      config="finetune_simclr.yaml"),
               "pretrain": pretrain}
        from skinclr.data.synth import make_synthetic

        held_out = make_synthetic(root / "held-out", n=70, seed=1)  # other images under other ids
        for key in ("scratch0", "scratch1"):
            evaluate(f"runs:/{ids[key]}/model", held_out, progress=False)
        evaluate(f"runs:/{ids['scratch0']}/model", synth_dir, progress=False)  # newer, but on its own training data
    return root / "mlflow.db", ids


@pytest.fixture
def runs(report_db, tmp_path) -> dict[str, str]:
    shutil.copy(report_db[0], tmp_path / "mlflow.db")
    return report_db[1]


def _metric(run_id: str, key: str) -> float:
    return tracking.client().get_run(run_id).data.metrics[key]


def _test_metric(run_id: str, key: str) -> float:
    c = tracking.client()
    exp = c.get_experiment_by_name("skinclr-evaluate")
    [ev] = c.search_runs([exp.experiment_id], filter_string=f"tags.`skinclr.model_run_id` = '{run_id}' and "
                         "tags.`skinclr.data_role` = 'test'")
    return ev.data.metrics[key]


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


@pytest.mark.slow
def test_table1_holds_the_runs_numbers_by_init(runs, tmp_path):
    path = build_report(["skinclr-finetune"], tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "table1.csv", keep_default_na=False).set_index("init")
    assert list(table.index) == ["scratch", "ImageNet", "SimCLR"]
    assert list(table.columns) == ["n runs", "val balanced accuracy", "val accuracy", "test balanced accuracy",
                                   "test accuracy", "runs"]

    scratch = [runs["scratch0"], runs["scratch1"]]
    row = table.loc["scratch"]
    assert row["n runs"] == 2
    assert row["val balanced accuracy"] == _mean_std([_metric(r, "best_val_balanced_accuracy") for r in scratch])
    assert row["val accuracy"] == _mean_std([_metric(r, "best_val_accuracy") for r in scratch])
    assert row["test balanced accuracy"] == _mean_std([_test_metric(r, "test_balanced_accuracy") for r in scratch])
    assert row["test accuracy"] == _mean_std([_test_metric(r, "test_accuracy") for r in scratch])
    assert set(row["runs"].split(", ")) == set(scratch)

    row = table.loc["SimCLR"]
    assert row["n runs"] == 1 and row["runs"] == runs["simclr"]
    assert row["val balanced accuracy"] == f"{_metric(runs['simclr'], 'best_val_balanced_accuracy'):.4f}"
    assert row["val accuracy"] == f"{_metric(runs['simclr'], 'best_val_accuracy'):.4f}"
    assert row["test balanced accuracy"] == row["test accuracy"] == "—"
    assert table.loc["ImageNet", "n runs"] == 0

    text = path.read_text()
    assert "| init | n runs | val balanced accuracy | val accuracy | test balanced accuracy | test accuracy | runs |" in text
    assert f"| scratch | 2 | {table.loc['scratch', 'val balanced accuracy']} |" in text


@pytest.mark.slow
def test_table2_and_figures_describe_the_best_run(runs, tmp_path):
    out = tmp_path / "report"
    path = build_report(["skinclr-finetune"], out)
    fine = [runs[k] for k in ("scratch0", "scratch1", "simclr")]
    best = max(fine, key=lambda r: _metric(r, "best_val_balanced_accuracy"))
    val = json.loads(RunLogger(best).download("report/val_metrics.json", tmp_path / "dl").read_text())

    table = pd.read_csv(out / "table2.csv", index_col=0)
    for name, m in val["per_class"].items():
        assert table.loc[name, "support"] == m["support"]
        for col, key in (("precision", "precision"), ("recall", "recall"), ("F1", "f1")):
            expected = m[key]
            assert (pd.isna(table.loc[name, col]) if expected is None else table.loc[name, col] == pytest.approx(expected))
    assert table.loc["macro avg", "recall"] == pytest.approx(val["balanced_accuracy"])
    assert table.loc["weighted avg", "recall"] == pytest.approx(val["accuracy"])

    text = path.read_text()
    assert f"Per-class results of the best run (`{best}`" in text
    assert f"balanced accuracy {val['balanced_accuracy']:.4f}, accuracy {val['accuracy']:.4f}" in text
    for name in ("figure1_loss_curves.png", "figure2_accuracy_curves.png", "figure3_confusion_matrix.png"):
        with Image.open(out / name) as img:
            assert img.width > 300 and img.height > 200
        assert f"]({name})" in text


@pytest.mark.slow
def test_the_report_is_an_mlflow_run(runs, tmp_path):
    build_report(["skinclr-finetune"], tmp_path / "report")
    c = tracking.client()
    [run] = c.search_runs([c.get_experiment_by_name("skinclr-report").experiment_id],
                          filter_string="tags.`skinclr.report` = '1'")
    assert run.info.status == "FINISHED"
    assert run.info.run_id in (tmp_path / "report" / "report.md").read_text()
    logged = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert logged == {"report.md", "table1.csv", "table2.csv", "figure1_loss_curves.png",
                      "figure2_accuracy_curves.png", "figure3_confusion_matrix.png"}


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(ReportError, match="no experiment 'nope'"):
        build_report(["nope"], tmp_path)
    no_metrics = RunLogger.create("skinclr-empty", tags={"skinclr.stage": "finetune"})
    no_metrics.end()
    with pytest.raises(ReportError, match="no finished fine-tune run with best_val_balanced_accuracy in skinclr-empty"):
        build_report(["skinclr-empty"], tmp_path)


def test_each_sweep_is_listed_with_the_way_to_its_optuna_charts(tmp_path):
    """A sweep's row names its parent run, links it in the MLflow UI and gives the artifact path
    of each chart it holds; a sweep without charts says so."""
    from skinclr import names

    charted = RunLogger.create("skinclr-sweeps", run_name="sweep-a", tags={
        names.SWEEP_PARENT_TAG: "1", names.STAGE_TAG: "pretrain", names.SEARCH_TAG: "optuna", names.TRIALS_TAG: 4,
        names.TRIALS_FINISHED_TAG: 3})
    (tmp_path / "charts").mkdir()
    for name in (names.SWEEP_HISTORY_HTML, names.SWEEP_PARALLEL_HTML):
        (tmp_path / "charts" / name).write_text("<html></html>")
    charted.log_artifact(tmp_path / "charts", names.SWEEP_CHARTS)
    charted.log_metrics({"best_knn_balanced_accuracy": 0.4321}, step=0)
    charted.end()
    bare = RunLogger.create("skinclr-sweeps", run_name="sweep-b", tags={names.SWEEP_PARENT_TAG: "1",
                                                                        names.STAGE_TAG: "finetune"})
    bare.end("FAILED")

    command = "skinclr report --experiment skinclr-sweeps --out report"
    text = build_report(["skinclr-sweeps"], tmp_path / "report", command=command).read_text()
    assert "## Sweeps (2)" in text
    row = next(line for line in text.splitlines() if f"`{charted.run_id}`" in line)
    assert "| pretrain | optuna | FINISHED | 4 (3) | knn_balanced_accuracy 0.4321 |" in row
    assert f"`{names.SWEEP_CHARTS}/{names.SWEEP_HISTORY_HTML}`, `{names.SWEEP_CHARTS}/{names.SWEEP_PARALLEL_HTML}`" in row
    assert names.SWEEP_IMPORTANCES_HTML not in row
    assert f"]({tracking.run_link(charted.run_id)})" in row
    row = next(line for line in text.splitlines() if f"`{bare.run_id}`" in line)
    assert f"no charts on [run `{bare.run_id[:8]}`]({tracking.run_link(bare.run_id)})" in row
    c = tracking.client()
    [report] = c.search_runs([c.get_experiment_by_name("skinclr-report").experiment_id])
    assert report.data.tags[names.COMMAND_TAG] == command  # the command that made the report
