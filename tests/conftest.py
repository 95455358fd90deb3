"""Shared fixtures: the real ISIC 2018 data beside the checkout, and small synthetic sets."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("SKINCLR_REAL_DATA", REPO.parent / "shared" / "data" / "isic2018-task3-200x150"))


def pytest_configure(config) -> None:
    """A suite started in the background by a non-interactive shell inherits SIGINT ignored, and
    so would every command it starts; the Ctrl-C tests need it as a terminal delivers it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (REAL_DATA / "ISIC2018_Task3_Training_GroundTruth.csv").is_file():
        pytest.fail(f"real ISIC 2018 data not found at {REAL_DATA}; set SKINCLR_REAL_DATA to its folder")
    return REAL_DATA


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the official training layout (read-only by convention)."""
    from skinclr.data.synth import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth") / "isic", n=280, seed=0)


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """One migrated, empty SQLite store; tests copy it (creating the schema costs seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(autouse=True)
def _isolated_stores(tmp_path, monkeypatch, _empty_store):
    """Each test gets its own MLflow store and image cache: nothing leaks into the checkout."""
    shutil.copyfile(_empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("SKINCLR_CACHE", str(tmp_path.parent / "skinclr-cache"))
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
