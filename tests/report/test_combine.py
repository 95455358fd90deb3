"""`skinclr ensemble`: fine-tune runs combined into one model, scored, promoted and predicted like any model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from skinclr import names
from skinclr.cli.main import main
from skinclr.config import load_config
from skinclr.run.runner import run_finetune
from skinclr.serve.predictor import EnsemblePredictor
from skinclr.serve.uris import load_predictor
from skinclr.track import store, tracking
from skinclr.train.metrics import apply_offsets

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper"


def _tiny_finetune(root: Path, seed: int) -> str:
    cfg = load_config(PAPER / "baseline_scratch.yaml",
                      [f"data.root={root}", "data.image_size=32", "data.workers=0", "data.test_fraction=0.2",
                       "data.val_fraction=0.25", "train.epochs=1", "train.batch_size=16",
                       "train.max_steps_per_epoch=3", f"train.seed={seed}"], stage="finetune")
    return run_finetune(cfg, progress=False).run_id


@pytest.fixture
def two_runs(synth_dir) -> list[str]:
    """Two tiny fine-tunes (seeds 0 and 1) on one split with a held-out test side."""
    return [_tiny_finetune(synth_dir, seed) for seed in (0, 1)]


def _images(synth_dir, n=10):
    return sorted((synth_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:n]


def test_an_ensemble_of_one_member_is_that_member(two_runs, synth_dir):
    member = load_predictor(f"runs:/{two_runs[0]}/model")
    images = _images(synth_dir)
    np.testing.assert_allclose(EnsemblePredictor([member]).predict_proba(images), member.predict_proba(images),
                               atol=1e-12)
    assert main(["ensemble", "--runs", two_runs[0]]) == 0
    c = MlflowClient(store.tracking_uri())
    (run,) = c.search_runs([c.get_experiment_by_name("skinclr-finetune").experiment_id],
                           f"tags.`{names.STAGE_TAG}` = 'ensemble'")
    logged = load_predictor(f"runs:/{run.info.run_id}/model")
    np.testing.assert_allclose(logged.predict_proba(images), member.predict_proba(images), atol=1e-9)
    assert run.data.tags[names.SPLIT_FINGERPRINT_TAG] == c.get_run(two_runs[0]).data.tags[names.SPLIT_FINGERPRINT_TAG]


def test_an_ensemble_averages_its_members_is_scored_on_their_split_and_is_promoted_like_any_model(
        two_runs, synth_dir, capsys):
    assert main(["ensemble", "--runs", *two_runs, "--tta", "flip", "--decision-rule", "balanced",
                 "--name", "pair"]) == 0
    c = MlflowClient(store.tracking_uri())
    (run,) = c.search_runs([c.get_experiment_by_name("skinclr-finetune").experiment_id],
                           "attributes.run_name = 'pair'")
    assert run.info.status == "FINISHED" and run.data.tags[names.ENSEMBLE_TAG] == ",".join(two_runs)
    for key in ("best_val_balanced_accuracy", "val_balanced_accuracy_with_rule", "test_balanced_accuracy",
                "test_balanced_accuracy_without_rule"):
        assert key in run.data.metrics, key

    ensemble = load_predictor(f"runs:/{run.info.run_id}/model")
    members = [load_predictor(f"runs:/{r}/model", tta="flip") for r in two_runs]
    images = _images(synth_dir)
    mean = np.mean([m.predict_proba(images) for m in members], axis=0)  # equal weights, each member with flip
    assert ensemble.tta == "flip" and len(ensemble.offsets) == 7
    np.testing.assert_allclose(ensemble.predict_proba(images), apply_offsets(mean, ensemble.offsets), atol=1e-9)

    assert main(["promote", "--run", run.info.run_id]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", "models:/skinclr@champion", *map(str, images)]) == 0
    printed = capsys.readouterr().out
    assert str(images[0]) in printed


def test_fold_models_make_one_model_with_a_cross_validated_estimate_and_a_rule_fitted_out_of_fold(synth_dir):
    from skinclr.tune.plan import load_sweep_config, search_space

    study, _ = load_sweep_config(Path(__file__).resolve().parents[2] / "experiments" / "studies" / "folds.yaml",
                                 [f"data.root={synth_dir}"])
    assert search_space(study)[1]["data.fold"]["values"] == [0, 1, 2, 3, 4] and study.data.test_fraction == 0.2
    ids = []
    for fold in (0, 1):
        cfg = load_config(PAPER / "baseline_scratch.yaml",
                          [f"data.root={synth_dir}", "data.image_size=32", "data.workers=0", "data.test_fraction=0.2",
                           "data.folds=3", f"data.fold={fold}", "train.epochs=1", "train.batch_size=16",
                           "train.max_steps_per_epoch=3"], stage="finetune")
        ids.append(run_finetune(cfg, progress=False).run_id)
    assert main(["ensemble", "--runs", *ids, "--decision-rule", "balanced", "--name", "folds"]) == 0
    c = MlflowClient(store.tracking_uri())
    (run,) = c.search_runs([c.get_experiment_by_name("skinclr-finetune").experiment_id], "attributes.run_name = 'folds'")
    m = run.data.metrics
    folds = [c.get_run(r).data.metrics["best_val_balanced_accuracy"] for r in ids]
    assert m["folds_val_balanced_accuracy_mean"] == pytest.approx(np.mean(folds))
    assert m["folds_val_balanced_accuracy_std"] == pytest.approx(np.std(folds, ddof=1))
    assert m["oof_balanced_accuracy_with_rule"] >= m["oof_balanced_accuracy"] - 1e-12  # kept only where it beats it
    assert {"test_balanced_accuracy", "test_balanced_accuracy_without_rule"} <= set(m)
    assert "best_val_balanced_accuracy" not in m and names.SPLIT_FINGERPRINT_TAG not in run.data.tags  # no common val


def test_members_of_one_dataset_copied_elsewhere_combine_and_of_another_dataset_do_not(synth_dir, tmp_path, capsys):
    """A copy of the folder (new file times, so a new data fingerprint) is the same dataset; other
    images are not, and the refusal is one line."""
    import os
    import shutil

    from skinclr.data.synth import make_synthetic

    copy = Path(shutil.copytree(synth_dir, tmp_path / "copy"))
    for f in (copy / "ISIC2018_Task3_Training_Input").iterdir():
        os.utime(f, (f.stat().st_atime + 60, f.stat().st_mtime + 60))
    here, there = _tiny_finetune(synth_dir, 0), _tiny_finetune(copy, 1)
    c = MlflowClient(store.tracking_uri())
    assert c.get_run(here).data.tags["data_fingerprint"] != c.get_run(there).data.tags["data_fingerprint"]
    assert main(["ensemble", "--runs", here, there, "--name", "copies"]) == 0

    other = _tiny_finetune(make_synthetic(tmp_path / "other", n=280, seed=5), 0)
    capsys.readouterr()
    assert main(["ensemble", "--runs", here, other]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different data" in err[0] and other in err[0]


def test_an_ensemble_is_scored_only_on_the_images_its_members_held_out(two_runs, synth_dir, tmp_path, capsys):
    """The folder moved: `--data` points at it, and the numbers are those of the original. An
    image the members held out, replaced under its id by one they trained on, relabelled, or gone:
    refused in one line naming it, as no ensemble scored on it could say what it claims."""
    import os
    import shutil

    from skinclr.data.manifest import GROUPINGS, TRAINING_GT, TRAINING_INPUT

    c = MlflowClient(store.tracking_uri())
    split = pd.read_csv(tracking.RunLogger(two_runs[0]).download("split.csv", tmp_path / "split"))
    held, trained = split.loc[split["split"] == "test", "image"].iloc[0], split.loc[split["split"] == "train", "image"].iloc[0]

    def score(*extra: str) -> float:
        assert main(["ensemble", "--runs", *two_runs, *extra]) == 0
        run = c.search_runs([c.get_run(two_runs[0]).info.experiment_id], f"tags.`{names.STAGE_TAG}` = 'ensemble'",
                            order_by=["attributes.start_time DESC"], max_results=1)[0]
        return run.data.metrics["test_balanced_accuracy"]

    here = score()
    moved = Path(shutil.copytree(synth_dir, tmp_path / "moved"))
    for f in (moved / TRAINING_INPUT).iterdir():  # a copy: new file times, a new data fingerprint
        os.utime(f, (f.stat().st_atime + 60, f.stat().st_mtime + 60))
    assert score("--data", str(moved)) == pytest.approx(here)

    def refused(folder: Path, what: str) -> None:
        capsys.readouterr()
        assert main(["ensemble", "--runs", *two_runs, "--data", str(folder)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{held} {what}" in err[0] and "--data" in err[0], err

    replaced = Path(shutil.copytree(synth_dir, tmp_path / "replaced"))
    shutil.copy(replaced / TRAINING_INPUT / f"{trained}.jpg", replaced / TRAINING_INPUT / f"{held}.jpg")
    refused(replaced, "is another picture")
    relabelled = Path(shutil.copytree(synth_dir, tmp_path / "relabelled"))
    truth = pd.read_csv(relabelled / TRAINING_GT)
    row = truth["image"] == held
    truth.loc[row, list(names.CLASSES)] = np.roll(truth.loc[row, list(names.CLASSES)].to_numpy(), 1, axis=1)
    truth.to_csv(relabelled / TRAINING_GT, index=False)
    old = split.loc[split["image"] == held, "label"].iloc[0]
    refused(relabelled, f"is {names.CLASSES[(names.CLASSES.index(old) + 1) % len(names.CLASSES)]}, not {old}")
    gone = Path(shutil.copytree(synth_dir, tmp_path / "gone"))
    (gone / TRAINING_INPUT / f"{held}.jpg").unlink()
    for table in (TRAINING_GT, GROUPINGS):
        frame = pd.read_csv(gone / table)
        frame[frame["image"] != held].to_csv(gone / table, index=False)
    refused(gone, "is gone")
    assert not c.search_runs([c.get_run(two_runs[0]).info.experiment_id], "attributes.status != 'FINISHED'")


def test_members_that_are_not_there_twice_or_not_fine_tunes_are_refused_in_one_line(two_runs, capsys):
    """A member named twice would count double; `--top 0` once meant every run of every split."""
    assert main(["ensemble", "--runs", two_runs[0]]) == 0
    c = MlflowClient(store.tracking_uri())
    (ensemble,) = c.search_runs([c.get_run(two_runs[0]).info.experiment_id], f"tags.`{names.STAGE_TAG}` = 'ensemble'")
    cases = {("--runs", two_runs[0], two_runs[0]): "given more than once",
             ("--runs", two_runs[0], "deadbeef"): "--runs deadbeef: no such run",
             ("--parent", "deadbeef"): "--parent deadbeef: no such run",
             ("--parent", two_runs[0]): "no finished fine-tune run",
             ("--top", "0"): "--top 0: give the number of runs",
             ("--top", "-2"): "--top -2: give the number of runs",
             ("--runs", two_runs[1], ensemble.info.run_id): f"fine-tune runs that trained a model; {ensemble.info.run_id}"}
    for args, said in cases.items():
        capsys.readouterr()
        assert main(["ensemble", *args]) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], (args, err)
    assert len(c.search_runs([c.get_run(two_runs[0]).info.experiment_id],
                             f"tags.`{names.STAGE_TAG}` = 'ensemble'")) == 1  # nothing logged by a refusal
