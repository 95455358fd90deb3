"""experiments/cli/submit.py before it reaches a cluster: what it refuses, and what it hands the sweep.

The real `ray submit` of it runs in tests/cli/test_submit_cluster.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from skinclr.cli.submit import STORAGE_ENV, sweep_arguments

REPO = Path(__file__).resolve().parents[2]


def submit(tmp_path: Path, uri: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, str(REPO / "experiments" / "cli" / "submit.py"), "--config",
                           "experiments/sweeps/finetune_asha.yaml"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_cluster_sweep_refuses_a_local_store_in_one_line(tmp_path):
    head = tmp_path / "head"
    head.mkdir()
    for uri in (None, f"sqlite:///{tmp_path}/store/mlflow.db"):
        done = submit(head, uri)
        assert done.returncode == 2
        assert done.stderr.startswith("error: MLFLOW_TRACKING_URI is ") and "tracking server" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not list(head.iterdir()) and not (tmp_path / "store").exists(), "nothing may be written locally"


def test_the_config_is_found_in_the_project_and_the_clusters_storage_applies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ray submit runs the script from the head's home folder
    args = sweep_arguments(["--config", "experiments/sweeps/finetune_asha.yaml", "--set", "train.epochs=2"],
                           {STORAGE_ENV: "/shared/ray_results"})
    assert args[:2] == ["sweep", "--config"]
    assert Path(args[2]) == REPO / "experiments" / "sweeps" / "finetune_asha.yaml"
    assert args[3:] == ["--set", "train.epochs=2", "--set", "sweep.storage=/shared/ray_results"]


def test_a_storage_on_the_command_line_wins_over_the_clusters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("stage: finetune\n")
    args = sweep_arguments(["--config=mine.yaml", "--set", "sweep.storage=/elsewhere"], {STORAGE_ENV: "/shared"})
    assert args == ["sweep", "--config=mine.yaml", "--set", "sweep.storage=/elsewhere"]
