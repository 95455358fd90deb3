"""The champion served over REST by `mlflow models serve`, scoring a real ISIC image sent as base64."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from skinclr.names import CLASSES
from skinclr.track.registry import promote
from tests.track.test_registry import EXPERIMENT, finetune_run
from tests.track.test_server import free_port, wait_http

START_TIMEOUT_S = 180


@contextmanager
def serving(model: str, uri: str, root: Path):
    """`mlflow models serve` of `model` from the store at `uri`, on a loopback port; yields its URL."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` from PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri}
    log = root / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, START_TIMEOUT_S, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher leaves its uvicorn child behind otherwise
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served_champion(synth_dir, tmp_path_factory):
    """A promoted tiny fine-tune run in a store of its own, served as models:/skinclr@champion on a
    loopback port; yields (url, run id, store uri)."""
    root = tmp_path_factory.mktemp("rest-serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MLFLOW_TRACKING_URI", uri)
        mp_.setenv("SKINCLR_CACHE", str(root / "cache"))
        run_id = finetune_run(synth_dir, "train.seed=0")
        promote(EXPERIMENT, run_id=run_id)
    with serving("models:/skinclr@champion", uri, root) as url:
        yield url, run_id, uri


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode() or "{}")


def _predictions(url: str, payload: dict) -> list[dict]:
    status, body = _post(url, payload)
    assert status == 200, json.dumps(body)[-3000:]
    return body["predictions"]


@pytest.mark.slow
@pytest.mark.real_data
def test_the_served_champion_scores_a_real_image(served_champion, real_data_dir, monkeypatch):
    url, run_id, uri = served_champion
    image = sorted((real_data_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[0]
    b64 = base64.b64encode(image.read_bytes()).decode("ascii")

    split = _predictions(url, {"dataframe_split": {"columns": ["image"], "data": [[b64]]}})
    records = _predictions(url, {"dataframe_records": [{"image": b64}, {"image": b64}]})
    assert len(split) == 1 and len(records) == 2
    for row in split + records:
        assert list(row) == list(CLASSES)
        assert all(0.0 <= p <= 1.0 for p in row.values())
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-6)
    assert records[0] == pytest.approx(split[0])

    from skinclr.serve.uris import load_predictor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    direct = load_predictor(f"runs:/{run_id}/model").predict_proba([str(image)])[0]
    assert [split[0][c] for c in CLASSES] == pytest.approx(direct.tolist(), abs=1e-5)


@pytest.mark.slow
def test_the_server_rejects_an_undecodable_image_with_a_clear_error(served_champion):
    url, _, _ = served_champion
    status, body = _post(url, {"dataframe_split": {"columns": ["image"],
                                                   "data": [[base64.b64encode(b"not an image").decode()]]}})
    # MLflow's own message is generic; the model's reason travels in the response's stack trace
    assert status == 400 and "not a readable image" in body.get("stack_trace", ""), body


@pytest.mark.slow
@pytest.mark.real_data
def test_a_served_ensemble_predicts_what_its_predict_does(synth_dir, real_data_dir, tmp_path, monkeypatch):
    """An ensemble of two fine-tune runs, promoted and served like any model, answers over REST
    exactly what `load_predictor(...).predict_proba` says."""
    from skinclr.report.combine import build_ensemble, member_runs
    from skinclr.serve.uris import load_predictor

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SKINCLR_CACHE", str(tmp_path / "cache"))
    runs = [finetune_run(synth_dir, f"train.seed={seed}") for seed in (0, 1)]
    ensemble = build_ensemble(member_runs(runs), tta="flip")["run_id"]
    promote(EXPERIMENT, run_id=ensemble, name="pair")
    images = sorted((real_data_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:3]
    direct = load_predictor("models:/pair@champion").predict_proba([str(p) for p in images])
    with serving("models:/pair@champion", uri, tmp_path) as url:
        served = _predictions(url, {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(p.read_bytes()).decode("ascii")] for p in images]}})
    np.testing.assert_allclose([[row[c] for c in CLASSES] for row in served], direct, atol=1e-6)
