"""The tracking store: where it is, and whether it can be used before any work starts.

`MLFLOW_TRACKING_URI` names it when set; else it is the SQLite file `./mlruns/mlflow.db`, with
artifacts beside it in `./mlruns/artifacts/`. `check_store` answers within seconds, with one line
naming the URI and the fix, instead of MLflow's minutes of retries and a traceback.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import mlflow

# A new store announces its schema set-up at INFO on first use, in every process that opens it.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

CHECK_TIMEOUT_S = 8.0  # the store check answers within this, whatever the store does


class StoreError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and the fix."""


def default_store() -> Path:
    return Path.cwd() / "mlruns"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the SQLite store in `./mlruns/`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{default_store() / 'mlflow.db'}"


def shown_uri(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urlsplit(uri)
    if parts.password:
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return uri


def _where(uri: str) -> str:
    """How the user chose this store, for the fix in a message."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return f"MLFLOW_TRACKING_URI={shown_uri(uri)}"
    return f"the project's default store {uri}"


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store sit beside the database, in `artifacts/`.

    A remote server chooses its own artifact store (None)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    return None


_checked: set[str] = set()


def check_store(uri: str | None = None) -> str:
    """Make sure the store can be used before any work starts; return its URI.

    Raises StoreError within CHECK_TIMEOUT_S: a folder given as a URI, an SQLite file that is
    not a database or whose folder is not writable, a server that does not answer or refuses,
    a database that does not connect. A fresh SQLite file is left for MLflow to create."""
    uri = uri or tracking_uri()
    if uri in _checked:
        return uri
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("sqlite:") else ""
    if scheme in ("", "file"):
        raise StoreError(f"{_where(uri)} is a folder path; MLflow 3 keeps runs in a database or behind a server: "
                         "unset it (the project's store is sqlite:///mlruns/mlflow.db) or set it to "
                         "sqlite:///PATH/mlflow.db or http://HOST:5000")
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        _within_timeout(uri, _check_server)
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        _within_timeout(uri, _check_database)
    _checked.add(uri)
    return uri


def _check_sqlite(uri: str) -> None:
    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if path is None or not str(path):
        raise StoreError(f"{_where(uri)}: give the database file as sqlite:///PATH/mlflow.db")
    if path.is_dir():
        raise StoreError(f"{_where(uri)} is a folder; name the database file inside it: "
                         f"sqlite:///{path / 'mlflow.db'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):  # SQLite writes its journal beside the file
            pass
    except OSError as err:
        raise StoreError(f"{_where(uri)}: cannot write in {path.parent} ({err.strerror or err}); "
                         "point MLFLOW_TRACKING_URI at a writable folder") from None
    if path.is_file() and path.stat().st_size:
        try:
            with sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=CHECK_TIMEOUT_S) as db:
                db.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{_where(uri)}: {path} is not a usable SQLite database ({err}); "
                             "move it away or point MLFLOW_TRACKING_URI at another file") from None


def _within_timeout(uri: str, check: Callable[[str], None]) -> None:
    """Run a check in a helper thread: a store that hangs costs CHECK_TIMEOUT_S, not minutes."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            check(uri)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome.append(err)

    worker = threading.Thread(target=target, daemon=True, name="store-check")
    worker.start()
    worker.join(CHECK_TIMEOUT_S)
    if not outcome:
        raise StoreError(f"{_where(uri)}: no answer within {CHECK_TIMEOUT_S:.0f} s; check that the tracking "
                         "server or database is up and reachable from here")
    if outcome[0] is not None:
        raise outcome[0]


def _check_server(uri: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                                max_retries=0, backoff_factor=0, timeout=CHECK_TIMEOUT_S - 1,
                                raise_on_status=False, json={"max_results": 1})
    except mlflow.exceptions.MlflowException as err:
        cause = root_cause(err)
        why = "connection refused" if isinstance(cause, ConnectionRefusedError) else first_line(cause)
        raise StoreError(f"{_where(uri)}: nothing answers there ({why}); start the server (`skinclr server`) "
                         "or fix MLFLOW_TRACKING_URI") from None
    code = response.status_code
    if code in (401, 403):
        raise StoreError(f"{_where(uri)}: the server refused the request (HTTP {code}: "
                         f"{first_line(response.text)[:120]}); with basic auth set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD; for 'Invalid Host header' start the server with "
                         "MLFLOW_SERVER_ALLOWED_HOSTS naming this host")
    if code != 200:
        raise StoreError(f"{_where(uri)}: HTTP {code} from the MLflow REST API ({first_line(response.text)[:120]}); "
                         "is it an MLflow tracking server, and is it healthy?")


def _check_database(uri: str) -> None:
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(uri).connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as err:  # noqa: BLE001 - a driver missing, a refused connection, bad credentials
        raise StoreError(f"{_where(uri)}: cannot connect to the database ({first_line(err)[:200]}); "
                         "check that it runs and that the URI's host, user and password are right") from None


def first_line(err: Any) -> str:
    lines = str(err).strip().splitlines()
    if lines:
        return lines[0]
    return "empty answer" if isinstance(err, str) else type(err).__name__


def root_cause(err: BaseException) -> BaseException:
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err
