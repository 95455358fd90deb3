"""The tracking store: where it is by default, and a store that cannot work named with its fix
within seconds."""
import socket

import pytest

from skinclr.track import store, tracking
from tests.track.test_server import free_port


def test_store_and_artifacts_live_together(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    exp = tracking.ensure_experiment("where")
    assert tracking.ensure_experiment("where") == exp  # idempotent
    location = tracking.client().get_experiment(exp).artifact_location
    assert location == (tmp_path / "mlruns" / "artifacts" / "where").as_uri()


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
        with pytest.raises(store.StoreError) as err:
            store.check_store()
        text = str(err.value)
        assert why in text and "\n" not in text, text
        assert "hunter2" not in text  # a password never reaches the terminal
    fresh = tmp_path / "new" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{fresh}")
    assert store.check_store() == f"sqlite:///{fresh}"  # a store yet to be created is fine


def test_a_store_that_hangs_is_given_up_on(monkeypatch):
    """A server that accepts the connection but never answers costs seconds, not MLflow's minutes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(store, "CHECK_TIMEOUT_S", 2.0)
        with pytest.raises(store.StoreError, match="no answer within 2 s|nothing answers there"):
            store.check_store()
