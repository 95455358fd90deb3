"""`skinclr server`: a real MLflow server over a SQLite store, used by clients over HTTP, serving its app's page."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from skinclr.track import server, store, tracking
from skinclr.track.server import serve
from skinclr.track.tracking import RunLogger

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before answering {url}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> int:
    """Signal the server's launcher; kill its whole process group if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


@contextmanager
def running_server(log: Path, workers: int = 1):
    """`python -m skinclr.cli server` over the current MLFLOW_TRACKING_URI store, on a free loopback
    port; yields (url, process)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_WORKERS": str(workers)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "skinclr.cli.main", "server", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, START_TIMEOUT_S, log)
        yield url, proc
    finally:
        stop(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_server_serves_the_local_store_and_proxies_new_artifacts(tmp_path, monkeypatch):
    local_uri = store.tracking_uri()
    local = RunLogger.create("skinclr-local", run_name="made before the server")
    local.log_metrics({"val_balanced_accuracy": 0.5}, step=1)
    local.end()
    log = tmp_path / "server.log"
    with running_server(log) as (url, proc):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        c = tracking.client()
        assert c.get_run(local.run_id).data.metrics["val_balanced_accuracy"] == 0.5

        remote = RunLogger.create("skinclr-remote", run_name="through the server")
        note = tmp_path / "note.txt"
        note.write_text("proxied")
        remote.log_artifact(note)
        remote.end()
        exp = c.get_experiment_by_name("skinclr-remote")
        assert exp.artifact_location.startswith("mlflow-artifacts:")
        assert remote.download("note.txt", tmp_path / "back").read_text() == "proxied"

        with urllib.request.urlopen(f"{url}/", timeout=30) as resp:  # the app's page: model training preset
            assert server.PRESET in resp.read().decode()
        out = log.read_text()
        assert f"export MLFLOW_TRACKING_URI={url}" in out
        assert local_uri in out
        assert stop(proc) == 0
    # the proxied artifact sits in the artifacts folder beside the SQLite file
    assert [p.read_text() for p in (tmp_path / "artifacts").rglob("note.txt")] == ["proxied"]
    assert "tracking server stopped" in log.read_text()
    assert not _group_alive(proc.pid), "server processes outlived Ctrl-C"


def test_server_refuses_a_busy_port(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert serve("127.0.0.1", port) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "--port" in err


def test_server_needs_a_store_when_the_tracking_uri_is_a_server(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert serve("127.0.0.1", free_port()) == 2
    assert "--backend-store-uri" in capsys.readouterr().err


def test_server_needs_an_artifact_destination_for_a_database_store(capsys):
    assert serve("127.0.0.1", free_port(), backend_store_uri="postgresql://db/mlflow") == 2
    assert "--artifacts-destination" in capsys.readouterr().err



@pytest.mark.slow
def test_a_server_open_to_the_network_warns_and_its_printed_uri_works(tmp_path):
    """Bound to 0.0.0.0 on a machine whose outward address is public (not a private IP, which
    MLflow allows by default): the printed URI answers, other Host headers still get 403, and
    stderr says the store is open to anyone without a login."""
    from tests.sandbox import Namespace, TrackingServer, require_root_tools

    require_root_tools("ip")
    ns = Namespace(outward="198.51.100.7")  # TEST-NET-2: documentation addresses, routed nowhere
    server = TrackingServer(ns, tmp_path / "server.log", host="0.0.0.0")
    try:
        server.start()
        log = server.log.read_text()
        printed = re.search(r"export MLFLOW_TRACKING_URI=(\S+)", log).group(1)
        assert printed == f"http://198.51.100.7:{server.port}"
        assert "warning: bound to 0.0.0.0" in log and "without logging in" in log and "basic-auth" in log
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert server.answers(search, base=printed) == 200
        assert server.answers(search) == 200  # localhost still works
        assert server.answers(search, host_header=f"mlflow.attacker.example:{server.port}") == 403
    finally:
        server.stop()
        ns.remove()


def test_a_loopback_server_prints_no_exposure_warning(capsys, monkeypatch):
    """The warning is for servers others can reach; a busy port stops before any of it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert serve("127.0.0.1", s.getsockname()[1]) == 2
    assert "warning" not in capsys.readouterr().err


def test_allowed_hosts_keep_the_users_list_and_add_the_printed_address(monkeypatch):
    from skinclr.track.server import allowed_hosts

    monkeypatch.delenv("MLFLOW_SERVER_ALLOWED_HOSTS", raising=False)
    hosts = allowed_hosts("198.51.100.7", 5000).split(",")
    assert "198.51.100.7:5000" in hosts and "localhost:*" in hosts
    assert "198.51.100.7:5000" not in allowed_hosts("192.168.1.5", 5000).split(","), "a private IP is allowed already"
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", "mlflow.lab.example:5000")
    assert allowed_hosts("198.51.100.7", 5000) == "mlflow.lab.example:5000,198.51.100.7:5000"
