"""The tracking store: where it is, whether it can be used before any work starts, and writes
that outlive it going away mid-run.

`MLFLOW_TRACKING_URI` names it when set; else it is the SQLite file `./mlruns/mlflow.db`, with
artifacts beside it in `./mlruns/artifacts/`. `check_store` answers within seconds, with one line
naming the URI and the fix, instead of MLflow's minutes of retries and a traceback. Each write of
a run is retried for `retry_seconds()` (a server restarted, a database busy), with one line on
stderr per outage; only then does the run fail, resumable. MLflow's own HTTP retries are
shortened to a few seconds, so that budget, not MLflow's ~2 minutes per call, decides how long a
run waits. A retried metric batch cannot double: the store ignores a point whose key, step,
timestamp and value it already holds.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from skinclr.runtime import no_space, out_of_space

# A new store announces its schema set-up at INFO on first use, in every process that opens it,
# and a failed statement is logged with its traceback before MLflow raises it: skinclr says what
# failed, in one line, from the error it raises.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

SQLITE = "sqlite:///"  # the scheme of a local store: sqlite:///PATH/mlflow.db

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
    return f"{SQLITE}{default_store() / 'mlflow.db'}"


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


def sqlite_path(uri: str | None = None) -> Path | None:
    """The database file of a local SQLite store (`uri`, by default this process's); None for a server."""
    uri = tracking_uri() if uri is None else uri
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store sit beside the database, in `artifacts/`.

    A remote server chooses its own artifact store (None)."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "artifacts").resolve().as_uri()


def checkpoint_root(uri: str | None = None) -> Path:
    """Resume checkpoints live in $SKINCLR_CHECKPOINTS, else beside a local store (`uri`, by
    default this process's), else in the user's cache."""
    if os.environ.get("SKINCLR_CHECKPOINTS"):
        return Path(os.environ["SKINCLR_CHECKPOINTS"])
    db = sqlite_path(uri)
    return db.parent / "checkpoints" if db is not None else Path.home() / ".cache" / "skinclr" / "checkpoints"


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
        import mlflow.utils.rest_utils  # noqa: F401 - loaded before the clock starts: an import is no server delay
        _within_timeout(uri, _check_server)
    elif scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        import sqlalchemy  # noqa: F401 - likewise
        _within_timeout(uri, _check_database)
    _checked.add(uri)
    return uri


def _check_sqlite(uri: str) -> None:
    path = sqlite_path(uri)
    if path is None or not str(path):
        raise StoreError(f"{_where(uri)}: give the database file as sqlite:///PATH/mlflow.db")
    if path.is_dir():
        raise StoreError(f"{_where(uri)} is a folder; name the database file inside it: "
                         f"{SQLITE}{path / 'mlflow.db'}")
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
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                                max_retries=0, backoff_factor=0, timeout=CHECK_TIMEOUT_S - 1,
                                raise_on_status=False, json={"max_results": 1})
    except MlflowException as err:
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


RETRY_ENV = "SKINCLR_TRACKING_RETRY_S"  # how long a run waits for a store that went away
DEFAULT_RETRY_S = 300.0

# MLflow retries a failed HTTP call 7 times over ~2 minutes (it reads these at each call); the
# run's own retry budget takes over from a few seconds on (a user's own settings win).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

# database errors that mean the server or file is away, not that the request is wrong
_GONE = ("locked", "unable to open", "disk i/o", "connect", "closed", "timeout", "timed out", "terminat",
         "shutting down", "starting up", "lost")


def transient(err: BaseException) -> bool:
    """An error that means 'the store is not there right now' (retry), not 'the request is wrong'."""
    import mlflow
    import requests
    import sqlalchemy.exc

    network = (ConnectionError, TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
               requests.exceptions.RetryError, requests.exceptions.ChunkedEncodingError)
    database = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlite3.OperationalError)
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, network):
            return True
        if isinstance(seen, database) and any(word in str(seen).lower() for word in _GONE):
            return True
        if isinstance(seen, mlflow.exceptions.MlflowException) and seen.get_http_status_code() in (502, 503, 504):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def lost_race(err: BaseException) -> bool:
    """An insert that lost to another process inserting the same new row first (a sweep's first
    trials logging one dataset at once): SQLite's, PostgreSQL's or MySQL's unique-key error."""
    text = str(err).lower()
    return any(word in text for word in ("unique constraint failed", "duplicate key value", "duplicate entry"))


def retry_seconds() -> float:
    """How long a run keeps retrying a store that went away: $SKINCLR_TRACKING_RETRY_S, else 300 s."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        raise StoreError(f"{RETRY_ENV}={os.environ[RETRY_ENV]!r} is not a number of seconds") from None


def set_retry_seconds(seconds: float) -> None:
    """Set this process's retry budget (children and local Ray workers inherit it)."""
    os.environ[RETRY_ENV] = str(float(seconds))


def retrying(what: str, call: Callable[[], Any]) -> Any:
    """`call()`, retried while the store is unreachable, for at most `retry_seconds()`.

    One line on stderr when an outage begins; StoreError when it outlasts the budget. Only
    idempotent calls go through here (a repeated metric batch is deduplicated by the store)."""
    deadline, pause, races = None, 1.0, 0
    while True:
        try:
            return call()
        except Exception as err:
            db = sqlite_path()
            if out_of_space(err, db.parent if db is not None else None):  # waiting frees no space
                raise no_space(db.parent if db is not None else Path(shown_uri(tracking_uri())), what,
                               "free space there and run the same command again to resume") from None
            if races < 2 and lost_race(err):  # the same call again finds the other process's row
                races += 1
                continue
            if not transient(err):
                raise
            now, budget = time.monotonic(), retry_seconds()
            if deadline is None:
                deadline = now + budget
                print(f"warning: tracking store {shown_uri(tracking_uri())} unreachable while {what} "
                      f"({first_line(root_cause(err))[:160]}); retrying for up to {budget:.0f} s "
                      f"(tracking.retry_seconds or ${RETRY_ENV})", file=sys.stderr, flush=True)
            if now >= deadline:
                raise StoreError(f"tracking store {shown_uri(tracking_uri())} unreachable for {budget:.0f} s while "
                                 f"{what}; once it is back, run the same command again to resume") from None
            time.sleep(min(pause, max(0.0, deadline - now)))
            pause = min(pause * 2, 10.0)
