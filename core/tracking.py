"""MLflow plumbing: where the store is, experiments, runs, batched metrics, artifacts.

Everything goes through `MlflowClient` with explicit run ids (no global active run), so the
same code logs from the CLI, from a Ray Tune trial process, or from a test.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

# A new store announces its schema set-up at INFO on first use, in every process that opens it.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

RUN_KEY_TAG = "skinclr.run_key"  # hash of the resolved config: finds a run to resume
STAGE_TAG = "skinclr.stage"
PARENT_TAG = "mlflow.parentRunId"


def default_store() -> Path:
    return Path.cwd() / "mlruns"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the SQLite store in `./mlruns/`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{default_store() / 'mlflow.db'}"


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


def ensure_experiment(name: str) -> str:
    """Create the store and the experiment if missing; return the experiment id.

    Call it in the driver before any concurrent writer: the first use of a fresh SQLite store
    migrates its schema, and two processes doing that at once lose runs."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root(tracking_uri())
    location = f"{root}/{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}" if root else None
    try:  # the kind tag makes the UI open the classic ML view, not the GenAI one
        return c.create_experiment(name, artifact_location=location,
                                   tags={"mlflow.experimentKind": "custom_model_development"})
    except mlflow.exceptions.MlflowException:
        exp = c.get_experiment_by_name(name)  # created by someone else in the meantime
        if exp is None:
            raise
        return exp.experiment_id


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
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
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
    stage_filter = f" and tags.`{STAGE_TAG}` = '{stage}'" if stage else ""
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, filter_string=f"tags.`mlflow.runName` = '{id_or_name}' and "
                         f"attributes.status = 'FINISHED'{stage_filter}",
                         order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return runs[0].info.run_id if runs else None


class RunLogger:
    """One MLflow run, written through the client: batched metrics, params, tags, files."""

    def __init__(self, run_id: str):
        self.client = client()
        self.run_id = run_id

    @classmethod
    def create(cls, experiment: str, run_name: str = "", tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> "RunLogger":
        exp_id = ensure_experiment(experiment)
        tags = dict(tags or {})
        tags.setdefault("mlflow.source.git.commit", git_commit())
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = client().create_run(exp_id, run_name=run_name or None, tags=tags)
        return cls(run.info.run_id)

    @property
    def run(self):
        return self.client.get_run(self.run_id)

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self.client.update_run(self.run_id, status="RUNNING")

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.run.data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # the REST API takes 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """All of an epoch's metrics in one call."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def download(self, artifact_path: str, dst: str | Path) -> Path | None:
        """A file the run logged, or None if it has none at that path."""
        try:
            return Path(mlflow.artifacts.download_artifacts(
                run_id=self.run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=tracking_uri()))
        except (mlflow.exceptions.MlflowException, OSError):
            return None

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
