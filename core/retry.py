"""A run's writes outlive a store that goes away mid-run (a server restarted, a database busy).

Each write is retried for `retry_seconds()`, with one line on stderr per outage; only then does
the run fail, resumable. MLflow's own HTTP retries are shortened to a few seconds, so that
budget, not MLflow's ~2 minutes per call, decides how long a run waits. A retried metric batch
cannot double: the store ignores a point whose key, step, timestamp and value it already holds.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import time
from typing import Any, Callable

import mlflow

from core.store import StoreError, first_line, root_cause, shown_uri, tracking_uri

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
    deadline, pause = None, 1.0
    while True:
        try:
            return call()
        except Exception as err:
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
