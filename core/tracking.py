"""MLflow plumbing: where the store is, experiments, runs, batched metrics, artifacts.

Everything goes through `MlflowClient` with explicit run ids (no global active run), so the
same code logs from the CLI, from a Ray Tune trial process, or from a test.

The store is checked once before any work (`check_store`: one line naming the URI and the fix,
within seconds, instead of MLflow's minutes of retries and a traceback). A run's writes survive
a store that goes away mid-run (a server restarted): they are retried for `retry_seconds()`
with one line per outage. MLflow's own HTTP retries are shortened to a few seconds, so that
budget, not MLflow's ~2 minutes per call, decides how long a run waits. A retried metric batch
cannot double: the store ignores a point whose key, step, timestamp and value it already holds.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

# MLflow retries a failed HTTP call 7 times over ~2 minutes; the run's own retry budget takes
# over from a few seconds on (a user's own settings win).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from core import names

# A new store announces its schema set-up at INFO on first use, in every process that opens it.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

RETRY_ENV = "SKINCLR_TRACKING_RETRY_S"  # how long a run waits for a store that went away
DEFAULT_RETRY_S = 300.0
CHECK_TIMEOUT_S = 8.0  # the store check answers within this, whatever the store does

opened_runs: list[str] = []  # runs this process created or reopened
killed_runs: list[str] = []  # runs this process ended KILLED (the CLI's Ctrl-C line names them)


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
        cause = _root_cause(err)
        why = "connection refused" if isinstance(cause, ConnectionRefusedError) else _first_line(cause)
        raise StoreError(f"{_where(uri)}: nothing answers there ({why}); start the server (`skinclr server`) "
                         "or fix MLFLOW_TRACKING_URI") from None
    code = response.status_code
    if code in (401, 403):
        raise StoreError(f"{_where(uri)}: the server refused the request (HTTP {code}: "
                         f"{_first_line(response.text)[:120]}); with basic auth set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD; for 'Invalid Host header' start the server with "
                         "MLFLOW_SERVER_ALLOWED_HOSTS naming this host")
    if code != 200:
        raise StoreError(f"{_where(uri)}: HTTP {code} from the MLflow REST API ({_first_line(response.text)[:120]}); "
                         "is it an MLflow tracking server, and is it healthy?")


def _check_database(uri: str) -> None:
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(uri).connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as err:  # noqa: BLE001 - a driver missing, a refused connection, bad credentials
        raise StoreError(f"{_where(uri)}: cannot connect to the database ({_first_line(err)[:200]}); "
                         "check that it runs and that the URI's host, user and password are right") from None


def _first_line(err: Any) -> str:
    lines = str(err).strip().splitlines()
    if lines:
        return lines[0]
    return "empty answer" if isinstance(err, str) else type(err).__name__


def _root_cause(err: BaseException) -> BaseException:
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


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
                      f"({_first_line(_root_cause(err))[:160]}); retrying for up to {budget:.0f} s "
                      f"(tracking.retry_seconds or ${RETRY_ENV})", file=sys.stderr, flush=True)
            if now >= deadline:
                raise StoreError(f"tracking store {shown_uri(tracking_uri())} unreachable for {budget:.0f} s while "
                                 f"{what}; once it is back, run the same command again to resume") from None
            time.sleep(min(pause, max(0.0, deadline - now)))
            pause = min(pause * 2, 10.0)


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local SQLite store sit beside the database, in `artifacts/`.

    A remote server chooses its own artifact store (None)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def client() -> MlflowClient:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


KIND = "custom_model_development"  # a model-training experiment, not a GenAI one
# What an experiment holds, by the stage of the runs skinclr puts in it ({name}: the experiment).
NOTES = {
    "pretrain": "Self-supervised pretraining runs (SimCLR, MoCo v2 or BYOL; `pretrain.method`). Filled by "
                "`skinclr pretrain --config F --set tracking.experiment={name}` (one run each) and by `skinclr sweep` "
                "of a pretraining config (a parent run, one child run per trial). Fine-tune from one with "
                "`--set finetune.init=runs:/RUN_ID`.",
    "finetune": "Fine-tuned classifiers, each logging its model under `model`. Filled by `skinclr finetune --config F "
                "--set tracking.experiment={name}` (one run each) and by `skinclr sweep` of a fine-tune config (a "
                "parent run, one child run per trial). `skinclr promote --experiment {name}` registers the best.",
    "evaluate": "Evaluations of a model on a labelled folder, one run each, filled by `skinclr evaluate --model URI "
                "--data DIR --experiment {name}`. test_* metrics cover images the model never saw; its own "
                "training and validation images are scored as train_* and val_*.",
    "report": "The paper's tables and figures, one run per `skinclr report --experiment E --out DIR` (report.md and "
              "its files are the run's artifacts).",
    "pipeline": "Two-stage pipelines filled by `skinclr sweep --config experiments/sweeps/pipeline.yaml`: one run per "
                "pipeline, with its pretraining sweep, fine-tuning and evaluation as child runs.",
}


def ensure_experiment(name: str, stage: str | None = None) -> str:
    """Create the store and the experiment if missing; return the experiment id.

    The experiment carries MLflow's model-training kind tag (the 3.17 UI still picks its view by
    the `workflowType` of the URL, hence the links below) and, once the stage of its runs is
    known, a note saying what it holds and which command fills it. Call it in the driver before any concurrent writer: the first use of a
    fresh SQLite store migrates its schema, and two processes doing that at once lose runs."""
    c = client()
    tags = {names.KIND_TAG: KIND, **({names.NOTE_TAG: NOTES[stage].format(name=name)} if stage in NOTES else {})}
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        for key, value in tags.items():
            if key not in exp.tags:  # a note a user wrote in the UI stays
                c.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    root = artifact_root(tracking_uri())
    location = f"{root}/{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}" if root else None
    try:
        return c.create_experiment(name, artifact_location=location, tags=tags)
    except mlflow.exceptions.MlflowException:
        exp = c.get_experiment_by_name(name)  # created by someone else in the meantime
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# Links into the MLflow UI, in its model-training view (a fresh browser opens the GenAI one)

UI_ENV = "SKINCLR_UI_URL"
ML_VIEW = "workflowType=machine_learning"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `skinclr server` listens by default


def ui_base() -> str:
    """The UI of this store: $SKINCLR_UI_URL, the tracking server itself, or `skinclr server`'s
    default address for a local store."""
    if os.environ.get(UI_ENV, "").strip():
        return os.environ[UI_ENV].strip().rstrip("/")
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/")
    return DEFAULT_UI


def experiments_link(base: str | None = None) -> str:
    return f"{base or ui_base()}/#/experiments?{ML_VIEW}"


def experiment_link(experiment_id: str, base: str | None = None) -> str:
    return f"{base or ui_base()}/#/experiments/{experiment_id}/runs?{ML_VIEW}"


def experiment_links(base: str, store: str, limit: int = 10) -> list[str]:
    """Lines naming the store's skinclr experiments (newest first) with a link to each one's runs.

    The UI opens an experiment clicked in its list in the GenAI view whatever the link that led
    there, so a user who wants the runs table follows these."""
    try:
        found = MlflowClient(tracking_uri=store).search_experiments(
            filter_string=f"tags.`{names.KIND_TAG}` = '{KIND}'", max_results=limit, order_by=["last_update_time DESC"])
    except mlflow.exceptions.MlflowException:
        return []
    width = max((len(e.name) for e in found), default=0)
    return [f"  {'runs of' if i == 0 else '':<10} {e.name:<{width}}  {experiment_link(e.experiment_id, base)}"
            for i, e in enumerate(found)]


def run_link(run_id: str, experiment_id: str | None = None, base: str | None = None) -> str:
    experiment_id = experiment_id or client().get_run(run_id).info.experiment_id
    return f"{base or ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


def model_link(name: str, version: str | int | None = None) -> str:
    where = f"{name}/versions/{version}" if version is not None else name
    return f"{ui_base()}/#/models/{where}?{ML_VIEW}"


def browse_hint() -> str:
    """What to start to see a link's page, for a local store (a server store is already up)."""
    return "" if tracking_uri().startswith(("http://", "https://")) or os.environ.get(UI_ENV) else \
        " (with `skinclr server` running)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_key(flat_config: dict[str, Any], ignore: Iterable[str] = ("tracking.resume", "tracking.run_name")) -> str:
    items = sorted((k, repr(v)) for k, v in flat_config.items() if k not in set(ignore))
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def find_resumable(experiment_id: str, key: str):
    """The newest unfinished run (killed, failed or still marked running) with this config."""
    runs = client().search_runs(
        [experiment_id], filter_string=f"tags.`{names.RUN_KEY_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        if run.info.status != "FINISHED":
            return run
    return None


def find_run(id_or_name: str, stage: str | None = None) -> str | None:
    """A run id as given, or the newest finished run of that name (of a stage, if named)."""
    c = client()
    try:
        return c.get_run(id_or_name).info.run_id
    except mlflow.exceptions.MlflowException:
        pass
    if "'" in id_or_name and '"' in id_or_name:
        return None  # no string literal of MLflow's filter language can hold both quotes
    quote = '"' if "'" in id_or_name else "'"
    stage_filter = f" and tags.`{names.STAGE_TAG}` = '{stage}'" if stage else ""
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, filter_string=f"tags.`mlflow.runName` = {quote}{id_or_name}{quote} and "
                         f"attributes.status = 'FINISHED'{stage_filter}",
                         order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return runs[0].info.run_id if runs else None


class RunLogger:
    """One MLflow run, written through the client: batched metrics, params, tags, files.

    Every write is retried while the store is unreachable (see `retrying`). A reopened run
    skips metric points it already holds, so an epoch trained again after a resume from an
    older checkpoint adds no second point at the same step."""

    def __init__(self, run_id: str):
        self.client = client()
        self.run_id = run_id
        self._logged: set[tuple[str, int]] = set()  # (key, step) already in the store (reopened runs)

    @classmethod
    def create(cls, experiment: str, run_name: str = "", tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> "RunLogger":
        tags = dict(tags or {})
        exp_id = ensure_experiment(experiment, tags.get(names.STAGE_TAG))
        tags.setdefault(names.GIT_COMMIT_TAG, git_commit())
        if parent_run_id:
            tags[names.PARENT_TAG] = parent_run_id
        # not retried: a create whose answer was lost would leave a second, orphaned run
        run = client().create_run(exp_id, run_name=run_name or None, tags=tags)
        opened_runs.append(run.info.run_id)
        return cls(run.info.run_id)

    @property
    def run(self):
        return retrying("reading the run", lambda: self.client.get_run(self.run_id))

    def reopen(self) -> None:
        """Mark a resumed run as running again, and note the metric points it holds."""
        self._logged = {(key, m.step) for key in self.run.data.metrics
                        for m in retrying("reading metric history", lambda k=key: self.client.get_metric_history(
                            self.run_id, k))}
        retrying("reopening the run", lambda: self.client.update_run(self.run_id, status="RUNNING"))
        opened_runs.append(self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.run.data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # the REST API takes 100 params per batch
            retrying("logging params", lambda b=items[i:i + 100]: self.client.log_batch(self.run_id, params=b))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """All of an epoch's metrics in one call; the timestamp is fixed before any retry."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and (k, step) not in self._logged]
        for i in range(0, len(batch), 1000):
            retrying(f"logging step {step}", lambda b=batch[i:i + 1000]: self.client.log_batch(self.run_id, metrics=b))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            retrying("setting tags", lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            retrying(f"uploading {path.name}/",
                     lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            retrying(f"uploading {path.name}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def download(self, artifact_path: str, dst: str | Path) -> Path | None:
        """A file the run logged, or None if it has none at that path."""
        try:
            return Path(retrying(f"downloading {artifact_path}", lambda: mlflow.artifacts.download_artifacts(
                run_id=self.run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=tracking_uri())))
        except (mlflow.exceptions.MlflowException, OSError):
            return None

    def end(self, status: str = "FINISHED") -> None:
        status = RunStatus.to_string(RunStatus.from_string(status))
        retrying(f"marking the run {status}", lambda: self.client.set_terminated(self.run_id, status=status))
        if status == "KILLED":
            killed_runs.append(self.run_id)
