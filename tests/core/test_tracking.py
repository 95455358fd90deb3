"""MLflow plumbing: store location and its check, experiments, batched logging that outlasts an outage,
finding runs to resume or start from."""
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric

from core import tracking
from core.tracking import RunLogger
from core import names
from tests.core.test_server import REPO, START_TIMEOUT_S, free_port, stop, wait_http


def test_store_and_artifacts_live_together(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    exp = tracking.ensure_experiment("where")
    assert tracking.ensure_experiment("where") == exp  # idempotent
    location = tracking.client().get_experiment(exp).artifact_location
    assert location == (tmp_path / "mlruns" / "artifacts" / "where").as_uri()


def test_metrics_are_batched_per_step(tmp_path):
    logger = RunLogger.create("batched", run_name="r")
    logger.log_metrics({"a": 1.0, "b": 2.0, "skipped": None}, step=1)
    logger.log_metrics({"a": 0.5, "b": 1.5}, step=2)
    logger.log_params({"x": 1})
    logger.log_params({"x": 1, "y": "z"})  # re-logging a resumed run's params is harmless
    logger.end()
    run = logger.run
    assert run.data.metrics == {"a": 0.5, "b": 1.5} and run.data.params == {"x": "1", "y": "z"}
    assert [m.step for m in logger.client.get_metric_history(logger.run_id, "a")] == [1, 2]
    assert run.info.status == "FINISHED"


def test_find_run_by_id_or_name_and_resumable():
    first = RunLogger.create("find", run_name="simclr-demo", tags={names.STAGE_TAG: "pretrain",
                                                                   names.RUN_KEY_TAG: "k1"})
    first.end()
    second = RunLogger.create("find", run_name="simclr-demo", tags={names.STAGE_TAG: "pretrain",
                                                                    names.RUN_KEY_TAG: "k1"})
    assert tracking.find_run(first.run_id) == first.run_id
    assert tracking.find_run("simclr-demo", stage="pretrain") == first.run_id  # the unfinished one is not taken
    second.end()
    assert tracking.find_run("simclr-demo", stage="pretrain") == second.run_id  # newest finished
    assert tracking.find_run("simclr-demo", stage="finetune") is None
    assert tracking.find_run("no-such-run") is None

    killed = RunLogger.create("find", tags={names.RUN_KEY_TAG: "k2"})
    killed.end("KILLED")
    exp = tracking.ensure_experiment("find")
    assert tracking.find_resumable(exp, "k2").info.run_id == killed.run_id
    assert tracking.find_resumable(exp, "k1") is None  # both finished


def test_run_key_ignores_only_naming():
    base = {"train.lr": 0.1, "tracking.run_name": "a", "tracking.resume": True}
    assert tracking.run_key(base) == tracking.run_key({**base, "tracking.run_name": "b", "tracking.resume": False})
    assert tracking.run_key(base) != tracking.run_key({**base, "train.lr": 0.2})


def test_download_of_a_missing_artifact_is_none(tmp_path):
    logger = RunLogger.create("dl")
    (tmp_path / "f.txt").write_text("x")
    logger.log_artifact(tmp_path / "f.txt", "d")
    assert Path(logger.download("d/f.txt", tmp_path / "out")).read_text() == "x"
    assert logger.download("d/missing.txt", tmp_path / "out") is None


# ---------------------------------------------------------------------------------------------
# The store is checked before any work, and a run's writes outlast an outage


def test_a_store_that_cannot_work_is_named_with_its_fix(tmp_path, monkeypatch):
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("not a database")
    (tmp_path / "folder.db").mkdir()
    cases = {str(tmp_path): "folder path", f"file://{tmp_path}": "folder path",
             "sqlite:////proc/skinclr/x.db": "cannot write in /proc/skinclr",
             f"sqlite:///{tmp_path / 'folder.db'}": "name the database file inside it",
             f"sqlite:///{not_a_db}": "not a usable SQLite database",
             f"http://127.0.0.1:{free_port()}": "nothing answers there",
             f"postgresql://me:hunter2@127.0.0.1:{free_port()}/db": "cannot connect to the database"}
    for uri, why in cases.items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(tracking.StoreError) as err:
            tracking.check_store()
        text = str(err.value)
        assert why in text and "\n" not in text, text
        assert "hunter2" not in text  # a password never reaches the terminal
    fresh = tmp_path / "new" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{fresh}")
    assert tracking.check_store() == f"sqlite:///{fresh}"  # a store yet to be created is fine


def test_a_store_that_hangs_is_given_up_on(monkeypatch):
    """A server that accepts the connection but never answers costs seconds, not MLflow's minutes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(tracking, "CHECK_TIMEOUT_S", 2.0)
        with pytest.raises(tracking.StoreError, match="no answer within 2 s|nothing answers there"):
            tracking.check_store()


def test_a_repeated_batch_adds_no_point_and_a_reopened_run_skips_logged_steps():
    """What makes a retried write safe: the store drops a point it already holds (same key, step,
    timestamp and value), and a resumed run does not log an epoch it logged before its kill."""
    logger = RunLogger.create("dedup")
    batch = [Metric("loss", 0.5, 1_000, 1)]
    logger.client.log_batch(logger.run_id, metrics=batch)
    logger.client.log_batch(logger.run_id, metrics=batch)  # the retry of a batch whose answer was lost
    logger.log_metrics({"loss": 0.4}, step=2)
    logger.end("KILLED")

    again = RunLogger(logger.run_id)
    again.reopen()
    again.log_metrics({"loss": 0.41}, step=2)  # the epoch trained again from an older checkpoint
    again.log_metrics({"loss": 0.3}, step=3)
    again.end()
    history = logger.client.get_metric_history(logger.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert again.run.info.status == "FINISHED"


def test_writes_to_a_vanished_store_give_up_after_the_budget(monkeypatch, capsys):
    run = RunLogger.create("budget").run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(tracking.RETRY_ENV, "2")
    with pytest.raises(tracking.StoreError, match="unreachable for 2 s while logging step 3"):
        RunLogger(run).log_metrics({"loss": 1.0}, step=3)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unreachable" in line]
    assert len(warnings) == 1 and "retrying for up to 2 s" in warnings[0]


@pytest.mark.slow
def test_a_run_outlives_a_server_restart_with_one_line_and_every_point_once(tmp_path, monkeypatch, capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_WORKERS": "1"}  # the server keeps serving this test's SQLite store

    def start() -> subprocess.Popen:
        with open(log, "a") as out:
            return subprocess.Popen([sys.executable, "-m", "experiments.cli", "server", "--port", str(port)], cwd=REPO,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    server = start()
    wait_http(f"{url}/health", server, START_TIMEOUT_S, log)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv(tracking.RETRY_ENV, str(START_TIMEOUT_S))
        logger = RunLogger.create("outage", run_name="through a restart")
        logger.log_metrics({"loss": 1.0, "acc": 0.1}, step=1)
        stop(server)
        restarted: list[subprocess.Popen] = []
        thread = threading.Thread(target=lambda: (time.sleep(2), restarted.append(start())))
        thread.start()
        logger.log_metrics({"loss": 0.5, "acc": 0.2}, step=2)  # waits for the new server
        logger.log_metrics({"loss": 0.25, "acc": 0.3}, step=3)
        logger.end()
        thread.join()
        server = restarted[0]
        for key, values in {"loss": [1.0, 0.5, 0.25], "acc": [0.1, 0.2, 0.3]}.items():
            history = logger.client.get_metric_history(logger.run_id, key)
            assert [(m.step, m.value) for m in history] == list(zip([1, 2, 3], values))
        assert logger.run.info.status == "FINISHED"
        outage = [line for line in capsys.readouterr().err.splitlines() if "unreachable" in line]
        assert len(outage) == 1 and url in outage[0] and "logging step 2" in outage[0]
    finally:
        stop(server)


def test_find_run_takes_names_with_quotes():
    run = RunLogger.create("quoted", run_name="it's mine", tags={names.STAGE_TAG: "pretrain"})
    run.end()
    assert tracking.find_run("it's mine", stage="pretrain") == run.run_id
    assert tracking.find_run("it's \"both\"") is None


# ---------------------------------------------------------------------------------------------
# Where a user looks: experiments that say what they hold, links in the model-training view


def test_experiments_say_what_they_hold_and_open_in_the_model_training_view():
    c = tracking.client()
    RunLogger.create("notes-ft", tags={names.STAGE_TAG: "finetune"}).end()
    exp = c.get_experiment_by_name("notes-ft")
    assert exp.tags[names.KIND_TAG] == "custom_model_development"
    note = exp.tags[names.NOTE_TAG]
    assert "skinclr finetune" in note and "skinclr promote --experiment notes-ft" in note

    tracking.ensure_experiment("notes-sweep")  # a sweep's driver makes it before it knows the stage
    assert names.NOTE_TAG not in c.get_experiment_by_name("notes-sweep").tags
    RunLogger.create("notes-sweep", tags={names.STAGE_TAG: "pretrain"}).end()
    assert "skinclr sweep" in c.get_experiment_by_name("notes-sweep").tags[names.NOTE_TAG]

    older = c.create_experiment("notes-older")  # made elsewhere, a note of the user's own
    c.set_experiment_tag(older, names.NOTE_TAG, "my own words")
    RunLogger.create("notes-older", tags={names.STAGE_TAG: "evaluate"}).end()
    tags = c.get_experiment(older).tags
    assert tags[names.NOTE_TAG] == "my own words" and tags[names.KIND_TAG] == "custom_model_development"


def test_links_open_the_ui_in_its_model_training_view(monkeypatch):
    run = RunLogger.create("links")
    exp = run.run.info.experiment_id
    view = "?workflowType=machine_learning"
    assert tracking.run_link(run.run_id) == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run.run_id}{view}"
    assert tracking.experiment_link(exp) == f"http://127.0.0.1:5000/#/experiments/{exp}/runs{view}"
    assert tracking.model_link("skinclr", 3) == f"http://127.0.0.1:5000/#/models/skinclr/versions/3{view}"
    assert tracking.experiments_link() == f"http://127.0.0.1:5000/#/experiments{view}"
    assert "skinclr server" in tracking.browse_hint()
    monkeypatch.setenv(tracking.UI_ENV, "http://ui.example:8080/")
    assert tracking.experiments_link() == f"http://ui.example:8080/#/experiments{view}"
    monkeypatch.delenv(tracking.UI_ENV)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:secret@mlflow.example")
    assert tracking.ui_base() == "https://mlflow.example" and tracking.browse_hint() == ""


def test_the_server_lists_skinclr_experiments_with_links_to_their_runs():
    RunLogger.create("listed", tags={names.STAGE_TAG: "finetune"}).end()
    tracking.client().create_experiment("made elsewhere")
    exp = tracking.client().get_experiment_by_name("listed").experiment_id
    [line] = tracking.experiment_links("http://host:5000", tracking.tracking_uri())
    assert "listed" in line and line.endswith(f"http://host:5000/#/experiments/{exp}/runs?workflowType=machine_learning")
