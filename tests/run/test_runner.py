"""The runner as a unit: where a run stands (its MLflow run id and the checkpoint written after
every epoch), how it ends, resumes and refuses a second process, what a data-parallel follower
leaves alone. Loops here are stand-ins that yield
records; the real loops are driven end to end in test_pretrain.py and test_finetune.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from skinclr.track import store, tracking
from skinclr.config import load_config
from skinclr.train.engine import EpochRecord
from skinclr.data.inputs import resolve_inputs
from skinclr.data.split import side_fingerprint
from skinclr.names import EPOCHS_RUN_TAG, RUN_KEY_TAG, STAGE_TAG
from skinclr.run.runner import CHECKPOINT, SilentLogger, drive, follow_run, open_run, resume_state
from skinclr.runtime import BusyError, lock
from skinclr.runtime import load_checkpoint
from skinclr.track.tracking import RunLogger
from skinclr.cli.main import main
from skinclr.track.store import checkpoint_root

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper"


def config(root, **values):
    return load_config(None, {"data.root": str(root), "data.image_size": 16, "data.workers": 0, "train.epochs": 3,
                              "tracking.experiment": "runner", **values}, stage="pretrain")


@pytest.fixture
def setup(synth_dir):
    cfg = config(synth_dir)
    return cfg, resolve_inputs(cfg, progress=False)


def loop(start: int = 1, end: int = 3, fail_after: int | None = None, error: BaseException | None = None):
    """A stand-in training loop: epochs start..end, each with a small state; `error` after `fail_after`."""
    for epoch in range(start, end + 1):
        yield EpochRecord(epoch, {"train_loss": 1.0 / epoch},
                          lambda epoch=epoch: {"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}},
                          is_best=epoch == 1)
        if epoch == fail_after:
            raise error


def steps(run_id: str) -> list[int]:
    return [m.step for m in tracking.client().get_metric_history(run_id, "train_loss")]


def status(run_id: str) -> str:
    return tracking.client().get_run(run_id).info.status


def test_each_epoch_is_checkpointed_before_it_is_reported_and_a_finished_run_drops_its_state(setup):
    cfg, inputs = setup
    run = open_run(cfg, inputs, None, None, {"origin": "test"})
    seen = []

    def on_epoch(record, run_id):  # what a Tune report points at is already on disk
        seen.append((run_id, load_checkpoint(checkpoint_root() / run_id / CHECKPOINT)["epoch"]))

    result = drive(cfg, loop(), run, on_epoch, None, progress=False)
    run_id = run.logger.run_id
    assert seen == [(run_id, 1), (run_id, 2), (run_id, 3)]
    assert (result.run_id, result.status, result.epochs) == (run_id, "FINISHED", 3)
    finished = tracking.client().get_run(run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags[EPOCHS_RUN_TAG] == "3"
    assert finished.data.tags["origin"] == "test" and finished.data.tags[STAGE_TAG] == "pretrain"
    assert steps(run_id) == [1, 2, 3]
    assert not (checkpoint_root() / run_id).exists()


@pytest.mark.parametrize("error, ends", [(KeyboardInterrupt(), "KILLED"), (RuntimeError("boom"), "FAILED"),
                                         (store.StoreError("store gone"), "RUNNING")])
def test_an_interrupted_run_resumes_in_the_same_run_from_its_checkpoint(setup, error, ends):
    cfg, inputs = setup
    first = open_run(cfg, inputs, None, None, None)
    with pytest.raises(type(error)):
        drive(cfg, loop(fail_after=2, error=error), first, None, None, progress=False)
    run_id = first.logger.run_id
    assert status(run_id) == ends  # a store that went away leaves it running, to resume later
    assert resume_state(run_id)["epoch"] == 2

    again = open_run(cfg, inputs, None, None, None)  # the same command again: found by its config's key
    assert again.logger.run_id == run_id and again.state["epoch"] == 2
    drive(cfg, loop(start=3), again, None, None, progress=False)
    assert status(run_id) == "FINISHED" and steps(run_id) == [1, 2, 3]
    assert resume_state(run_id) is None


def test_a_second_process_on_the_same_run_is_refused_naming_the_run(setup):
    cfg, inputs = setup
    first = open_run(cfg, inputs, None, None, None)
    with pytest.raises(KeyboardInterrupt):
        drive(cfg, loop(fail_after=1, error=KeyboardInterrupt()), first, None, None, progress=False)
    run_id = first.logger.run_id
    with lock(checkpoint_root() / run_id / "run.lock"):  # held as another process holds it
        with pytest.raises(BusyError, match=f"run {run_id}.*tracking.resume=false"):
            open_run(cfg, inputs, None, None, None)
    cfg.tracking.resume = False  # a separate run is what that asks for
    assert open_run(cfg, inputs, None, None, None).logger.run_id != run_id


def test_a_run_logged_before_a_key_was_renamed_or_added_is_still_the_one_resumed(setup):
    from skinclr.config import ADDED

    cfg, inputs = setup
    before = {{"finetune.select_metric": "finetune.monitor", "finetune.select_smoothing": "finetune.monitor_smoothing"}
              .get(k, k): v for k, v in cfg.flat().items() if k not in ADDED}  # as its config was then
    killed = RunLogger.create(cfg.experiment, tags={RUN_KEY_TAG: tracking.run_key(before), STAGE_TAG: cfg.stage})
    killed.end("KILLED")
    assert open_run(cfg, inputs, None, None, None).logger.run_id == killed.run_id


def test_a_data_parallel_follower_resumes_from_the_leaders_checkpoint_and_records_nothing(setup, monkeypatch):
    cfg, inputs = setup
    leader = open_run(cfg, inputs, None, None, None)
    with pytest.raises(KeyboardInterrupt):
        drive(cfg, loop(fail_after=1, error=KeyboardInterrupt()), leader, None, None, progress=False)
    run_id = leader.logger.run_id
    ckpt = checkpoint_root() / run_id / CHECKPOINT
    written = ckpt.stat().st_mtime_ns

    follower = follow_run(run_id)
    assert isinstance(follower.logger, SilentLogger) and not follower.leader
    assert follower.state["epoch"] == 1 and torch.equal(follower.state["model"]["w"], torch.full((2,), 1.0))

    def no_store():
        raise AssertionError("a follower opened the tracking store")

    reported = []
    with monkeypatch.context() as mp:
        mp.setattr(tracking, "client", no_store)
        result = drive(cfg, loop(start=2), follower, lambda record, rid: reported.append((record.epoch, rid)), None,
                       progress=False)
    assert reported == [(2, run_id), (3, run_id)] and result.epochs == 3  # it reports, as Ray Train needs
    assert ckpt.stat().st_mtime_ns == written  # the leader's file, untouched and not deleted
    assert steps(run_id) == [1] and status(run_id) == "KILLED"
    assert follow_run(None).state is None  # a fresh trial: nothing to resume


def test_checkpoints_live_beside_a_local_store_unless_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv("SKINCLR_CHECKPOINTS", raising=False)
    assert checkpoint_root(f"sqlite:///{tmp_path}/db/mlflow.db") == tmp_path / "db" / "checkpoints"
    assert checkpoint_root() == tmp_path / "checkpoints"  # this process's store (the test's)
    assert checkpoint_root("http://tracking:5000") == checkpoint_root("postgresql://db/mlflow")
    monkeypatch.setenv("SKINCLR_CHECKPOINTS", str(tmp_path / "elsewhere"))
    assert checkpoint_root(f"sqlite:///{tmp_path}/db/mlflow.db") == tmp_path / "elsewhere"


def test_imagenet_init_without_weights_says_where_to_put_them(synth_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    argv = ["finetune", "--config", str(PAPER / "baseline_imagenet.yaml"),
            "--set", f"data.root={synth_dir}", "--set", "data.image_size=32", "--set", "data.workers=0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "resnet18" in err and str(tmp_path / "torch-home") in err
    # It fails before any run is opened: no FAILED run is left behind to clutter the UI.
    assert tracking.client().search_runs([tracking.ensure_experiment("skinclr-finetune")]) == []



def slow_loop(seconds: float):
    for epoch in (1, 2):
        time.sleep(seconds)
        yield EpochRecord(epoch, {"train_loss": 1.0 / epoch}, lambda epoch=epoch: {"epoch": epoch}, is_best=epoch == 1)


def test_a_run_names_the_sides_it_read_as_mlflow_datasets(setup):
    """The runs table's Dataset column: the train and val sides, by folder and fingerprint."""
    cfg, inputs = setup
    run = open_run(cfg, inputs, None, None, None)
    drive(cfg, loop(), run, None, None, progress=False)
    logged = tracking.client().get_run(run.logger.run_id).inputs.dataset_inputs
    sides = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in logged}
    assert set(sides) == {"training", "validation"}
    split = inputs.split
    for context, part in (("training", "train"), ("validation", "val")):
        dataset = sides[context]
        assert dataset.name == f"{inputs.manifest.root.name} {part}"
        assert dataset.digest == side_fingerprint(split, part) != ""
        assert json.loads(dataset.source) == {"uri": str(inputs.manifest.root)}
        assert json.loads(dataset.profile)["images"] == int((split["split"] == part).sum())
    assert sides["training"].digest != sides["validation"].digest


@pytest.mark.parametrize("enabled", [True, False])
def test_system_metrics_are_sampled_while_a_run_trains_unless_switched_off(setup, monkeypatch, enabled):
    cfg, inputs = setup
    cfg.tracking.system_metrics = enabled
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's own knob (10 s by default)
    run = open_run(cfg, inputs, None, None, None)
    drive(cfg, slow_loop(1.0), run, None, None, progress=False)
    logged = tracking.client().get_run(run.logger.run_id).data.metrics
    system = {k for k in logged if k.startswith("system/")}
    if enabled:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
        assert len(tracking.client().get_metric_history(run.logger.run_id, "system/cpu_utilization_percentage")) >= 2
    else:
        assert not system
    assert status(run.logger.run_id) == "FINISHED"
