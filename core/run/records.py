"""What a fine-tune leaves beside its epoch metrics: curves, the saved model with its figures,
and its score on the held-out test side.

The test side (`data.test_fraction`) is read once, here, after the last epoch, for the model the
run saved: no epoch pick, lr plateau, early stop, trial or promotion ever sees a test number. The
decision rule (`finetune.decision_rule`) is fitted on val, never on test.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from skinclr import names
from skinclr.config import Config
from skinclr.data.inputs import Inputs
from skinclr.track.tracking import RunLogger
from skinclr.train.engine import EpochRecord


class Reports:
    """A fine-tune's reports: the curves up to the latest epoch and, when a better epoch came since
    the last report, the model it saved with its figures (1-2 s in all).

    A trial reports every epoch, since Tune may stop it at its next report; a run reports at most
    every `every` seconds and at its end, so short epochs do not pay a report each. A killed run
    keeps what it had not reported in its resume state, and its resumed run reports it first."""

    def __init__(self, cfg: Config, logger: RunLogger, out: Path, example: str | None, every: float,
                 resume: dict | None):
        self.cfg, self.logger, self.out, self.example, self.every = cfg, logger, out, example, every
        self.latest = self.best = None
        self.at = time.monotonic()
        self.model, self.epoch = None, 0  # the model the run saves, as it stands, and its epoch
        if resume is not None:
            self.model, self.epoch = resume["best_model"], resume["history"][-1]["epoch"] - resume["stale"]
            if resume.get("best_report") and logger.run.data.tags.get(names.BEST_EPOCH_TAG) != str(self.epoch):
                self.latest = self.best = EpochRecord(self.epoch, {}, dict, True, report=resume["best_report"],
                                                      history=resume["history"], best_model=self.model)

    def add(self, record: EpochRecord, now: bool = False) -> None:
        """An epoch's record, reported `now` or once `every` seconds have passed since the last report."""
        self.model = record.best_model
        self.epoch = record.epoch if record.is_best else self.epoch
        self.latest, self.best = record, record if record.is_best else self.best
        if now or time.monotonic() - self.at >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.latest is not None:
            log_report(self.cfg, self.logger, self.latest, self.best, self.out, self.example)
        self.latest = self.best = None
        self.at = time.monotonic()


def log_report(cfg: Config, logger: RunLogger, latest: EpochRecord, best: EpochRecord | None, out: Path,
               example: str | None = None) -> None:
    """The curves up to the `latest` epoch and, given a `best` one, the model it saved with its figures."""
    from skinclr.serve.pyfunc import log_model
    from skinclr.train import figures

    out.mkdir(parents=True, exist_ok=True)
    history = latest.history
    figures.plot_loss_curves(history, out / "loss_curves.png")
    figures.plot_accuracy_curves(history, out / "accuracy_curves.png")
    (out / "history.json").write_text(json.dumps(history, indent=1))
    files = [out / "loss_curves.png", out / "accuracy_curves.png", out / "history.json"]
    if best is not None:
        report = best.report
        files += figures.write_report(report, out, f"val, epoch {best.epoch}")
        (out / "val_metrics.json").write_text(json.dumps(report, indent=1))
        files.append(out / "val_metrics.json")
        log_model(logger, best.best_model, cfg.model.backbone, cfg.data.image_size, cfg.data.aspect,
                  cfg.finetune.tta, example=example, step=best.epoch)
        logger.log_metrics({"best_val_balanced_accuracy": report["balanced_accuracy"],
                            "best_val_accuracy": report["accuracy"]}, step=best.epoch)
        logger.set_tags({names.BEST_EPOCH_TAG: best.epoch})
    for f in files:
        logger.log_artifact(f, "report")


def finish_model(cfg: Config, logger: RunLogger, inputs: Inputs, saved_model: dict | None, out: Path,
                 best_epoch: int = 0) -> None:
    """After the last epoch, for the model the run saved (nothing when no epoch finished): its
    decision rule, fitted on val (`finetune.decision_rule`), logged with it; then its score on
    the held-out test side, with and without the rule."""
    from skinclr.serve.pyfunc import log_model
    from skinclr.train.finetune import saved_probs
    from skinclr.train.metrics import fit_rule

    if saved_model is None:
        return
    offsets = None
    if cfg.finetune.decision_rule == "balanced":
        probs, _ = saved_probs(cfg, inputs, saved_model, inputs.val_rows)
        offsets, expected = fit_rule(inputs.cache.labels[inputs.val_rows], probs)
        say_rule(offsets, expected, "val")
        log_model(logger, saved_model, cfg.model.backbone, cfg.data.image_size, cfg.data.aspect, cfg.finetune.tta,
                  offsets, inputs.example_path(), best_epoch)  # the saved model again, now with its rule
        logger.log_metrics({"val_balanced_accuracy_with_rule": expected}, step=0)  # cross-fitted on val
        out.mkdir(parents=True, exist_ok=True)
        (out / names.DECISION_RULE_FILE).write_text(json.dumps(dict(zip(names.CLASSES, offsets.tolist())), indent=1))
        logger.log_artifact(out / names.DECISION_RULE_FILE, "report")
    if len(inputs.test_rows):
        log_test(logger, inputs, *saved_probs(cfg, inputs, saved_model, inputs.test_rows), offsets, out / "test")


def say_rule(offsets, expected: float, side: str) -> None:
    """One line on what the fitted decision rule does: kept, or declined as no better on new images."""
    if offsets.any():
        print(f"decision rule kept: {side} balanced accuracy with it {expected:.4f} (cross-fitted)", file=sys.stderr)
    else:
        print(f"decision rule declined: fitted on part of the {side} side, it did not beat the plain argmax "
              f"({expected:.4f}) on the rest; the model decides by its argmax", file=sys.stderr)


def test_scores(labels, probs, offsets) -> tuple[dict, dict[str, float]]:
    """A model's report on the test side and its `test_*` metrics: as the model decides (its
    decision rule applied), and `_without_rule` beside them when it has one."""
    from skinclr.train.metrics import apply_offsets, classification_metrics

    report = classification_metrics(labels, probs if offsets is None else apply_offsets(probs, offsets))
    metrics = {"test_balanced_accuracy": report["balanced_accuracy"], "test_accuracy": report["accuracy"],
               "test_macro_f1": report["macro_f1"], "test_roc_auc_macro": report["roc_auc_macro"],
               **{f"test_recall_{name}": m["recall"] for name, m in report["per_class"].items()}}
    if offsets is not None:
        plain = classification_metrics(labels, probs)
        metrics.update(test_balanced_accuracy_without_rule=plain["balanced_accuracy"],
                       test_accuracy_without_rule=plain["accuracy"])
    return report, {k: v for k, v in metrics.items() if v is not None}


def log_test(logger: RunLogger, inputs: Inputs, probs, loss: float, offsets, out: Path) -> dict:
    """The saved model on the test side: `test_*` metrics of the model as saved (its decision
    rule applied), logged once, `test_*_without_rule` beside them when it has one, and the
    report's files under `test/`."""
    from skinclr.train import figures

    report, metrics = test_scores(inputs.cache.labels[inputs.test_rows], probs, offsets)
    logger.log_metrics({**metrics, "test_loss": loss}, step=0)
    files = figures.write_report(report, out, f"test ({len(inputs.test_rows)} held-out images), saved model")
    (out / "test_metrics.json").write_text(json.dumps(report, indent=1))
    for f in [*files, out / "test_metrics.json"]:
        logger.log_artifact(f, names.TEST_ARTIFACTS)
    return report
