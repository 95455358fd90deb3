"""`skinclr quickstart` end to end, as a new user runs it: twice, the second reusing data and cache."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from skinclr.track import store, tracking

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "skinclr-quickstart"  # the pipeline and every stage of it


@pytest.mark.slow
def test_quickstart_runs_twice_and_promotes(tmp_path):
    cmd = [sys.executable, "-m", "skinclr.cli.main", "quickstart", "--workdir", str(tmp_path / "qs")]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    for text in ("[1/5]", "[5/5]", "SimCLR sweep trials", "test balanced accuracy", "skinclr server"):
        assert text in first.stdout
    assert "were seen by the model" not in first.stdout  # its test set is held out, though ids repeat
    c = MlflowClient(store.tracking_uri())
    exp = c.get_experiment_by_name(EXPERIMENT)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "skinclr sweep" in exp.tags["mlflow.note.content"]
    links = [line.split()[-1] for line in first.stdout.splitlines() if line.startswith("  the ")]
    assert links[0] == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    assert len(links) == 4 and all(link.endswith("?workflowType=machine_learning") for link in links)
    champion = c.get_model_version_by_alias("skinclr-quickstart", "champion")
    assert champion.run_id
    sweeps = c.search_runs([tracking.ensure_experiment(EXPERIMENT)],
                           filter_string="tags.`skinclr.sweep` = '1'")
    assert len(sweeps) == 1
    children = c.search_runs([tracking.ensure_experiment(EXPERIMENT)],
                             filter_string=f"tags.`mlflow.parentRunId` = '{sweeps[0].info.run_id}'")
    assert len(children) == 4 and all(r.info.status in ("FINISHED", "FAILED") for r in children)
    charts = {a.path for a in c.list_artifacts(sweeps[0].info.run_id, "sweep_charts")}
    assert "sweep_charts/optimization_history.html" in charts  # the Optuna sweep's own study, drawn
    # Every run of the pipeline says what it is (no MLflow random name) and how to make it again.
    runs = c.search_runs([exp.experiment_id])
    named = (r"pipeline-quickstart-[\d-]+", r"sweep-quickstart-[\d-]+-pretrain", r"pretrain simclr trial [0-3]",
             r"finetune from \w{12} seed 0", r"evaluate test")
    assert len(runs) == 1 + 1 + 4 + 1 + 1
    assert all(any(re.fullmatch(p, r.info.run_name) for p in named) for r in runs), [r.info.run_name for r in runs]
    assert {r.data.tags.get("skinclr.command") for r in runs} == {shlex.join(["skinclr", *cmd[3:]])}

    data = tmp_path / "qs" / "data" / "train" / "ISIC2018_Task3_Training_GroundTruth.csv"
    stamp = data.stat().st_mtime_ns
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert data.stat().st_mtime_ns == stamp  # the synthetic data is reused, not rewritten
    assert len(c.search_runs([tracking.ensure_experiment(EXPERIMENT)],
                             filter_string="tags.`skinclr.sweep` = '1'")) == 2  # a new sweep each time
    assert c.get_model_version_by_alias("skinclr-quickstart", "champion").version >= champion.version
