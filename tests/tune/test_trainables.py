"""A trial as a unit, in this process with Tune's session calls stood in for: it opens the inputs
its driver resolved (never the dataset folder), reports checkpoints that only point at the
runner's, and a restored trial continues its MLflow run from the runner's checkpoint however far
past Tune's last report it got. Real Ray runs the same trials in tests/tune/test_sweep.py."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray import tune

import skinclr.data.inputs
from skinclr.track import store, tracking
from skinclr.config import load_config
from skinclr.data.inputs import resolve_inputs, save_inputs
from skinclr.names import COMMAND_TAG, EPOCHS_RUN_TAG, INPUTS_FILE, SWEEP_PARENT_TAG, TRIAL_STATE_FILE
from skinclr.run.runner import resume_state
from skinclr.track.store import checkpoint_root
from skinclr.track.tracking import RunLogger
from skinclr.tune import trainables
from skinclr.tune.trainables import (TrialSetup, epoch_metrics, finished_result, pointer, resolved_inputs,
                                     restored_run, run_trial, trial_config, trial_name, trial_run_name, trial_runs,
                                     use_sweep_checkpoints)


@dataclass
class Context:
    trial_id: str = "t0001"

    def get_trial_id(self) -> str:
        return self.trial_id

    def get_trial_name(self) -> str:
        return "trial 4"  # as tuner.trial_name names it


class Session:
    """Tune's side of a trial: what it was restored from, and what the trial reported to it. A
    report can be made to fail, as a killed trial's last one does."""

    def __init__(self, keep: Path, restored: Path | None = None, fail_at: int | None = None):
        self.keep, self.restored, self.fail_at = keep, restored, fail_at
        self.reports: list[tuple[dict, list[str] | None]] = []

    def get_checkpoint(self):
        return tune.Checkpoint.from_directory(str(self.restored)) if self.restored else None

    def report(self, metrics, checkpoint=None):
        files = None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                files = sorted(p.name for p in Path(folder).iterdir())
                if metrics["epoch"] != self.fail_at:  # what Tune keeps of the report
                    shutil.copytree(folder, self.keep / f"epoch{metrics['epoch']}")
        if metrics["epoch"] == self.fail_at:
            raise KeyboardInterrupt  # the trial dies before Tune recorded this report
        self.reports.append((metrics, files))


@pytest.fixture
def sweep(synth_dir, tmp_path, monkeypatch):
    """What a sweep's driver prepares: the parent run, the resolved inputs in its folder, the setup."""
    monkeypatch.setenv("SKINCLR_CHECKPOINTS", "")  # (trials set it; the test restores it)
    folder = tmp_path / "ray" / "sweep-a"
    base = load_config(None, {"data.root": str(synth_dir), "data.image_size": 16, "data.workers": 0,
                              "train.epochs": 3, "train.batch_size": 16, "train.max_steps_per_epoch": 2,
                              "monitor.k": 5, "monitor.max_bank": 48, "tracking.experiment": "trials",
                              "tracking.resume": False}, stage="pretrain")
    inputs = resolve_inputs(base, progress=False)
    base.data.split_file = str(save_inputs(inputs, folder))
    base.data.cache_dir = str(inputs.cache.path.parent)
    parent = RunLogger.create("trials", "sweep-a", tags={SWEEP_PARENT_TAG: "1"})
    return TrialSetup(stage="pretrain", base=base.to_dict(), parent_run_id=parent.run_id,
                      tracking_uri=store.tracking_uri(), name=folder.name, storage=str(folder.parent),
                      command="skinclr sweep --config sweep.yaml")


def trial(setup: TrialSetup, session: Session, monkeypatch, params=None) -> None:
    """`run_trial` as Tune calls it, with the folder off limits."""
    def refuse(*args, **kwargs):
        raise AssertionError("a trial read the dataset folder")

    with monkeypatch.context() as mp:
        mp.setattr(skinclr.data.inputs, "read_manifest", refuse)
        mp.setattr(trainables.tune, "get_context", lambda: Context())
        mp.setattr(trainables.tune, "get_checkpoint", session.get_checkpoint)
        mp.setattr(trainables.tune, "report", session.report)
        run_trial(params or {"simclr.temperature": 0.3}, setup)


