"""Grid studies: every combination of `sweep.grid` is one child run, and the label-efficiency
figure and table come back out of MLflow. Real Ray, real MLflow (SQLite), synthetic images at 32 px."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from skinclr.config import ConfigError, load_config
from skinclr.data.manifest import read_manifest
from skinclr.data.split import split_by_lesion
from skinclr.report.paper import build_report
from skinclr.run.runner import run_pretrain
from skinclr.track import tracking
from skinclr.tune.sweep import main

FRACTIONS, SEEDS = [0.3, 1.0], [0, 1]


def study_yaml(path, data, storage, experiment, **sweep):
    cfg = {
        "stage": "finetune",
        "data": {"root": str(data), "image_size": 32, "workers": 0},
        "train": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 2},
        "tracking": {"experiment": experiment},
        "sweep": {"stage": "finetune", "search": "grid", "max_concurrent": 2, "cpus_per_trial": 1,
                  "storage": str(storage), "name": "study",
                  "grid": {"data.label_fraction": FRACTIONS, "finetune.init": ["scratch"], "train.seed": SEEDS},
                  **sweep},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def study(synth_dir, tmp_path_factory):
    """A pretrain run, then a 2 x 2 x 2 grid study over label fraction, init and seed."""
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("SKINCLR_CACHE", str(tmp / "cache"))
        pre = load_config(None, {"data.root": str(synth_dir), "data.image_size": 32, "data.workers": 0,
                                 "train.epochs": 1, "train.batch_size": 16, "train.max_steps_per_epoch": 2,
                                 "monitor.max_bank": 48, "monitor.k": 5, "tracking.experiment": "study-pre"},
                          stage="pretrain")
        pretrain_run = run_pretrain(pre, progress=False).run_id
        config = study_yaml(tmp / "study.yaml", synth_dir, tmp / "ray", "study")
        # the CLI form a user types: one entry of the grid replaced with --set
        code = main(config, [f"sweep.grid.finetune.init=[scratch, 'runs:/{pretrain_run}']"])
        report = build_report(["study"], tmp / "report")
    split = split_by_lesion(read_manifest(synth_dir))
    return {"code": code, "client": MlflowClient(uri), "pretrain_run": pretrain_run, "report": report,
            "train_images": int((split["split"] == "train").sum())}


def children(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return ([r for r in runs if r.data.tags.get("skinclr.sweep") == "1"],
            [r for r in runs if "skinclr.trial_id" in r.data.tags])


@pytest.mark.slow
def test_grid_study_runs_every_combination_once_under_one_parent(study):
    assert study["code"] == 0
    parents, kids = children(study["client"], "study")
    assert len(parents) == 1 and parents[0].data.tags["skinclr.search"] == "grid"
    assert parents[0].info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in kids)
    points = sorted((float(r.data.params["data.label_fraction"]), r.data.params["finetune.init"],
                     int(r.data.params["train.seed"])) for r in kids)
    inits = ["scratch", f"runs:/{study['pretrain_run']}"]
    assert points == sorted(itertools.product(FRACTIONS, inits, SEEDS))
    assert all(r.data.tags.get("skinclr.stopped_by", "") == "" for r in kids)  # no ASHA in a grid


@pytest.mark.slow
def test_label_fraction_trains_on_a_seeded_subset_and_keeps_val(study):
    _, kids = children(study["client"], "study")
    assert len({r.data.tags["split_fingerprint"] for r in kids}) == 1  # one val side for all
    part = [r for r in kids if float(r.data.params["data.label_fraction"]) == 0.3]
    full = [r for r in kids if float(r.data.params["data.label_fraction"]) == 1.0]
    assert all("label_fingerprint" not in r.data.tags for r in full)
    by_seed = {int(r.data.params["train.seed"]): r.data.tags["label_fingerprint"] for r in part}
    assert by_seed[0] != by_seed[1]  # data.label_seed -1: each seed draws its own subset
    assert len({r.data.tags["label_fingerprint"] for r in part}) == 2  # same seed, same subset, both inits
    assert all(0.3 * study["train_images"] <= int(r.data.tags["skinclr.train_images"]) < 0.45 * study["train_images"]
               for r in part)


@pytest.mark.slow
def test_report_draws_label_efficiency_from_the_study_runs(study):
    _, kids = children(study["client"], "study")
    table = pd.read_csv(study["report"].parent / "label_efficiency.csv")
    assert len(table) == 4 and set(table["n runs"]) == {2}
    assert (study["report"].parent / "label_efficiency.png").stat().st_size > 10_000
    for _, row in table.iterrows():
        init = "scratch" if row["init"] == "scratch" else f"runs:/{study['pretrain_run']}"
        cell = [r for r in kids if r.data.params["finetune.init"] == init
                and float(r.data.params["data.label_fraction"]) == row["label fraction"]]
        for key, column in (("best_val_balanced_accuracy", "val balanced accuracy"), ("best_val_accuracy", "val accuracy")):
            values = [r.data.metrics[key] for r in cell]
            assert row[column] == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
        assert set(row["runs"].split(", ")) == {r.info.run_id for r in cell}
    text = study["report"].read_text()
    assert "## Label efficiency" in text and "label_efficiency.png" in text
    # The study's Optuna charts, drawn from its grid's trials, are linked by artifact path and run.
    parent = children(study["client"], "study")[0][0]
    assert "Optuna charts of the study: `sweep_charts/optimization_history.html`" in text
    assert f"]({tracking.run_link(parent.info.run_id, parent.info.experiment_id)})" in text
    assert "Table 1" not in text  # the experiment holds a study only
    assert "pretraining" in table and all(f"`{study['pretrain_run'][:8]}`: kNN " in cell
                                          for cell in table.loc[table["init"] == "SimCLR", "pretraining"])


@pytest.mark.slow
def test_a_study_over_methods_is_tabled_by_method_with_each_pretraining_run(synth_dir, tmp_path, monkeypatch):
    """Fine-tunes from a SimCLR and a MoCo v2 run, two seeds each: the report names each row by
    its method (not all "SimCLR") and shows the kNN curve of the run it started from."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SKINCLR_CACHE", str(tmp_path / "cache"))
    base = {"data.root": str(synth_dir), "data.image_size": 32, "data.workers": 0, "train.batch_size": 16,
            "train.max_steps_per_epoch": 2, "monitor.every": 1, "monitor.max_bank": 48, "monitor.k": 5,
            "tracking.experiment": "pre"}
    simclr = run_pretrain(load_config(None, {**base, "train.epochs": 3}, stage="pretrain"), progress=False).run_id
    moco = run_pretrain(load_config(None, {**base, "train.epochs": 1, "pretrain.method": "moco_v2",
                                           "moco_v2.queue_size": 64}, stage="pretrain"), progress=False).run_id
    config = study_yaml(tmp_path / "methods.yaml", synth_dir, tmp_path / "ray", "methods")
    grid = yaml.safe_load(config.read_text())
    grid["sweep"]["grid"] = {"finetune.init": [f"runs:/{simclr}", f"runs:/{moco}"], "train.seed": SEEDS}
    config.write_text(yaml.safe_dump(grid))
    assert main(config, []) == 0
    report = build_report(["methods"], tmp_path / "report")

    table = pd.read_csv(report.parent / "study.csv")
    assert list(table["init"]) == ["SimCLR", "MoCo v2"] and set(table["n runs"]) == {2}
    _, kids = children(MlflowClient(), "methods")
    for _, row in table.iterrows():
        run = simclr if row["init"] == "SimCLR" else moco
        cell = [r for r in kids if r.data.params["finetune.init"] == f"runs:/{run}"]
        assert set(row["runs"].split(", ")) == {r.info.run_id for r in cell}
        assert row["pretraining"].startswith(f"`{run[:8]}`: kNN ")
    assert "epochs 1 / 2 / 3" in table.loc[0, "pretraining"] and "epochs 1 (" in table.loc[1, "pretraining"]
    text = report.read_text()
    assert "by init" in text and "Label efficiency" not in text
    assert not (report.parent / "label_efficiency.png").exists()


def test_grid_study_settings_are_checked_before_ray_starts(synth_dir, tmp_path):
    config = study_yaml(tmp_path / "s.yaml", synth_dir, tmp_path / "ray", "bad")
    with pytest.raises(ConfigError, match="sweep.grid 'train.seed': needs a non-empty list"):
        main(config, ["sweep.grid.train.seed=3"])
    with pytest.raises(ConfigError, match="no 'sede' in train"):
        main(config, ["sweep.grid.train.sede=[1, 2]"])
    with pytest.raises(ConfigError, match="finetune.init 'runs:/nope': no pretrain run"):
        main(config, ["sweep.grid.finetune.init=[scratch, 'runs:/nope']"])
    with pytest.raises(ConfigError, match="only applies to sweep.search=grid"):
        main(config, ["sweep.search=random"])
    assert not (tmp_path / "ray").exists()
