"""`skinclr server`: the project's MLflow store behind one tracking server (UI + REST + artifacts).

Workers on other machines cannot open a SQLite file or write into a local artifact folder; they
talk to this server instead (`MLFLOW_TRACKING_URI=http://HOST:PORT`). The server proxies
artifacts (`--serve-artifacts`), so experiments created through it store theirs under
`--artifacts-destination` and workers need no shared file system. Experiments created earlier
straight through the SQLite file keep their `file://` artifact folder: workers elsewhere can only
write there if that path is shared.

For a cluster bind `--host 0.0.0.0`. Exposure is explicit: the server has no login, so anyone who
reaches the port can read, change and delete every run, and it says so on stderr. MLflow 3
answers only requests whose Host header it allows (localhost and private IPs by default); the
address printed for workers is added to those, so the printed URI always works. Other names
(a DNS name) go in `MLFLOW_SERVER_ALLOWED_HOSTS=name:port` before starting. For logins, run
MLflow's own basic-auth app (`mlflow server --app-name basic-auth`, clients set
`MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`). `MLFLOW_WORKERS` sets the number of
server processes (MLflow's default is 4). MLflow's GenAI job runner stays off unless
`MLFLOW_SERVER_ENABLE_JOB_EXECUTION` is set.

The server runs this module's `app` (`--app-name skinclr`, entry point group `mlflow.app`):
MLflow's own, with one change. The MLflow 3.17 UI picks an experiment's view from the link's
`workflowType`, else the browser's saved choice (localStorage `mlflow.workflowType_v1`); a fresh
browser has none and opens the GenAI "Traces" page. The app's page presets model training when
the browser has made no choice; a user who switches to GenAI keeps that choice. `app` is built on
first use, so `skinclr server` itself never loads MLflow's server.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from skinclr import names
from skinclr.track.tracking import KIND, experiment_link, experiments_link
from skinclr.track.store import artifact_root, sqlite_path, tracking_uri

LOOPBACK = ("127.0.0.1", "localhost", "::1")
VIEW_KEY = "mlflow.workflowType_v1"  # the UI's own saved choice: a JSON string
PRESET = ("<script>try{if(!localStorage.getItem('%s'))localStorage.setItem('%s','\"machine_learning\"')}"
          "catch(e){}</script>" % (VIEW_KEY, VIEW_KEY))


def experiment_links(base: str, store: str, limit: int = 10) -> list[str]:
    """Lines naming the store's skinclr experiments (newest first) with a link to each one's runs
    (the experiments list opens them too, in this server's UI: `app` below)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient(tracking_uri=store).search_experiments(
            filter_string=f"tags.`{names.KIND_TAG}` = '{KIND}'", max_results=limit, order_by=["last_update_time DESC"])
    except mlflow.exceptions.MlflowException:
        return []
    width = max((len(e.name) for e in found), default=0)
    return [f"  {'runs of' if i == 0 else '':<10} {e.name:<{width}}  {experiment_link(e.experiment_id, base)}"
            for i, e in enumerate(found)]


def _reachable_address(host: str) -> str:
    """The address workers should use: the bind address, or this machine's outward IP for 0.0.0.0."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # chooses a route, sends nothing
            return s.getsockname()[0]
        except OSError:
            return socket.getfqdn()


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def allowed_hosts(address: str, port: int) -> str:
    """MLFLOW_SERVER_ALLOWED_HOSTS that admit `address:port` besides what is allowed already (the
    user's list, else MLflow's defaults: localhost and private IPs)."""
    from mlflow.server.security_utils import (get_allowed_hosts_from_env, get_default_allowed_hosts,
                                              is_allowed_host_header)

    hosts = get_allowed_hosts_from_env() or get_default_allowed_hosts()
    wanted = [f"[{address}]:{port}" if ":" in address else f"{address}:{port}"]
    return ",".join(hosts + [h for h in wanted if not is_allowed_host_header(hosts, h)])


def server_command(host: str, port: int, backend_store_uri: str, artifacts_destination: str) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--serve-artifacts", "--artifacts-destination", artifacts_destination,
            "--host", host, "--port", str(port), "--app-name", "skinclr"]  # this module's `app`


def serve(host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None,
          artifacts_destination: str | None = None) -> int:
    """Run `mlflow server` until it stops or Ctrl-C; return its exit code (0 after Ctrl-C).

    The store defaults to the project's own (`tracking_uri()`, a SQLite file) and the artifact
    destination to the `artifacts/` folder beside it. A bad setting is one line on stderr and
    exit code 2."""
    backend = backend_store_uri or tracking_uri()
    if not backend_store_uri and sqlite_path(backend) is None:
        print(f"error: MLFLOW_TRACKING_URI is {backend}, a server rather than a store; give "
              "--backend-store-uri (sqlite:///PATH/mlflow.db or postgresql://...)", file=sys.stderr)
        return 2
    artifacts = artifacts_destination or artifact_root(backend)
    if artifacts is None:
        print(f"error: a {backend.split(':')[0]} store needs --artifacts-destination (a shared folder or "
              "s3://bucket/path) for the artifacts it serves", file=sys.stderr)
        return 2
    if (db := sqlite_path(backend)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    if artifacts.startswith("file://"):
        Path(artifacts[len("file://"):]).mkdir(parents=True, exist_ok=True)
    if not _port_free(host, port):
        print(f"error: port {port} on {host} is in use; pick another --port", file=sys.stderr)
        return 2

    address = _reachable_address(host)
    url = f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"
    print(f"MLflow tracking server at {url} (UI and REST)\n"
          f"  open       {experiments_link(url)}", *experiment_links(url, backend), sep="\n")
    print(f"  store      {backend}\n  artifacts  {artifacts}\n"
          f"workers use it with:\n  export MLFLOW_TRACKING_URI={url}", flush=True)
    # MLflow's GenAI job runner: several more processes that tracking and the registry never use
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    if host not in LOOPBACK:
        env["MLFLOW_SERVER_ALLOWED_HOSTS"] = allowed_hosts(address, port)
        print(f"warning: bound to {host}: anyone who can reach port {port} on this machine can read, change and "
              "delete every run and model, without logging in. Keep the port on a trusted network, or serve "
              "with logins: `mlflow server --app-name basic-auth` (docker/README.md). Other host names "
              "go in MLFLOW_SERVER_ALLOWED_HOSTS=name:port.", file=sys.stderr, flush=True)
    proc = subprocess.Popen(server_command(host, port, backend, artifacts), env=env)
    interrupted = False

    def forward(signum, _frame):
        nonlocal interrupted
        interrupted = True
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()  # a second Ctrl-C, forwarded too, makes the server skip its graceful wait
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if interrupted:
        print(f"tracking server stopped (exit code {code})", flush=True)
        return 0
    return code


def _page():
    from flask import Response
    from mlflow.server import app as flask_app

    html = (Path(flask_app.static_folder) / "index.html").read_text()
    return Response(html.replace("<head>", "<head>" + PRESET, 1), mimetype="text/html")


def __getattr__(name: str):
    """`app`, the server's ASGI app: MLflow's, its page (route "/", the UI's one page) `_page`."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    flask_app.view_functions["serve"] = _page
    globals()["app"] = app = create_fastapi_app(flask_app)
    return app