def knn_steps(run_id: str) -> list[int]:
    return [m.step for m in tracking.client().get_metric_history(run_id, "knn_balanced_accuracy")]


def test_a_killed_trial_continues_its_run_from_the_runners_checkpoint(sweep, tmp_path, monkeypatch):
    keep = tmp_path / "tune"
    first = Session(keep, fail_at=2)  # the runner saved epoch 2, Tune never heard of it
    with pytest.raises(KeyboardInterrupt):
        trial(sweep, first, monkeypatch)
    [(metrics, files)] = first.reports
    assert metrics["epoch"] == 1 and files == [TRIAL_STATE_FILE]  # Tune's checkpoint only points
    run_id = metrics["mlflow_run_id"]
    assert json.loads((keep / "epoch1" / TRIAL_STATE_FILE).read_text()) == {"run_id": run_id, "epoch": 1}
    assert resume_state(run_id)["epoch"] == 2
    assert checkpoint_root() == checkpoint_root(sweep.tracking_uri)  # beside the sweep's SQLite store

    restored = Session(keep, restored=keep / "epoch1")
    trial(sweep, restored, monkeypatch)
    assert [m["epoch"] for m, _ in restored.reports] == [3]  # from the runner's epoch 2, not Tune's epoch 1
    assert list(trial_runs(sweep.parent_run_id)) == ["t0001"]
    run = tracking.client().get_run(run_id)
    assert run.info.status == "FINISHED" and knn_steps(run_id) == [1, 2, 3]
    assert run.data.params["simclr.temperature"] == "0.3" and run.data.tags["skinclr.sampled.simclr.temperature"] == "0.3"
    assert run.info.run_name == "pretrain simclr trial 4"  # what it is, not Ray's generated name
    assert run.data.tags[COMMAND_TAG] == "skinclr sweep --config sweep.yaml"  # its sweep's command

    again = Session(keep, restored=keep / "epoch3")  # ended just before its driver was killed
    trial(sweep, again, monkeypatch)
    [(last, files)] = again.reports
    assert files is None and last["epoch"] == 3 and last["mlflow_run_id"] == run_id
    assert knn_steps(run_id) == [1, 2, 3]  # not trained again


def test_a_trial_without_a_tune_checkpoint_finds_its_run_by_its_trial_id(sweep):
    child = RunLogger.create("trials", tags={"skinclr.trial_id": "t0007"}, parent_run_id=sweep.parent_run_id)
    assert restored_run(None, sweep.parent_run_id, "t0007") == child.run_id
    assert restored_run(None, sweep.parent_run_id, "t0008") is None  # a new trial
    folder = Path(sweep.storage) / "pointer"
    folder.mkdir()
    pointer(folder, child.run_id, 4)
    assert restored_run(tune.Checkpoint.from_directory(str(folder)), "no-such-parent", "t0007") == child.run_id


def test_only_a_finished_run_is_repeated_for_tune():
    running = RunLogger.create("trials")
    assert finished_result(None) is None and finished_result(running.run_id) is None
    running.log_metrics({"knn_balanced_accuracy": 0.4}, step=2)
    running.set_tags({EPOCHS_RUN_TAG: 2})
    running.end("FINISHED")
    assert finished_result(running.run_id) == {"knn_balanced_accuracy": 0.4, "epoch": 2, "early_stop": 0,
                                               "mlflow_run_id": running.run_id}


def test_a_trial_config_is_the_base_with_its_sampled_values(sweep):
    cfg = trial_config(sweep, {"simclr.temperature": 0.2, "train.lr": 0.01})
    assert (cfg.simclr.temperature, cfg.train.lr, cfg.train.epochs, cfg.tracking.resume) == (0.2, 0.01, 3, False)
    assert resolved_inputs(sweep) == Path(sweep.storage) / sweep.name / INPUTS_FILE
    (Path(sweep.storage) / sweep.name / INPUTS_FILE).unlink()
    assert resolved_inputs(sweep) is None  # a sweep from before resolved inputs: its trials read the folder


