"""Links into the MLflow UI, in its model-training view (a fresh browser opens the GenAI one).

The 3.17 UI picks its view from the link alone (`workflowType` in the URL), so every link skinclr
prints carries the model-training one.
"""
from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.tracking import MlflowClient

from core import names
from core.store import tracking_uri
from core.tracking import KIND, client

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
