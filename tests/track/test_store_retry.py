"""A run's writes outlast an outage of the store: retried within a budget, one line per outage,
every point once."""
import os
import subprocess
import sys
import threading
import time

import pytest
from mlflow.entities import Metric

from skinclr.track import store
from skinclr.track.tracking import RunLogger
from tests.track.test_server import REPO, START_TIMEOUT_S, free_port, stop, wait_http


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
    monkeypatch.setenv(store.RETRY_ENV, "2")
    with pytest.raises(store.StoreError, match="unreachable for 2 s while logging step 3"):
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
            return subprocess.Popen([sys.executable, "-m", "skinclr.cli.main", "server", "--port", str(port)], cwd=REPO,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    server = start()
    wait_http(f"{url}/health", server, START_TIMEOUT_S, log)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv(store.RETRY_ENV, str(START_TIMEOUT_S))
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


def test_two_runs_logging_one_new_dataset_at_once_both_log_it(monkeypatch, capsys):
    """A sweep's first trials start together and log the same dataset: the store looks for it,
    finds none, and both insert it; the slower insert fails on the table's unique key. Here the
    other trial's insert lands exactly between this one's look-up and insert: the call is made
    again, finds the row, and the run links it, with no outage line."""
    import sqlalchemy.event
    from sqlalchemy.orm import Session

    side = {"name": "train", "digest": "d1", "source": "/data", "context": "train", "profile": {"images": 3}}
    first, second = RunLogger.create("race"), RunLogger.create("race")
    raced = []

    def other_trial_first(session, context, instances):
        if not raced and any(type(o).__name__ == "SqlDataset" for o in session.new):
            raced.append(1)
            second.log_datasets([side])

    sqlalchemy.event.listen(Session, "before_flush", other_trial_first)
    try:
        first.log_datasets([side])
    finally:
        sqlalchemy.event.remove(Session, "before_flush", other_trial_first)
    assert raced
    for logger in (first, second):
        inputs = logger.client.get_run(logger.run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("train", "d1")]
    assert "unreachable" not in capsys.readouterr().err


def test_a_lasting_unique_key_conflict_is_an_error_not_an_outage(capsys):
    calls = []

    def conflict():
        calls.append(1)
        raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")

    with pytest.raises(RuntimeError, match="UNIQUE constraint failed"):
        store.retrying("logging the datasets", conflict)
    assert len(calls) == 3 and "unreachable" not in capsys.readouterr().err