def test_every_process_of_a_trial_keeps_the_runners_checkpoints_in_one_place(sweep, monkeypatch):
    use_sweep_checkpoints(sweep)
    assert checkpoint_root() == checkpoint_root(sweep.tracking_uri)
    monkeypatch.setenv("SKINCLR_CHECKPOINTS", "")
    server = TrialSetup(**{**sweep.__dict__, "tracking_uri": "http://tracking:5000"})
    use_sweep_checkpoints(server)  # a cluster: the sweep's folder, which every node reads
    assert checkpoint_root() == Path(sweep.storage) / sweep.name / "runner-checkpoints"


def test_a_trial_is_named_by_its_stage_method_or_init_and_number():
    @dataclass
    class Trial:  # what Tune hands a trial_name_creator
        experiment_tag: str
        trial_id: str = "5a1b2_00003"

    # Optuna's search counts from 1, random and grid from 0; the name counts from 0 like Optuna's study
    assert trial_name(Trial("4_simclr.temperature=0.2"), first=1) == "trial 3"
    assert trial_name(Trial("3_simclr.temperature=0.2")) == "trial 3"
    assert trial_name(Trial("")) == "5a1b2_00003"
    pretrain = load_config(None, {"pretrain.method": "byol"}, stage="pretrain")
    assert trial_run_name(pretrain, {"byol.momentum": 0.99}, "trial 3", "x") == "pretrain byol trial 3"
    finetune = load_config(None, {"finetune.init": "runs:/0123456789abcdef", "train.seed": 2}, stage="finetune")
    assert trial_run_name(finetune, {"train.lr": 0.1}, "trial 0", "x") == "finetune from 01234567 trial 0"
    assert trial_run_name(finetune, {"train.seed": 2}, "trial 5", "x") == "finetune from 01234567 seed 2 trial 5"
    finetune.finetune.init, finetune.finetune.linear_probe = "imagenet", True
    assert trial_run_name(finetune, {}, "trial 1", "x") == "finetune probe imagenet trial 1"
    # a sweep begun before trials were numbered: Tune's own name, so the trial id
    assert trial_run_name(pretrain, {}, "run_trial_5a1b2_00003", "5a1b2_00003") == "pretrain byol trial 5a1b2_00003"


def test_epoch_metrics_carry_the_epoch_the_stop_and_the_run():
    class Record:
        epoch, stop, metrics = 4, True, {"train_loss": 1, "knn_balanced_accuracy": 0.5, "note": "x"}

    assert epoch_metrics(Record(), "r1") == {"train_loss": 1.0, "knn_balanced_accuracy": 0.5, "epoch": 4,
                                             "early_stop": 1, "mlflow_run_id": "r1"}


@pytest.mark.slow
def test_trials_of_a_real_sweep_never_read_the_dataset_folder(synth_dir, tmp_path, monkeypatch):
    """The ground truth goes the moment the driver has written its resolved inputs: trials that
    scanned the folder would fail; they open the driver's file and finish."""
    import yaml

    from skinclr.tune.sweep import main

    data = tmp_path / "isic"
    shutil.copytree(synth_dir, data)
    real_save = skinclr.data.inputs.save_inputs

    def save_then_remove_the_labels(inputs, folder):
        split_file = real_save(inputs, folder)
        (data / "ISIC2018_Task3_Training_GroundTruth.csv").unlink()
        return split_file

    monkeypatch.setattr(skinclr.data.inputs, "save_inputs", save_then_remove_the_labels)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "pretrain", "data": {"root": str(data), "image_size": 32, "workers": 0},
        "train": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 2},
        "monitor": {"every": 1, "max_bank": 48, "k": 5}, "tracking": {"experiment": "no-rescan"},
        "sweep": {"stage": "pretrain", "num_samples": 2, "max_concurrent": 2, "search": "random",
                  "cpus_per_trial": 1, "storage": str(tmp_path / "ray"), "name": "no-rescan"}}))
    assert main(config, []) == 0
    assert not (data / "ISIC2018_Task3_Training_GroundTruth.csv").exists()
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name("no-rescan").experiment_id])
    trials = [r for r in runs if "skinclr.trial_id" in r.data.tags]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
