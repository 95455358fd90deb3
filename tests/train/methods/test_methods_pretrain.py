"""`skinclr pretrain` end to end on synthetic data, for every method: what lands in MLflow, that
fine-tuning starts from it, and exact resume."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from skinclr.track import store
from skinclr.cli.main import main
from skinclr.config import load_config
from skinclr.data.inputs import resolve_inputs
from skinclr.train.methods import METHODS
from skinclr.train.models import build_backbone
from skinclr.train.methods import pretrain
from skinclr.runtime import describe_device
from skinclr.track.store import checkpoint_root

from tests.portable import LOSS_REL, portable_losses

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "experiments" / "paper" / "simclr_pretrain.yaml"


def pretrain_args(root, epochs=2, experiment="pretrain-test", *extra):
    sets = [f"data.root={root}", "data.image_size=32", f"train.epochs={epochs}", "train.batch_size=32",
            "data.workers=0", "monitor.k=5", "monitor.every=1",
            f"tracking.experiment={experiment}", *extra]
    return ["pretrain", "--config", str(CONFIG)] + [a for s in sets for a in ("--set", s)]


def only_run(experiment: str):
    c = MlflowClient(store.tracking_uri())
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return c, runs[0]


def test_cli_pretrain_logs_a_complete_run(synth_dir, tmp_path, monkeypatch):
    calls = []
    original = MlflowClient.log_metric
    monkeypatch.setattr(MlflowClient, "log_metric", lambda *a, **k: calls.append(a) or original(*a, **k))
    assert main(pretrain_args(synth_dir)) == 0
    assert calls == [], "metrics must go in batches, not one call per value"

    c, run = only_run("pretrain-test")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["simclr.temperature"] == "0.5" and params["data.image_size"] == "32"
    assert params["model.proj_dim"] == "128" and params["train.lr"] == "0.001"
    for key in ("train_loss", "knn_balanced_accuracy", "lr", "epoch_seconds", "images_per_second"):
        history = c.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    assert 0.0 <= run.data.metrics["knn_balanced_accuracy"] <= 1.0
    tags = run.data.tags
    assert len(tags["data_fingerprint"]) >= 8 and len(tags["split_fingerprint"]) >= 8
    assert tags["mlflow.source.git.commit"]
    assert tags["skinclr.device"] == describe_device(torch.device("cpu"))  # the hardware a run trained on, in the UI
    assert tags["skinclr.precision"] == "fp32"  # train.precision=auto at 32 px

    files = {f.path for f in c.list_artifacts(run.info.run_id)} | {
        f.path for f in c.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"config.yaml", "split.csv", "checkpoints/backbone_last.pt", "checkpoints/backbone_best.pt"} <= files
    local = c.download_artifacts(run.info.run_id, "checkpoints/backbone_best.pt", str(tmp_path))
    backbone, _ = build_backbone("resnet18")
    backbone.load_state_dict(torch.load(local, weights_only=True))  # a plain, safe state_dict


def test_killed_run_resumes_in_the_same_mlflow_run(synth_dir):
    """SIGKILL after epoch 1, run the same command again: epoch 2 continues the same run, and the
    losses match an uninterrupted run (the resume is exact, not a restart)."""
    cmd = [sys.executable, "-m", "skinclr.cli.main"] + pretrain_args(synth_dir, epochs=3, experiment="resume-test")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    ckpts: list[Path] = []
    while not ckpts and time.time() < deadline and proc.poll() is None:
        ckpts = list(checkpoint_root().glob("*/checkpoint.pt"))
        time.sleep(0.02)
    assert ckpts, f"no checkpoint appeared: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
    os.kill(proc.pid, signal.SIGSTOP)  # freeze it, check where it stands, then kill it
    assert torch.load(ckpts[0], weights_only=True)["epoch"] == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    c, run = only_run("resume-test")
    assert run.info.status == "RUNNING"  # what a killed process leaves behind
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    c, resumed = only_run("resume-test")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    losses = c.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2, 3]

    assert main(pretrain_args(synth_dir, epochs=3, experiment="straight-test")) == 0
    c, straight = only_run("straight-test")
    reference = c.get_metric_history(straight.info.run_id, "train_loss")
    assert [m.value for m in losses] == pytest.approx([m.value for m in reference], rel=1e-4)


# train_loss of the SimCLR loop as it was before the shared engine existed (one thread, seed 0,
# portable kernels: tests/portable.py; PyTorch 2.14.1): the refactor must leave SimCLR's numbers
# exactly where they were. Recorded from that loop's own code (commit 82848d2) under the same settings.
SIMCLR_LOSSES_BEFORE_ENGINE = [3.4325637817382812, 3.3663292725880942]


def test_simclr_losses_at_a_fixed_seed_are_unchanged(synth_dir, tmp_path):
    sets = [f"data.root={synth_dir}", "data.image_size=32", "train.epochs=2", "train.threads=1", "train.batch_size=16",
            "train.max_steps_per_epoch=3", "data.workers=0", "monitor.k=5", "monitor.max_bank=50"]
    losses = portable_losses(CONFIG, "pretrain", sets, ["train_loss"], tmp_path / "mlflow.db")
    assert losses == pytest.approx(SIMCLR_LOSSES_BEFORE_ENGINE, rel=LOSS_REL)


TINY = ("train.batch_size=16", "train.max_steps_per_epoch=2", "monitor.max_bank=60")


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_leaves_a_complete_run_that_finetuning_starts_from(method, synth_dir):
    assert main(pretrain_args(synth_dir, 2, f"pretrain-{method}", f"pretrain.method={method}", *TINY)) == 0
    c, run = only_run(f"pretrain-{method}")
    assert run.info.status == "FINISHED" and run.data.params["pretrain.method"] == method
    for key in ("train_loss", "knn_balanced_accuracy", "images_per_second"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [1, 2], key
    files = {f.path for f in c.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/backbone_last.pt", "checkpoints/backbone_best.pt"} <= files

    finetune = ["finetune", "--config", str(REPO / "experiments" / "paper" / "finetune_simclr.yaml")] + [
        a for s in (f"data.root={synth_dir}", "data.image_size=32", "data.workers=0", "train.epochs=1",
                    "train.batch_size=16", "train.max_steps_per_epoch=1", f"finetune.init=runs:/{run.info.run_id}",
                    f"tracking.experiment=finetune-{method}") for a in ("--set", s)]
    assert main(finetune) == 0
    c, tuned = only_run(f"finetune-{method}")
    assert tuned.info.status == "FINISHED" and tuned.data.tags["skinclr.pretrain_run_id"] == run.info.run_id


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_resumes_exactly(method, synth_dir):
    """Epoch 2 from epoch 1's saved state equals epoch 2 of an uninterrupted run, weights, queue,
    target and step counter included."""
    cfg = load_config(CONFIG, [f"data.root={synth_dir}", "data.image_size=32", "train.epochs=2", "data.workers=0",
                               "monitor.k=5", f"pretrain.method={method}", *TINY])
    inputs = resolve_inputs(cfg, progress=False)
    straight = pretrain(cfg, inputs)
    saved = io.BytesIO()
    torch.save(next(straight).state(), saved)  # what the runner's checkpoint holds after epoch 1
    last = next(straight)
    saved.seek(0)
    resumed = list(pretrain(cfg, inputs, resume=torch.load(saved, weights_only=True)))
    assert [r.epoch for r in resumed] == [2]
    assert resumed[0].metrics["train_loss"] == last.metrics["train_loss"]
    assert resumed[0].metrics["knn_balanced_accuracy"] == last.metrics["knn_balanced_accuracy"]
    a, b = last.state()["model"], resumed[0].state()["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
