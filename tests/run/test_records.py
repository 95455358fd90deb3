"""A fine-tune's held-out test side: scored once, after the last epoch, for the saved model only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from skinclr import names
from skinclr.config import load_config
from skinclr.run import runner
from skinclr.run.records import Reports
from skinclr.run.runner import run_finetune
from skinclr.track import store
from skinclr.track.tracking import RunLogger
from skinclr.train import finetune as F

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper"


def test_the_test_side_is_scored_once_for_the_saved_model_and_never_trained_or_chosen_on(synth_dir, monkeypatch,
                                                                                        tmp_path):
    cfg = load_config(PAPER / "baseline_scratch.yaml",
                      [f"data.root={synth_dir}", "data.image_size=32", "data.workers=0", "data.test_fraction=0.2",
                       "data.val_fraction=0.25", "finetune.tta=flip",
                       "train.epochs=3", "train.batch_size=16", "train.max_steps_per_epoch=3"], stage="finetune")
    scored, loaded = [], []
    real_predict, real_loader = F.predict, F.make_loader
    monkeypatch.setattr(F, "predict", lambda model, inputs, rows, *a, **k: (
        scored.append(set(rows.tolist())), real_predict(model, inputs, rows, *a, **k))[1])
    monkeypatch.setattr(F, "make_loader", lambda cache, rows, *a, **k: (
        loaded.append(set(rows.tolist())), real_loader(cache, rows, *a, **k))[1])
    spied = {}
    real_assemble = F.Inputs.__init__

    def keep(self, *a, **k):
        real_assemble(self, *a, **k)
        spied["inputs"] = self
    monkeypatch.setattr(F.Inputs, "__init__", keep)

    result = run_finetune(cfg, progress=False)
    inputs = spied["inputs"]
    test, val = set(inputs.test_rows.tolist()), set(inputs.val_rows.tolist())
    assert len(test) >= 40 and not test & val and not test & set(inputs.train_rows.tolist())
    assert scored == [val] * result.epochs + [test]  # every epoch's choice on val; test once, at the end
    assert loaded and not any(rows & test for rows in loaded)  # never trained on

    c = MlflowClient(store.tracking_uri())
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[names.PRECISION_TAG] == "fp32"  # auto, at 32 px
    assert run.data.tags[names.TEST_IMAGES_TAG] == str(len(test)) and run.data.tags[names.TEST_FINGERPRINT_TAG]
    for key in ("test_balanced_accuracy", "test_accuracy", "test_loss", "test_recall_MEL"):
        assert len(c.get_metric_history(result.run_id, key)) == 1, key
    accuracy = run.data.metrics["test_accuracy"]
    matrix = pd.read_csv(c.download_artifacts(result.run_id, f"{names.TEST_ARTIFACTS}/{names.CONFUSION_CSV}",
                                              str(tmp_path)), index_col=0).to_numpy()
    assert matrix.sum() == len(test) and np.isclose(np.trace(matrix) / matrix.sum(), accuracy)
    meta = c.download_artifacts(result.run_id, f"{names.MODEL_ARTIFACT}/artifacts/{names.META_FILE}", str(tmp_path))
    assert json.loads(Path(meta).read_text())["tta"] == "flip"  # validated with it, saved with it


def test_a_decision_rule_is_fitted_on_val_saved_with_the_model_and_scored_on_test_with_and_without(synth_dir,
                                                                                                  tmp_path):
    from skinclr.serve.uris import load_predictor
    from skinclr.train.metrics import apply_offsets

    cfg = load_config(PAPER / "baseline_scratch.yaml",
                      [f"data.root={synth_dir}", "data.image_size=32", "data.workers=0", "data.test_fraction=0.2",
                       "data.val_fraction=0.25", "finetune.decision_rule=balanced", "train.epochs=2",
                       "train.batch_size=16", "train.max_steps_per_epoch=3"], stage="finetune")
    result = run_finetune(cfg, progress=False)
    c = MlflowClient(store.tracking_uri())
    run = c.get_run(result.run_id)
    offsets = json.loads(Path(c.download_artifacts(result.run_id, f"report/{names.DECISION_RULE_FILE}",
                                                   str(tmp_path))).read_text())
    assert list(offsets) == list(names.CLASSES)
    for key in ("test_balanced_accuracy", "test_balanced_accuracy_without_rule", "val_balanced_accuracy_with_rule"):
        assert len(c.get_metric_history(result.run_id, key)) == 1, key
    assert run.data.metrics["val_balanced_accuracy_with_rule"] >= run.data.metrics["best_val_balanced_accuracy"] - 1e-9

    ruled = load_predictor(f"runs:/{result.run_id}/model")  # the logged model carries its rule
    assert ruled.offsets == [round(v, 6) for v in offsets.values()]
    images = sorted((synth_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:8]
    plain = load_predictor(f"runs:/{result.run_id}/model")
    plain.meta = {k: v for k, v in plain.meta.items() if k != "offsets"}
    np.testing.assert_allclose(ruled.predict_proba(images), apply_offsets(plain.predict_proba(images), ruled.offsets),
                               atol=1e-9)


def _improved(history: list) -> list[int]:
    """The epochs whose monitored loss beat every earlier one: the epochs that saved a model."""
    best, epochs = None, []
    for m in history:
        if best is None or m.value < best:
            best, epochs = m.value, epochs + [m.step]
    return epochs


@pytest.mark.parametrize("every", [0.0, 3600.0])
def test_a_run_reports_at_most_every_period_and_at_its_end_always_the_model_it_saved(synth_dir, monkeypatch,
                                                                                   tmp_path, every):
    """Each report (curves, a better epoch's model and figures) costs 1-2 s: a run of short epochs
    reports once a period and at its end. Either way the run ends holding its saved epoch's model."""
    monkeypatch.setattr(runner, "REPORT_EVERY_S", every)
    cfg = load_config(PAPER / "baseline_scratch.yaml",
                      [f"data.root={synth_dir}", "data.image_size=32", "data.workers=0", "train.epochs=4",
                       "finetune.early_stop_patience=9", "finetune.select_metric=val_loss", "train.batch_size=16",
                       "train.max_steps_per_epoch=4"], stage="finetune")
    result = run_finetune(cfg, progress=False)
    c = MlflowClient(store.tracking_uri())
    improved = _improved(c.get_metric_history(result.run_id, "monitor_value"))
    reported = [m.step for m in c.get_metric_history(result.run_id, "best_val_balanced_accuracy")]
    assert len(improved) >= 2  # several better epochs (val loss falls early on): the periods can differ
    assert reported == (improved if every == 0 else improved[-1:])
    run = c.get_run(result.run_id)
    assert run.data.tags[names.BEST_EPOCH_TAG] == str(improved[-1])
    history = json.loads(Path(c.download_artifacts(result.run_id, "report/history.json", str(tmp_path))).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_a_resumed_run_first_reports_the_better_epoch_its_killed_run_had_not(monkeypatch, tmp_path):
    """Killed between reports, a run's resume state still holds its best epoch's model and val
    report; the resumed run reports them, and a run already reported is not reported again."""
    from skinclr.train.metrics import classification_metrics
    from skinclr.train.models import build_classifier

    cfg = load_config(None, {"data.image_size": 32}, stage="finetune")
    logger = RunLogger.create("reports")
    logger.set_tags({names.BEST_EPOCH_TAG: 1})  # what its last report said
    labels = np.arange(14) % 7
    report = classification_metrics(labels, np.eye(7)[(labels + (labels == 0)) % 7])  # class MEL missed
    resume = {"best_model": build_classifier("resnet18").state_dict(), "stale": 1, "best_report": report,
              "history": [{"epoch": e, "val_balanced_accuracy": 0.5} for e in (1, 2, 3)]}  # best: epoch 2
    reports = Reports(cfg, logger, tmp_path / "report", None, every=3600.0, resume=resume)
    assert (reports.epoch, reports.model) == (2, resume["best_model"])
    reports.flush()
    c = MlflowClient(store.tracking_uri())
    run = c.get_run(logger.run_id)
    assert run.data.tags[names.BEST_EPOCH_TAG] == "2"
    assert [(m.step, m.value) for m in c.get_metric_history(logger.run_id, "best_val_balanced_accuracy")] == \
        [(2, pytest.approx(6 / 7))]
    assert run.outputs.model_outputs  # the logged model, from epoch 2
    Reports(cfg, RunLogger(logger.run_id), tmp_path / "again", None, every=3600.0, resume=resume).flush()
    assert len(c.get_metric_history(logger.run_id, "best_val_balanced_accuracy")) == 1
