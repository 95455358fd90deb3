"""The Ray Tune sweep layer, end to end: real Ray, real MLflow (SQLite), synthetic images at 32 px.

What a user relies on: one MLflow parent run per sweep with one child run per trial, no run
left RUNNING, ASHA's early stops recorded, the trials table and figure on the parent, one
image decode for the whole sweep, and `--resume` continuing a sweep whose driver was killed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from skinclr.config import Config, ConfigError
from skinclr.data.cache import SPLITS
from skinclr.tune.spaces import check_keys, distribution, load_space, narrow, pretrain_space
from skinclr import names
from skinclr.names import SWEEP_STATE_FILE
from skinclr.tune.sweep import main
from skinclr.tune.plan import load_sweep_config, search_space

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"FINISHED", "FAILED"}


def sweep_yaml(path: Path, data: Path, storage: Path, name: str, samples: int, epochs: int, **sweep) -> Path:
    """A tiny pretrain sweep: 2 steps of 16 images per epoch, a 48-image kNN bank."""
    cfg = {
        "stage": "pretrain",
        "data": {"root": str(data), "image_size": 32, "workers": 0},
        "train": {"epochs": epochs, "batch_size": 16, "max_steps_per_epoch": 2, "seed": 0},
        "monitor": {"every": 1, "max_bank": 48, "k": 5},
        "tracking": {"experiment": f"sweep-{name}"},
        "sweep": {"stage": "pretrain", "num_samples": samples, "max_concurrent": 2, "search": "random",
                  "grace_period": 1, "reduction_factor": 2, "cpus_per_trial": 1, "storage": str(storage),
                  "name": name, **sweep},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def runs_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("skinclr.sweep") == "1"]
    children = [r for r in runs if "skinclr.trial_id" in r.data.tags]
    return parents, children


def knn_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "knn_balanced_accuracy"))


@pytest.fixture(scope="module")
def asha_sweep(synth_dir, tmp_path_factory):
    """Six trials of four epochs, two at a time, ASHA from epoch 1, run once for the module."""
    tmp = tmp_path_factory.mktemp("asha")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = sweep_yaml(tmp / "sweep.yaml", synth_dir, tmp / "ray", "asha", samples=6, epochs=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("SKINCLR_CACHE", str(tmp / "cache"))
        code = main(config, [])
    return {"code": code, "client": MlflowClient(uri), "cache": tmp / "cache", "folder": tmp / "ray" / "asha",
            "config": config}


@pytest.mark.slow  # starts Ray
def test_sweep_logs_one_parent_and_one_closed_child_per_trial(asha_sweep):
    client = asha_sweep["client"]
    assert asha_sweep["code"] == 0
    parents, children = runs_of(client, "sweep-asha")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["skinclr.stage"] == "pretrain"
    assert len(children) == 6
    # Each run says what it is, and carries the command that reproduces it: the sweep's.
    assert sorted(c.info.run_name for c in children) == [f"pretrain simclr trial {i}" for i in range(6)]
    command = f"skinclr sweep --config {asha_sweep['config']}"
    assert {r.data.tags.get(names.COMMAND_TAG) for r in [parent, *children]} == {command}
    assert len({c.data.tags["skinclr.trial_id"] for c in children}) == 6
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["skinclr.sweep_run_id"] == parent.info.run_id
        assert child.data.tags["skinclr.trial_resources"] == "1 x (1 CPU)"
        assert child.info.status in TERMINAL, (child.info.run_id, child.info.status)
        for key in ("simclr.temperature", "augment.crop_min", "augment.color_strength", "train.lr"):
            assert float(child.data.tags[f"skinclr.sampled.{key}"]) == pytest.approx(float(child.data.params[key]))
    # Every trial's sampled values differ: the space was sampled, not the base config repeated.
    assert len({c.data.params["simclr.temperature"] for c in children}) == 6
    # The parent shows what its trials drew from, never the base config's value of a swept key.
    space = pretrain_space(["simclr"])
    for key in ("simclr.temperature", "augment.crop_min", "augment.color_strength", "train.lr"):
        assert parent.data.params[key] == distribution(space[key])
    assert parent.data.params["train.epochs"] == "4" and parent.data.params["monitor.k"] == "5"


@pytest.mark.slow  # starts Ray
def test_asha_stopped_trials_are_finished_and_tagged_with_their_epoch(asha_sweep):
    client = asha_sweep["client"]
    _, children = runs_of(client, "sweep-asha")
    stopped = [c for c in children if c.data.tags.get("skinclr.stopped_by") == "asha"]
    assert stopped, "ASHA (grace 1, reduction 2) stopped no trial out of six"
    for child in stopped:
        epoch = int(child.data.tags["skinclr.stopped_at_epoch"])
        assert child.info.status == "FINISHED"
        assert 1 <= epoch < 4
        assert knn_steps(client, child.info.run_id) == list(range(1, epoch + 1))
    for child in children:
        if child.data.tags.get("skinclr.stopped_by") == "":
            assert knn_steps(client, child.info.run_id) == [1, 2, 3, 4]


@pytest.mark.slow  # starts Ray
def test_parent_holds_trials_table_figure_and_best_trial(asha_sweep, tmp_path):
    client = asha_sweep["client"]
    (parent,), children = runs_of(client, "sweep-asha")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/parallel_coordinates.png", "sweep/sweep_config.yaml",
            "sweep/search_space.yaml"} <= artifacts
    charts = {a.path for a in client.list_artifacts(parent.info.run_id, names.SWEEP_CHARTS)}
    assert charts == {f"{names.SWEEP_CHARTS}/{name}" for name in names.SWEEP_CHART_FILES}  # Optuna's, as HTML
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "sweep/trials.csv", str(tmp_path)),
                        keep_default_na=False)
    by_run = {c.info.run_id: c for c in children}
    assert set(table["run_id"]) == set(by_run)
    for row in table.itertuples():
        child = by_run[row.run_id]
        assert row.trial_id == child.data.tags["skinclr.trial_id"]
        assert row.status == child.info.status
        assert row.stopped_by == child.data.tags["skinclr.stopped_by"]
        assert row.epochs == len(knn_steps(client, row.run_id))
        history = [m.value for m in client.get_metric_history(row.run_id, "knn_balanced_accuracy")]
        assert row.best_knn_balanced_accuracy == pytest.approx(max(history))
    best = max(children, key=lambda c: max(m.value for m in client.get_metric_history(
        c.info.run_id, "knn_balanced_accuracy")))
    assert parent.data.tags["skinclr.best_run_id"] == best.info.run_id
    assert parent.data.tags["skinclr.best_trial_id"] == best.data.tags["skinclr.trial_id"]
    assert parent.data.metrics["best_knn_balanced_accuracy"] == pytest.approx(
        table["best_knn_balanced_accuracy"].max())


@pytest.mark.slow  # starts Ray
def test_images_are_decoded_once_by_the_driver(asha_sweep):
    client = asha_sweep["client"]
    (parent,), children = runs_of(client, "sweep-asha")
    entries = [p for p in asha_sweep["cache"].iterdir() if p.is_dir() and p.name != SPLITS]
    assert len(entries) == 1, entries  # one image cache, no rebuilt or partial copies
    built = (entries[0] / "meta.json").stat().st_mtime
    assert built * 1000 <= min(c.info.start_time for c in children)
    split = asha_sweep["folder"] / "split.csv"
    assert {c.data.params["data.split_file"] for c in children} == {str(split)}


@pytest.mark.slow  # starts Ray
def test_trials_reuse_the_worker_processes_stopped_ones_included(asha_sweep):
    """Six trials two at a time run in two worker processes: torch, MLflow and the images load
    once per worker, and a trial ASHA stopped frees its worker for the next trial."""
    pid_of = {}
    for folder in asha_sweep["folder"].iterdir():
        if (folder / "result.json").is_file():
            rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
            pid_of[rows[-1]["trial_id"]] = rows[-1]["pid"]
    _, children = runs_of(asha_sweep["client"], "sweep-asha")
    assert any(c.data.tags.get(names.STOPPED_BY_TAG) == "asha" for c in children), "no trial was stopped"
    assert len(pid_of) == 6 and len(set(pid_of.values())) == 2, pid_of


@pytest.mark.slow  # starts Ray
def test_killed_driver_resumes_same_parent_and_children(synth_dir, tmp_path):
    """SIGKILL the driver's process group once a trial has ended and another has checkpointed;
    `--resume` must finish the sweep in the same MLflow runs without rerunning finished work."""
    config = sweep_yaml(tmp_path / "sweep.yaml", synth_dir, tmp_path / "ray", "resume", samples=4, epochs=4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    folder = tmp_path / "ray" / "resume"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "skinclr.cli.main", "sweep", "--config", str(config)], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        finished, running = wait_for_finished_and_checkpointed(client, folder, driver)
    finally:
        kill_group(driver.pid)
        driver.wait()
    assert_group_gone(driver.pid)
    parent_id = json.loads((folder / SWEEP_STATE_FILE).read_text())["setup"]["parent_run_id"]
    before = {r.info.run_id: (r.info.end_time, knn_steps(client, r.info.run_id)) for r in finished}
    checkpointed = running

    with pytest.raises(ConfigError, match="continue it with --resume"):
        main(config, [])  # the same command without --resume must not start a second sweep there
    resumed = subprocess.run([sys.executable, "-m", "skinclr.cli.main", "sweep", "--config", str(config), "--resume"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    parents, children = runs_of(client, "sweep-resume")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert len({c.data.tags["skinclr.trial_id"] for c in children}) == 4
    assert all(c.info.status in TERMINAL for c in children), [c.info.status for c in children]
    by_trial = {c.data.tags["skinclr.trial_id"]: c for c in children}
    for run_id, (end_time, steps) in before.items():  # finished before the kill: not rerun
        run = client.get_run(run_id)
        assert (run.info.status, run.info.end_time) == ("FINISHED", end_time)
        assert knn_steps(client, run_id) == steps
    for trial_id, epoch in checkpointed.items():  # continued from a checkpoint, in its own run
        steps = knn_steps(client, by_trial[trial_id].info.run_id)
        # Tune's saved state may lag its newest checkpoint by one (it syncs every second one):
        # the epochs before that were never run again, later ones may have been.
        assert [s for s in steps if s < epoch] == list(range(1, epoch)), (trial_id, epoch, steps)
        assert max(steps) == int(by_trial[trial_id].data.tags["skinclr.epochs_run"])
    assert "resuming" in resumed.stdout
    # The resumed driver draws the charts the killed one never reached, of every trial.
    charts = {a.path for a in client.list_artifacts(parent_id, names.SWEEP_CHARTS)}
    assert f"{names.SWEEP_CHARTS}/{names.SWEEP_HISTORY_HTML}" in charts


@pytest.mark.slow  # starts Ray
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signalled_driver_leaves_the_sweep_killed_and_resumable(synth_dir, tmp_path, sig):
    """Ctrl-C or SIGTERM to the driver alone, mid-sweep: it exits with the signal's code and the
    resume hint, the parent and every trial it cut short end KILLED (none FINISHED, none left
    RUNNING), its Ray processes go with it, and --resume runs the sweep to its end."""
    name = f"signal-{sig.name.lower()}"
    config = sweep_yaml(tmp_path / "sweep.yaml", synth_dir, tmp_path / "ray", name, samples=4, epochs=4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    cmd = [sys.executable, "-m", "skinclr.cli.main", "sweep", "--config", str(config)]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        _, running = wait_for_finished_and_checkpointed(client, tmp_path / "ray" / name, driver, experiment=name)
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=180)
    finally:
        kill_group(driver.pid)
    assert driver.returncode == 128 + int(sig), out[-2000:] + err[-2000:]
    assert "continue the sweep with the same command and --resume" in err
    assert_group_gone(driver.pid)
    parents, children = runs_of(client, f"sweep-{name}")
    assert [p.info.status for p in parents] == ["KILLED"]
    by_trial = {c.data.tags["skinclr.trial_id"]: c for c in children}
    assert all(c.info.status != "RUNNING" for c in children), [c.info.status for c in children]
    assert all(by_trial[t].info.status == "KILLED" for t in running), {t: by_trial[t].info.status for t in running}

    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    parents, children = runs_of(client, f"sweep-{name}")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 4 and all(c.info.status in TERMINAL for c in children)


def wait_for_finished_and_checkpointed(client, folder: Path, driver, timeout: float = 300,
                                     experiment: str = "resume"):
    """Poll the store and the Ray folder until one trial's run has ended and another trial has
    Tune checkpoints of 2 epochs or more while its run is still going; returns (ended runs,
    {trial id: epochs in its newest checkpoint})."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        exp = client.get_experiment_by_name(f"sweep-{experiment}")
        if exp is not None:
            runs = [r for r in client.search_runs([exp.experiment_id]) if "skinclr.trial_id" in r.data.tags]
            finished = [r for r in runs if r.info.status == "FINISHED"]
            running = {}
            for r in runs:
                trial_id = r.data.tags["skinclr.trial_id"]
                # a checkpoint folder counts once Tune has finished copying trial.json into it
                saved = sorted(p.parent for p in (folder / trial_id).glob("checkpoint_*/trial.json"))
                if r.info.status == "RUNNING" and len(saved) == 2:
                    running[trial_id] = json.loads((saved[-1] / "trial.json").read_text())["epoch"]
            if finished and running:
                return finished, running
        time.sleep(0.2)
    raise AssertionError("no moment with one trial ended and another checkpointed")


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_group_gone(pgid: int, timeout: float = 30) -> None:
    """The killed driver's Ray processes (GCS, raylet, workers) must not outlive it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    kill_group(pgid)
    raise AssertionError(f"processes of the killed sweep (group {pgid}) were still alive after {timeout} s")


def rank_scratch_stores() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("skinclr-rank*"))


@pytest.mark.slow  # starts Ray
def test_pipeline_fine_tunes_best_data_parallel_pretrain_trial_under_one_run(synth_dir, tmp_path):
    """Pretrain sweep (one trial of two gloo workers through Ray Train) -> fine-tune sweep from
    its best trial -> evaluation of the best fine-tuned model: every run nested under one."""
    from skinclr.data.synth import make_synthetic

    heldout = make_synthetic(tmp_path / "heldout", n=35, seed=3)
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(yaml.safe_dump({
        "stage": "finetune", "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 2},
        "sweep": {"stage": "finetune", "num_samples": 2, "max_concurrent": 2, "search": "optuna",
                  "grace_period": 2, "cpus_per_trial": 1}}))
    config = sweep_yaml(tmp_path / "pipeline.yaml", synth_dir, tmp_path / "ray", "pipeline", samples=1, epochs=2,
                        stage="pipeline", finetune_config=str(finetune), eval_data=str(heldout),
                        workers_per_trial=2, cpus_per_trial=0.5, max_concurrent=1)
    before = rank_scratch_stores()
    assert main(config, []) == 0
    # Rank 1 trained against a private store; it is gone with its hundreds of MB of checkpoints.
    assert rank_scratch_stores() - before == set()

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("sweep-pipeline").experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    (top,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert top.data.tags["skinclr.pipeline"] == "1"
    assert top.data.params["simclr.temperature"] == "loguniform(0.05, 1.0)"  # the pretrain sweep's space
    under = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == top.info.run_id}
    sweeps = {r.data.tags["skinclr.stage"]: r for r in under.values() if r.data.tags.get("skinclr.sweep") == "1"}
    assert set(sweeps) == {"pretrain", "finetune"}
    trials = {stage: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
              for stage, sweep in sweeps.items()}
    # Two training processes, one MLflow run: only rank 0 logs to the sweep's store.
    (pretrain,) = trials["pretrain"]
    assert knn_steps(client, pretrain.info.run_id) == [1, 2]
    assert len(trials["finetune"]) == 2
    for run in trials["finetune"]:
        assert run.data.params["finetune.init"] == f"runs:/{pretrain.info.run_id}"
        assert run.data.tags["split_fingerprint"] == pretrain.data.tags["split_fingerprint"]
    (evaluation,) = [r for r in under.values() if r.data.tags.get("skinclr.stage") == "evaluate"]
    assert evaluation.data.tags["skinclr.model_uri"] == f"runs:/{top.data.tags['skinclr.best_finetune_run_id']}/model"
    assert top.data.metrics["test_balanced_accuracy"] == pytest.approx(
        evaluation.data.metrics["test_balanced_accuracy"])
    assert len(runs) == 1 + 2 + 1 + 2 + 1  # top, two sweeps, their trials, the evaluation
    # Every run is named by what it is (none by MLflow's random names) and carries the pipeline's command.
    start = pretrain.info.run_id[:8]
    assert sorted(r.info.run_name for r in runs) == sorted([
        "pipeline-pipeline", "sweep-pipeline-pretrain", "sweep-pipeline-finetune", "pretrain simclr trial 0",
        f"finetune from {start} trial 0", f"finetune from {start} trial 1", "evaluate heldout"])
    assert {r.data.tags.get(names.COMMAND_TAG) for r in runs} == {f"skinclr sweep --config {config}"}
    # The Optuna fine-tune sweep keeps its sampler's study in its folder and draws it.
    assert (tmp_path / "ray" / "pipeline-finetune" / names.SWEEP_STUDY_FILE).is_file()
    charts = {a.path for a in client.list_artifacts(sweeps["finetune"].info.run_id, names.SWEEP_CHARTS)}
    assert f"{names.SWEEP_CHARTS}/{names.SWEEP_HISTORY_HTML}" in charts


def test_space_narrowing_fixes_and_tightens_within_the_space():
    space = pretrain_space(["simclr"])
    out = narrow(space, {"simclr.temperature": {"low": 0.1, "high": 0.3}, "augment.crop_min": 0.2,
                         "train.lr": [1.0e-4, 1.0e-3]})
    assert out["simclr.temperature"] == {"type": "loguniform", "low": 0.1, "high": 0.3}
    assert out["augment.crop_min"] == 0.2
    assert out["train.lr"] == {"type": "choice", "values": [1.0e-4, 1.0e-3]}
    assert out["augment.color_strength"] == space["augment.color_strength"]
    with pytest.raises(ConfigError, match="simclr.temperature.*leaves the space's range"):
        narrow(space, {"simclr.temperature": {"low": 0.01}})
    with pytest.raises(ConfigError, match="train.lr.*not allowed"):
        narrow(space, {"train.lr": 0.5})
    with pytest.raises(ConfigError, match="model.backbone.*not a key of the search space"):
        narrow(space, {"model.backbone": "resnet50"})


def test_space_with_unknown_keys_names_every_culprit(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("simclr.temprature: {type: uniform, low: 0.1, high: 0.5}\n"
                   "train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
                   "optim.momentum: {type: uniform, low: 0.8, high: 0.99}\n")
    with pytest.raises(ConfigError) as err:
        check_keys(load_space(bad), Config())
    message = str(err.value)
    assert "simclr.temprature" in message and "did you mean 'simclr.temperature'" in message
    assert "optim.momentum" in message
    assert "train.lr" not in message


def test_a_method_other_than_simclr_searches_its_own_space():
    cfg, _ = load_sweep_config(REPO / "experiments" / "sweeps" / "pretrain_asha.yaml", ["pretrain.method=byol"])
    drawn_from, space = search_space(cfg)
    assert "byol.momentum" in drawn_from and "byol.momentum" in space and "simclr.temperature" not in drawn_from
    cfg, _ = load_sweep_config(REPO / "experiments" / "sweeps" / "pretrain_asha.yaml", [])
    assert list(search_space(cfg)[0]) == ["simclr.temperature", "augment.crop_min", "augment.color_strength", "train.lr"]


def test_shipped_sweep_configs_resolve(tmp_path):
    for name, stage in (("pretrain_asha", "pretrain"), ("finetune_asha", "finetune"), ("pipeline", "pretrain")):
        cfg, extra = load_sweep_config(REPO / "experiments" / "sweeps" / f"{name}.yaml", [])
        assert cfg.stage == stage
        drawn_from, space = search_space(cfg)
        assert set(space) <= set(drawn_from)
        check_keys(space, cfg)
    assert extra["finetune_config"] == "experiments/sweeps/finetune_asha.yaml"
    for name in ("sweeps/recipe_finetune", "sweeps/recipe_pretrain", "studies/label_efficiency", "studies/methods",
                 "studies/paper"):
        cfg, _ = load_sweep_config(REPO / "experiments" / f"{name}.yaml", [])
        search_space(cfg)


def test_the_sweep_command_of_a_python_call_is_the_one_a_user_would_type():
    from skinclr.tune.sweep import command_line

    assert command_line("s.yaml", ["data.root=/d m", "train.epochs=2"], resume=True) == \
        "skinclr sweep --config s.yaml --set 'data.root=/d m' --set train.epochs=2 --resume"
    assert command_line(None) == "skinclr sweep"
