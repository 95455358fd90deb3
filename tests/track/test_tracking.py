"""MLflow runs: batched logging, experiments that say what they hold, finding runs to resume or
start from."""
import os
import subprocess
import sys
from pathlib import Path

from skinclr import names
from skinclr.track import tracking
from skinclr.track.tracking import RunLogger

REPO = Path(__file__).resolve().parents[2]


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


def test_find_run_takes_names_with_quotes():
    run = RunLogger.create("quoted", run_name="it's mine", tags={names.STAGE_TAG: "pretrain"})
    run.end()
    assert tracking.find_run("it's mine", stage="pretrain") == run.run_id
    assert tracking.find_run("it's \"both\"") is None


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


def test_an_interrupt_in_a_process_first_search_leaves_later_searches_working(tmp_path):
    """A Ctrl-C landing while MLflow's filter parser builds itself (a process's first search) must
    not break every later search: a sweep's driver interrupted then could not close its trials.
    In a fresh process, the parser's setup is made to raise as an interrupt mid-way would."""
    code = """
import sqlparse.lexer
from skinclr.track import tracking

def interrupted(self):
    self.clear()
    raise KeyboardInterrupt
sqlparse.lexer.Lexer.default_initialization = interrupted

c = tracking.client()
experiment = c.create_experiment("interrupted")
c.create_run(experiment, tags={"skinclr.trial_id": "t1"})
try:
    c.search_runs([experiment], "tags.`skinclr.trial_id` = 't1'")
except KeyboardInterrupt:
    pass
print(len(c.search_runs([experiment], "tags.`skinclr.trial_id` = 't1'")))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"


def test_every_run_ends_one_way():
    """`ending`: FINISHED when the block completes, KILLED on Ctrl-C, FAILED on an error, and
    RUNNING (resumable) when the store itself went away; `finish=False` leaves the end to the block."""
    import pytest

    from skinclr.track.store import StoreError

    def outcome(error: BaseException | None, finish: bool = True) -> str:
        logger = RunLogger.create("ending", run_name="r")
        try:
            with tracking.ending(logger, finish=finish):
                if error is not None:
                    raise error
        except BaseException as err:  # noqa: BLE001 - re-raised untouched, as the test checks
            assert err is error
        return logger.run.info.status

    assert outcome(None) == "FINISHED"
    assert outcome(None, finish=False) == "RUNNING"
    assert outcome(KeyboardInterrupt()) == "KILLED"
    assert outcome(ValueError("bad")) == "FAILED"
    assert outcome(StoreError("gone")) == "RUNNING"
    with pytest.raises(ValueError):
        with tracking.ending(RunLogger.create("ending", run_name="r")):
            raise ValueError("propagates")
