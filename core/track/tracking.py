"""MLflow runs and experiments: the client, experiments that say what they hold, RunLogger, and
links into the UI.

Everything goes through `MlflowClient` with explicit run ids (no global active run), so the
same code logs from the CLI, from a Ray Tune trial process, or from a test. Where the store is,
whether it answers, and the retries of every write are core/track/store.py. The 3.17 UI picks
its view from the link alone (`workflowType` in the URL: a fresh browser opens the GenAI one),
so every link skinclr prints carries the model-training one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

import mlflow
import sqlparse.lexer
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from skinclr import names
from skinclr.runtime import no_space, out_of_space
from skinclr.track.store import StoreError, artifact_root, retrying, sqlite_path, tracking_uri

# MLflow parses search filters with sqlparse, whose lexer builds itself on first use, once per
# process. A Ctrl-C or SIGTERM landing mid-way leaves it empty for good: every later search fails
# (a sweep's driver interrupted during its first search then cannot close its trials). Built
# here, at import, no interrupt of a run can land in it.
sqlparse.lexer.Lexer.get_default_instance()

opened_runs: list[str] = []  # runs this process created or reopened
killed_runs: list[str] = []  # runs this process ended KILLED (the CLI's Ctrl-C line names them)


class Stopped(BaseException):
    """Raised between epochs by a driver that stops a run and ends it itself (a sweep's scheduler)."""


def client() -> MlflowClient:
    uri = tracking_uri()
    if (db := sqlite_path(uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    try:
        return MlflowClient(tracking_uri=uri)  # a new SQLite store writes its schema here
    except Exception as err:
        if db is not None and out_of_space(err, db.parent):
            raise no_space(db.parent, "creating the tracking store", "free space there or point "
                           "MLFLOW_TRACKING_URI at a disk with room") from None
        raise


KIND = "custom_model_development"  # a model-training experiment, not a GenAI one
# What an experiment holds, by the stage of the runs skinclr puts in it ({name}: the experiment).
NOTES = {
    "pretrain": "Self-supervised pretraining runs (SimCLR, MoCo v2 or BYOL; `pretrain.method`). Filled by "
                "`skinclr pretrain --config F --set tracking.experiment={name}` (one run each) and by `skinclr sweep` "
                "of a pretraining config (a parent run, one child run per trial). Fine-tune from one with "
                "`--set finetune.init=runs:/RUN_ID`.",
    "finetune": "Fine-tuned classifiers, each logging its model under `model`. Filled by `skinclr finetune --config F "
                "--set tracking.experiment={name}` (one run each) and by `skinclr sweep` of a fine-tune config (a "
                "parent run, one child run per trial). `skinclr promote --experiment {name}` registers the best. With "
                "`data.test_fraction`, test_* metrics score each run's saved model once on its held-out test side.",
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

    The experiment carries MLflow's model-training kind tag and, once the stage of its runs is
    known, a note saying what it holds and which command fills it. Call it in the driver before
    any concurrent writer: the first use of a fresh SQLite store migrates its schema, and two
    processes doing that at once lose runs."""
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
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        return c.get_run(id_or_name).info.run_id
    if "'" in id_or_name and '"' in id_or_name:
        return None  # no string literal of MLflow's filter language can hold both quotes
    quote = '"' if "'" in id_or_name else "'"
    stage_filter = f" and tags.`{names.STAGE_TAG}` = '{stage}'" if stage else ""
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, filter_string=f"tags.`mlflow.runName` = {quote}{id_or_name}{quote} and "
                         f"attributes.status = 'FINISHED'{stage_filter}",
                         order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return runs[0].info.run_id if runs else None


def _source(tags: dict[str, Any]) -> dict[str, str]:
    """The runs table's Source column: the skinclr command that made the run (its full line is the command tag)."""
    command = str(tags.get(names.COMMAND_TAG, "")).split()
    return {names.SOURCE_NAME_TAG: " ".join(command[:2]), names.SOURCE_TYPE_TAG: "LOCAL"} if command else {}


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
        tags = {**(tags or {}), **_source(tags or {})}
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
            batch = [RunTag(k, str(v)) for k, v in {**tags, **_source(tags)}.items()]
            retrying("setting tags", lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_datasets(self, sides: list) -> None:
        """What the run read, as MLflow dataset inputs (the runs table's Dataset column): entries of
        Inputs.sides() (name, digest, source folder, context, profile), or DatasetInputs as logged."""
        batch = [s if isinstance(s, DatasetInput) else DatasetInput(
            Dataset(s["name"], s["digest"], "local", json.dumps({"uri": s["source"]}), profile=json.dumps(s["profile"])),
            [InputTag("mlflow.data.context", s["context"])]) for s in sides]
        if batch:
            retrying("logging the datasets", lambda: self.client.log_inputs(self.run_id, datasets=batch))

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


@contextmanager
def ending(logger: RunLogger, finish: bool = True):
    """The one way a run ends: KILLED on Ctrl-C or SIGTERM (resumable), FAILED on any other error,
    FINISHED when the block completes (unless `finish` is off: the block then ends the run as its
    outcome says); a run `Stopped` is left to whoever stopped it. A store that went away leaves the
    run RUNNING: nothing can mark it, and the same command resumes it once the store is back."""
    try:
        yield logger
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            logger.end("KILLED")
        elif not isinstance(err, (StoreError, Stopped)):
            logger.end("FAILED")
        raise
    if finish:
        logger.end("FINISHED")


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
