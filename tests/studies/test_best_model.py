"""experiments/studies/best_model.py: folds -> ensemble -> decision rule -> test number -> promote, in one command."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from skinclr import names
from skinclr.track import store

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_one_command_makes_promotes_and_on_a_second_call_resumes_the_best_model(synth_dir, tmp_path):
    cmd = [sys.executable, str(REPO / "experiments" / "studies" / "best_model.py"), "--data", str(synth_dir),
           "--folds", "2", "--tta", "flip", "--set", "data.image_size=32", "train.epochs=1", "train.batch_size=16",
           "train.max_steps_per_epoch=2", "sweep.cpus_per_trial=1", f"sweep.storage={tmp_path / 'ray'}"]
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": store.tracking_uri()}
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "best model: run" in first.stdout and "test balanced accuracy" in first.stdout
    c = MlflowClient(store.tracking_uri())
    exp = c.get_experiment_by_name("skinclr-folds")
    (ensemble,) = c.search_runs([exp.experiment_id], f"tags.`{names.STAGE_TAG}` = 'ensemble'")
    assert len(ensemble.data.tags[names.ENSEMBLE_TAG].split(",")) == 2
    assert {"oof_balanced_accuracy", "test_balanced_accuracy", "test_balanced_accuracy_without_rule"} <= set(
        ensemble.data.metrics)
    assert c.get_model_version_by_alias("skinclr", "champion").run_id == ensemble.info.run_id

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "--resume" in again.stdout and "ensemble --parent" not in again.stdout  # nothing trained twice
    assert len(c.search_runs([exp.experiment_id], f"tags.`{names.STAGE_TAG}` = 'ensemble'")) == 1


def test_bad_arguments_are_one_line_and_a_step_that_refuses_its_input_adds_nothing(synth_dir, tmp_path):
    """No traceback, no 'run the same command again' for input that stays wrong, no run left behind."""
    script = str(REPO / "experiments" / "studies" / "best_model.py")
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": store.tracking_uri()}
    cases = {("--data", str(tmp_path / "nope")): "no such folder",
             ("--data", str(synth_dir), "--folds", "1"): "give the number of folds, 2 or more",
             ("--data", str(synth_dir), "--set", "data.test_fraction=0.9"): "data.test_fraction",
             ("--data", str(synth_dir), "--set", "train.batch_size=-4"): "train.batch_size"}
    for args, said in cases.items():
        done = subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=300)
        err = done.stderr.strip().splitlines()
        assert done.returncode != 0 and said in err[-1] and "Traceback" not in done.stderr, (args, done.stderr)
        assert "run the same command again" not in done.stderr and "$" not in done.stdout, (args, done.stdout)
    (tmp_path / "empty").mkdir()  # a folder, but no dataset: the first step refuses it, and its line is the last
    done = subprocess.run([sys.executable, script, "--data", str(tmp_path / "empty")], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1 and "$" in done.stdout and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "again" not in done.stderr, done.stderr
    assert not MlflowClient(store.tracking_uri()).search_runs(
        [e.experiment_id for e in MlflowClient(store.tracking_uri()).search_experiments()])
