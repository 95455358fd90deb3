"""`skinclr finetune` end to end: from a SimCLR run made here, then evaluate and predict its model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from skinclr.track import store
from skinclr.cli.main import main
from skinclr.config import load_config
from skinclr.run.runner import run_finetune, run_pretrain
from tests.portable import LOSS_REL, portable_losses, simd

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "experiments" / "paper"


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def small(root, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.image_size=32", "data.workers=0", *extra]


@pytest.fixture
def simclr_run(synth_dir) -> str:
    cfg = load_config(PAPER / "simclr_pretrain.yaml",
                      small(synth_dir, "train.epochs=1", "train.batch_size=32", "monitor.k=5"), stage="pretrain")
    return run_pretrain(cfg, progress=False).run_id


def test_finetune_from_simclr_run_then_evaluate_and_predict(synth_dir, simclr_run, tmp_path, capsys):
    argv = ["finetune", "--config", str(PAPER / "finetune_simclr.yaml")] + sets(
        *small(synth_dir, f"finetune.init=runs:/{simclr_run}", "train.epochs=2", "train.batch_size=16"))
    assert main(argv) == 0
    c = MlflowClient(store.tracking_uri())
    run = c.search_runs([c.get_experiment_by_name("skinclr-finetune").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["skinclr.pretrain_run_id"] == simclr_run
    for key in ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "lr"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [1, 2], key
    for name in ("MEL", "NV", "VASC"):  # per class, every epoch: a class's sensitivity over time
        assert [m.step for m in c.get_metric_history(run.info.run_id, f"val_recall_{name}")] == [1, 2], name
        assert [m.step for m in c.get_metric_history(run.info.run_id, f"val_precision_{name}")] == [1, 2], name
    report = {f.path for f in c.list_artifacts(run.info.run_id, "report")}
    for name in ("loss_curves.png", "accuracy_curves.png", "confusion_matrix.png", "confusion_matrix.csv",
                 "classification_report.csv", "classification_report.txt"):
        assert f"report/{name}" in report
    assert "config.yaml" in {f.path for f in c.list_artifacts(run.info.run_id)}

    images = sorted((synth_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:3]
    out_json, out_csv = tmp_path / "eval.json", tmp_path / "probs.csv"
    model = f"runs:/{run.info.run_id}/model"
    assert main(["evaluate", "--model", model, "--data", str(synth_dir), "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert {"balanced_accuracy", "accuracy", "per_class", "confusion_matrix"} <= set(result)
    assert sum(map(sum, result["confusion_matrix"])) == 280
    assert main(["predict", "--model", model, *map(str, images), "--out", str(out_csv)]) == 0
    import pandas as pd

    probs = pd.read_csv(out_csv)
    assert len(probs) == 3
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert probs[classes].sum(axis=1).round(4).tolist() == [1.0, 1.0, 1.0]


def test_early_stopping_ends_a_run_that_stops_improving(synth_dir):
    # an lr this small leaves the weights (and so the monitored metric) where they are
    cfg = load_config(PAPER / "baseline_scratch.yaml",
                      small(synth_dir, "train.epochs=10", "train.lr=1e-12", "finetune.early_stop_patience=2",
                            "train.batch_size=16", "train.max_steps_per_epoch=2"), stage="finetune")
    result = run_finetune(cfg, progress=False)
    assert result.epochs == 3  # best at epoch 1, then two epochs without improvement
    run = MlflowClient(store.tracking_uri()).get_run(result.run_id)
    assert run.data.tags["skinclr.early_stopped_at"] == "3"


def test_linear_probe_leaves_the_backbone_untouched(synth_dir, simclr_run, tmp_path):
    cfg = load_config(PAPER / "finetune_simclr.yaml",
                      small(synth_dir, "train.epochs=1", "finetune.linear_probe=true",
                            f"finetune.init=runs:/{simclr_run}", "train.batch_size=16", "train.max_steps_per_epoch=3", "train.lr=0.01"), stage="finetune")
    result = run_finetune(cfg, progress=False)
    from skinclr.track.tracking import RunLogger

    # the run's model (its only epoch); a finished run keeps no resume checkpoint
    weights = RunLogger(result.run_id).download("model/artifacts/classifier.pt", tmp_path / "model")
    model = torch.load(weights, weights_only=True)
    start = torch.load(RunLogger(simclr_run).download("checkpoints/backbone_best.pt", tmp_path / "init"),
                       weights_only=True)
    backbone = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    assert backbone.keys() == start.keys() and all(torch.equal(v, start[k]) for k, v in backbone.items())
    torch.manual_seed(cfg.train.seed)  # the head as it was drawn: it trained
    from skinclr.train.models import build_classifier

    assert not torch.equal(model["head.weight"], build_classifier("resnet18").state_dict()["head.weight"])


def test_corrupt_image_in_evaluation_folder_is_named(synth_dir, tmp_path, simclr_run, capsys):
    cfg = load_config(PAPER / "baseline_scratch.yaml",
                      small(synth_dir, "train.epochs=1", "train.batch_size=16", "train.max_steps_per_epoch=1"),
                      stage="finetune")
    model = f"runs:/{run_finetune(cfg, progress=False).run_id}/model"
    broken = tmp_path / "broken"
    shutil.copytree(synth_dir, broken)
    victim = sorted((broken / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated mid-file
    assert main(["evaluate", "--model", model, "--data", str(broken)]) == 1
    err = capsys.readouterr().err
    assert victim.name in err and "Traceback" not in err


# (train_loss, val_loss) per epoch of the fine-tune loop as it was before the shared engine
# existed (from scratch, one thread, seed 0, portable kernels: tests/portable.py; PyTorch 2.14.1):
# the rewrite must leave them where they were. Recorded from that loop's own code (commit 82848d2)
# on CPUs with AVX-512; on a CPU with AVX2 only (OpenCV rounds otherwise there), recorded
# from the engine's loop at 5277c77, which reproduced the AVX-512 values within LOSS_REL on AVX-512.
FINETUNE_LOSSES_BEFORE_ENGINE = {
    "avx512": [(2.1982568899790444, 1.943227195739746), (1.9540927012761433, 1.9294103622436523)],
    "avx2": [(2.1931772232055664, 1.9423496925984955), (1.9336804151535034, 1.9285386172204564)],
}


def test_finetune_losses_at_a_fixed_seed_are_unchanged(synth_dir, tmp_path):
    sets = small(synth_dir, "train.epochs=2", "train.batch_size=16", "train.max_steps_per_epoch=3", "train.threads=1")
    losses = portable_losses(PAPER / "baseline_scratch.yaml", "finetune", sets, ["train_loss", "val_loss"],
                             tmp_path / "mlflow.db")
    assert losses == pytest.approx([v for pair in FINETUNE_LOSSES_BEFORE_ENGINE[simd()] for v in pair], rel=LOSS_REL)
