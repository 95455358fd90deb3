"""`skinclr evaluate` and `skinclr predict`: a model by URI on a labelled folder or on loose images.

Evaluation reads the images through the model's own preprocessing (the served path, not the
training cache), so the numbers are those of the model as deployed. Each evaluation is a new
MLflow run, tagged with the model's URI and source run, so one model can be scored on several
sets without touching the run that trained it.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from core import metrics as M
from core.data import CLASSES, read_manifest
from core.serving import Predictor, load_predictor
from core.tracking import STAGE_TAG, RunLogger


def _tags(model_uri: str, predictor: Predictor, manifest) -> dict[str, str]:
    tags = {"skinclr.model_uri": model_uri, STAGE_TAG: "evaluate", "data_fingerprint": manifest.fingerprint,
            "data_root": str(manifest.root), "data_layout": manifest.layout}
    note = f"Evaluation of `{model_uri}` on `{manifest.root}` ({len(manifest.frame)} images)."
    if predictor.run_id:
        tags["skinclr.model_run_id"] = predictor.run_id
        note += f" The model was trained in run [{predictor.run_id}](#/runs/{predictor.run_id})."
    tags["mlflow.note.content"] = note
    return tags


def _run_metrics(report: dict) -> dict[str, float | None]:
    out = {"test_balanced_accuracy": report["balanced_accuracy"], "test_accuracy": report["accuracy"],
           "test_macro_f1": report["macro_f1"], "test_roc_auc_macro": report["roc_auc_macro"]}
    out.update({f"test_recall_{name}": m["recall"] for name, m in report["per_class"].items()})
    return out  # None (a class absent from the folder, an undefined AUC) is not logged


def _write_artifacts(report: dict, result: dict, out: Path, title: str) -> list[Path]:
    M.plot_confusion_matrix(report, out / "confusion_matrix.png", title=title)
    M.write_confusion_csv(report, out / "confusion_matrix.csv", normalized=False)
    M.write_confusion_csv(report, out / "confusion_matrix_normalized.csv", normalized=True)
    M.report_frame(report).to_csv(out / "classification_report.csv")
    (out / "classification_report.txt").write_text(M.report_text(report))
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return [out / n for n in ("confusion_matrix.png", "confusion_matrix.csv", "confusion_matrix_normalized.csv",
                              "classification_report.csv", "classification_report.txt", "metrics.json")]


def evaluate(model_uri: str, data_dir, json_out=None, experiment: str = "skinclr-evaluate",
             progress: bool = True) -> dict:
    """Score a model on a labelled folder, log a new MLflow run, return (and optionally write) the result.

    The run is created only once every image has been predicted: a broken file raises DataError
    naming it, and leaves no half-logged run behind."""
    predictor = load_predictor(model_uri)
    manifest = read_manifest(data_dir)
    probs = predictor.predict_proba(manifest.frame["path"].tolist(), progress=progress)
    report = M.classification_metrics(manifest.frame["label"].to_numpy(), probs)

    logger = RunLogger.create(experiment, run_name=f"evaluate {manifest.root.name}",
                              tags=_tags(str(model_uri), predictor, manifest))
    result = {**report, "model_uri": str(model_uri), "model_run_id": predictor.run_id,
              "data_dir": str(manifest.root), "data_fingerprint": manifest.fingerprint,
              "num_images": len(manifest.frame), "run_id": logger.run_id}
    try:
        logger.log_params({"model_uri": model_uri, "data_dir": manifest.root, "num_images": len(manifest.frame),
                           **{f"model_{k}": v for k, v in predictor.meta.items() if k != "classes"}})
        logger.log_metrics(_run_metrics(report), step=0)
        with tempfile.TemporaryDirectory() as tmp:
            for f in _write_artifacts(report, result, Path(tmp), title=f"{model_uri} on {manifest.root.name}"):
                logger.log_artifact(f)
    except BaseException:
        logger.end("FAILED")
        raise
    logger.end("FINISHED")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result


def predict(model_uri: str, images: list[str], out_csv=None) -> pd.DataFrame:
    """One row per image: its path, the seven class probabilities and the most likely class."""
    predictor = load_predictor(model_uri)
    probs = predictor.predict_proba([str(i) for i in images])
    frame = pd.DataFrame(probs, columns=list(CLASSES))
    frame.insert(0, "image", [str(i) for i in images])
    frame["predicted"] = np.asarray(CLASSES)[probs.argmax(axis=1)]
    if out_csv:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out_csv, index=False)
    return frame


def format_summary(result: dict) -> str:
    """The headline numbers for the terminal: both accuracies on their own lines, then recall per class."""
    lines = [f"model              {result['model_uri']}",
             f"data               {result['data_dir']} ({result['num_images']} images)",
             f"balanced accuracy  {result['balanced_accuracy']:.4f}   (mean recall over classes; the ISIC 2018 metric)",
             f"accuracy           {result['accuracy']:.4f}   (fraction of images right)",
             "recall per class:"]
    for name, m in result["per_class"].items():
        recall = "   -  " if m["recall"] is None else f"{m['recall']:.4f}"
        lines.append(f"  {name:<6} {recall}  (n={m['support']})")
    lines.append(f"MLflow run         {result['run_id']}")
    return "\n".join(lines)
