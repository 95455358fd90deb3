"""`evaluate` and `predict` on real ISIC images: what they log, write and return, and how they fail."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinclr.track import tracking
from skinclr.data.manifest import read_manifest
from skinclr.report.evaluate import evaluate, format_summary, predict
from skinclr.train.metrics import classification_metrics
from skinclr.serve.uris import load_predictor
from skinclr.names import CLASSES
from skinclr.data.problems import DataError
from skinclr.serve.pyfunc import save_pyfunc
from tests.serve.test_pyfunc import labelled_dir, log_trained, trained_state  # noqa: F401 (fixtures)

pytestmark = pytest.mark.real_data

ARTIFACTS = {"confusion_matrix.png", "confusion_matrix.csv", "confusion_matrix_normalized.csv",
             "classification_report.csv", "classification_report.txt", "metrics.json"}


def test_evaluate_logs_a_linked_run_and_writes_the_json(trained_state, labelled_dir, tmp_path):
    model_run, uri = log_trained(trained_state)
    out = tmp_path / "out" / "metrics.json"
    result = evaluate(uri, labelled_dir, json_out=out, progress=False)

    written = json.loads(out.read_text())
    assert written == result
    manifest = read_manifest(labelled_dir)
    assert written["model_uri"] == uri and written["model_run_id"] == model_run
    assert written["data_dir"] == str(labelled_dir) and written["num_images"] == len(manifest.frame) == 21
    direct = classification_metrics(manifest.frame["label"].to_numpy(),
                                     load_predictor(uri).predict_proba(manifest.frame["path"].tolist()))
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "roc_auc_macro", "per_class", "confusion_matrix",
                "confusion_matrix_normalized"):
        assert written[key] == direct[key], key
    assert sum(map(sum, written["confusion_matrix"])) == 21

    run = tracking.client().get_run(written["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_id != model_run
    assert run.data.tags["skinclr.model_uri"] == uri and run.data.tags["skinclr.model_run_id"] == model_run
    assert model_run in run.data.tags["mlflow.note.content"]
    assert run.data.tags["data_fingerprint"] == manifest.fingerprint
    logged = run.data.metrics
    assert logged["test_balanced_accuracy"] == pytest.approx(direct["balanced_accuracy"])
    assert logged["test_accuracy"] == pytest.approx(direct["accuracy"])
    assert logged["test_macro_f1"] == pytest.approx(direct["macro_f1"])
    assert logged["test_roc_auc_macro"] == pytest.approx(direct["roc_auc_macro"])
    for name in CLASSES:
        assert logged[f"test_recall_{name}"] == pytest.approx(direct["per_class"][name]["recall"])
    assert {a.path for a in tracking.client().list_artifacts(run.info.run_id)} == ARTIFACTS

    counts = pd.read_csv(Path(tracking.RunLogger(run.info.run_id).download("confusion_matrix.csv", tmp_path)),
                         index_col=0)
    assert list(counts.columns) == list(CLASSES) and counts.to_numpy().tolist() == written["confusion_matrix"]

    lines = format_summary(result).splitlines()
    balanced = next(line for line in lines if line.startswith("balanced accuracy"))
    plain = next(line for line in lines if line.startswith("accuracy"))
    assert f"{direct['balanced_accuracy']:.4f}" in balanced and f"{direct['accuracy']:.4f}" in plain
    assert all(any(line.strip().startswith(name) for line in lines) for name in CLASSES)


def test_a_corrupt_jpeg_fails_evaluation_naming_the_file_and_logs_nothing(labelled_dir, trained_state, tmp_path):
    _, uri = log_trained(trained_state)
    folder = shutil.copytree(labelled_dir, tmp_path / "isic-val")
    victim = sorted((folder / "ISIC2018_Task3_Validation_Input").glob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:700])
    with pytest.raises(DataError, match=victim.name):
        evaluate(uri, folder, json_out=tmp_path / "metrics.json", progress=False)
    assert not (tmp_path / "metrics.json").exists()
    experiment = tracking.client().get_experiment_by_name("skinclr-evaluate")
    assert experiment is None or not tracking.client().search_runs([experiment.experiment_id])


def test_predict_writes_one_row_per_image(trained_state, labelled_dir, tmp_path):
    model = save_pyfunc(tmp_path / "model", trained_state, "resnet18", 32, "center_crop")
    paths = read_manifest(labelled_dir).frame["path"].tolist()[::3]
    frame = predict(str(model), paths, out_csv=tmp_path / "out" / "probs.csv")
    written = pd.read_csv(tmp_path / "out" / "probs.csv")
    assert list(written.columns) == ["image", *CLASSES, "predicted"]
    assert written["image"].tolist() == paths and len(written) == len(frame) == len(paths)
    probs = written[list(CLASSES)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert written["predicted"].tolist() == [CLASSES[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(probs, load_predictor(model).predict_proba(paths), atol=1e-9)


def test_predict_in_the_isic_format_is_read_by_the_official_scorer_with_the_same_balanced_accuracy(
        trained_state, labelled_dir, tmp_path, capsys, monkeypatch):
    """`--format isic` writes the challenge's submission CSV: the official scorer reads it (it
    refuses any extra column) and finds the balanced accuracy skinclr's own metric finds."""
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

    # isic-challenge-scoring 5.6 calls DataFrame.applymap, which pandas 3 renamed to DataFrame.map
    monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)

    from skinclr.cli.main import main

    model = save_pyfunc(tmp_path / "model", trained_state, "resnet18", 32, "center_crop")
    manifest = read_manifest(labelled_dir)
    out = tmp_path / "submission.csv"
    assert main(["predict", "--model", str(model), "--format", "isic", "--out", str(out),
                 *manifest.frame["path"]]) == 0
    written = pd.read_csv(out)
    assert list(written.columns) == ["image", *CLASSES]
    assert written["image"].tolist() == manifest.frame["image"].tolist()  # ids: no folder, no extension
    truth = pd.read_csv(labelled_dir / "ISIC2018_Task3_Validation_GroundTruth.csv")  # the official truth format
    truth[truth["image"].isin(written["image"])].to_csv(tmp_path / "truth.csv", index=False)
    official = ClassificationScore.from_file(tmp_path / "truth.csv", out, ClassificationMetric.BALANCED_ACCURACY)
    ours = classification_metrics(manifest.frame["label"].to_numpy(), written[list(CLASSES)].to_numpy())
    assert official.validation == pytest.approx(ours["balanced_accuracy"], abs=1e-9)

    capsys.readouterr()
    twice = [manifest.frame["path"][0], str(shutil.copy(manifest.frame["path"][0], tmp_path))]
    assert main(["predict", "--model", str(model), "--format", "isic", "--out", str(tmp_path / "b.csv"), *twice]) == 1
    assert "given more than once" in capsys.readouterr().err and not (tmp_path / "b.csv").exists()
    broken = tmp_path / "ISIC_9999999.jpg"
    broken.write_bytes(b"not an image")
    assert main(["predict", "--model", str(model), "--format", "isic", "--out", str(tmp_path / "c.csv"),
                 manifest.frame["path"][1], str(broken)]) == 1
    assert "ISIC submission needs every image" in capsys.readouterr().err and not (tmp_path / "c.csv").exists()

    # the challenge's test images come as a folder, beside its licence: the folder is its images
    folder = Path(shutil.copytree(Path(manifest.frame["path"][0]).parent, tmp_path / "ISIC2018_Task3_Test_Input"))
    (folder / "LICENSE.txt").write_text("CC-BY-NC 4.0")
    assert main(["predict", "--model", str(model), "--format", "isic", "--out", str(tmp_path / "d.csv"),
                 str(folder)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "d.csv").sort_values("image", ignore_index=True),
                                  written.sort_values("image", ignore_index=True))
    (tmp_path / "nothing").mkdir()
    capsys.readouterr()
    assert main(["predict", "--model", str(model), str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a folder with no image files" in err[0]


# ---------------------------------------------------------------------------------------------
# "test" means unseen


def _subset(source: Path, names: list[str], out: Path) -> Path:
    """A folder in the training layout holding `names` of `source` (images, labels, lesions)."""
    from skinclr.data.manifest import GROUPINGS, TRAINING_GT, TRAINING_INPUT

    (out / TRAINING_INPUT).mkdir(parents=True)
    for name in names:
        shutil.copy(source / TRAINING_INPUT / f"{name}.jpg", out / TRAINING_INPUT)
    for table in (TRAINING_GT, GROUPINGS):
        frame = pd.read_csv(source / table)
        frame[frame["image"].isin(names)].to_csv(out / table, index=False)
    return out


@pytest.mark.slow
def test_the_models_own_images_are_scored_as_train_and_val_never_as_test(synth_dir, tmp_path):
    from skinclr.report.paper import evaluation_runs
    from skinclr.data.synth import make_synthetic
    from tests.track.test_registry import finetune_run

    run = finetune_run(synth_dir)
    uri = f"runs:/{run}/model"
    split = pd.read_csv(tracking.RunLogger(run).download("split.csv", tmp_path))
    c = tracking.client()

    own = evaluate(uri, synth_dir, progress=False)  # the folder it was trained on
    counts = split["split"].value_counts()
    assert own["data_role"] == "mixed" and own["matched_by"] == "same data"
    assert own["images_by_role"] == {"train": counts["train"], "val": counts["val"], "test": 0}
    logged = c.get_run(own["run_id"]).data.metrics
    assert not any(k.startswith("test_") for k in logged)
    val = split.loc[split["split"] == "val", "image"]
    manifest = read_manifest(synth_dir).frame
    probs = load_predictor(uri).predict_proba(manifest.loc[manifest["image"].isin(val), "path"].tolist())
    direct = classification_metrics(manifest.loc[manifest["image"].isin(val), "label"].to_numpy(), probs)
    assert logged["val_balanced_accuracy"] == pytest.approx(direct["balanced_accuracy"])
    assert "train_balanced_accuracy" in logged
    assert len(own["warnings"]) == 1 and f"{len(split)} of {len(split)} images" in own["warnings"][0]
    assert evaluation_runs([run]) == {}  # the report lists no test number for it

    # another synthetic set, other images under other ids: all unseen, all test, no image taken for a copy
    held = make_synthetic(tmp_path / "held", n=40, seed=1)
    unseen = evaluate(uri, held, progress=False)
    assert unseen["data_role"] == "test" and unseen["matched_by"] == "copies" and unseen["copies_found"] == 0
    assert unseen["warnings"] == []
    assert c.get_run(unseen["run_id"]).data.metrics["test_balanced_accuracy"] == unseen["balanced_accuracy"]
    assert evaluation_runs([run])[run].info.run_id == unseen["run_id"]

    # the model's own images among held-out ones: re-saved at JPEG quality 70 under their own ids,
    # or copied under new ids; seen either way, never test
    from PIL import Image

    from skinclr.data.manifest import GROUPINGS, TRAINING_GT, TRAINING_INPUT

    taken = split[["image", "split"]].head(12)
    mixed = _subset(synth_dir, taken["image"].tolist(), tmp_path / "mixed")
    renamed = {old: f"ISIC_{8_000_000 + k:07d}" for k, old in enumerate(taken["image"].tail(6))}
    for old in taken["image"]:
        jpg = mixed / TRAINING_INPUT / f"{old}.jpg"
        Image.open(jpg).convert("RGB").save(mixed / TRAINING_INPUT / f"{renamed.get(old, old)}.jpg", quality=70)
        if old in renamed:
            jpg.unlink()
    for table in (TRAINING_GT, GROUPINGS):
        both = pd.concat([pd.read_csv(mixed / table).replace({"image": renamed}), pd.read_csv(held / table)])
        both.to_csv(mixed / table, index=False)
    for jpg in (held / TRAINING_INPUT).glob("*.jpg"):
        shutil.copy(jpg, mixed / TRAINING_INPUT)
    part = evaluate(uri, mixed, progress=False)
    expected = taken["split"].value_counts()
    assert part["matched_by"] == "copies" and part["data_role"] == "mixed" and part["copies_found"] == 6
    assert part["images_by_role"] == {"train": expected.get("train", 0), "val": expected.get("val", 0), "test": 40}
    assert part["parts"]["test"]["num_samples"] == 40
    assert c.get_run(part["run_id"]).data.tags["skinclr.data_role"] == "mixed"


def test_a_folder_without_every_class_never_reports_the_isic_metric(trained_state, labelled_dir, tmp_path):
    """Only BCC images: the mean recall over the classes present is not the ISIC 2018 metric, so it
    goes under a name that says so, the folder's missing classes are named, and nothing is logged
    or returned as balanced_accuracy."""
    _, uri = log_trained(trained_state)
    only = tmp_path / "bcc"
    (only / "ISIC2018_Task3_Validation_Input").mkdir(parents=True)
    gt = pd.read_csv(labelled_dir / "ISIC2018_Task3_Validation_GroundTruth.csv")
    gt = gt[gt["BCC"] == 1.0]
    for name in gt["image"]:
        shutil.copy(labelled_dir / "ISIC2018_Task3_Validation_Input" / f"{name}.jpg",
                    only / "ISIC2018_Task3_Validation_Input")
    gt.to_csv(only / "ISIC2018_Task3_Validation_GroundTruth.csv", index=False)

    result = evaluate(uri, only, progress=False)
    missing = [c for c in CLASSES if c != "BCC"]
    assert result["balanced_accuracy"] is None and result["missing_classes"] == missing
    assert result["balanced_accuracy_present_classes"] == pytest.approx(result["per_class"]["BCC"]["recall"])
    assert any("holds no images of " + ", ".join(missing) in w for w in result["warnings"])
    logged = tracking.client().get_run(result["run_id"]).data.metrics
    assert "test_balanced_accuracy" not in logged and "test_balanced_accuracy_present_classes" in logged
    summary = format_summary(result)
    assert "; the ISIC 2018 metric" not in summary and "not the ISIC 2018 metric" in summary and "MEL" in summary


def test_a_held_out_image_replaced_by_one_the_model_trained_on_is_not_scored_as_test(synth_dir, tmp_path):
    """An image id keeps its role, but not against its pixels: a held-out file overwritten with a
    training image is that training image, and is scored as train."""
    from skinclr.data.manifest import TRAINING_INPUT
    from tests.track.test_registry import finetune_run

    run = finetune_run(synth_dir, "data.test_fraction=0.2", "data.val_fraction=0.25")
    split = pd.read_csv(tracking.RunLogger(run).download("split.csv", tmp_path))
    counts = split["split"].value_counts()
    held, trained = split.loc[split["split"] == "test", "image"].iloc[0], split.loc[split["split"] == "train", "image"].iloc[0]
    folder = Path(shutil.copytree(synth_dir, tmp_path / "folder"))
    shutil.copy(folder / TRAINING_INPUT / f"{trained}.jpg", folder / TRAINING_INPUT / f"{held}.jpg")
    result = evaluate(f"runs:/{run}/model", folder, progress=False)
    assert result["matched_by"] == "copies" and result["copies_found"] == 1
    assert result["images_by_role"] == {"train": counts["train"] + 1, "val": counts["val"], "test": counts["test"] - 1}

    # the original back (a new file time: the folder still differs from the run's, so it is hashed): nothing moves
    shutil.copy(synth_dir / TRAINING_INPUT / f"{held}.jpg", folder / TRAINING_INPUT / f"{held}.jpg")
    result = evaluate(f"runs:/{run}/model", folder, progress=False)
    assert result["copies_found"] == 0 and result["images_by_role"] == counts.reindex(["train", "val", "test"]).to_dict()
