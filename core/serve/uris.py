"""A model by URI: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID[/model]`, a pyfunc
folder, or a classifier .pt file beside its meta.json (or the run's config.yaml).

A URI that names nothing loadable fails with ModelNotFound saying what does exist there: the
run's artifacts, or the registry's models with their versions and aliases. `locate_model` says so
before torch loads (commands call it first); in a local SQLite store it reads MLflow's tables
directly, before MLflow itself loads, so a run or model that is not there answers in well under a second.
"""
from __future__ import annotations

import json
import re
import sqlite3
import tempfile
from pathlib import Path

from skinclr import names
from skinclr.config import load_config
from skinclr.track import store


class ModelNotFound(ValueError):
    """A model URI or path that names nothing loadable; the message says what does exist."""


def locate_model(uri: str | Path) -> tuple[str, str | None, Path | None]:
    """Where a model URI points, checked without loading anything heavy: (artifact URI, its run
    id, None) for `runs:/` and `models:/`, ("", None, path) for a file or folder."""
    uri = str(uri)
    absent = _absent_from_sqlite(uri)
    if absent:
        raise ModelNotFound(absent)
    if uri.startswith("runs:/"):
        run_id, artifact = _parse_runs_uri(uri)
        return f"runs:/{run_id}/{artifact}", run_id, None
    if uri.startswith("models:/"):
        return uri, _model_version(uri).run_id, None
    path = Path(uri).expanduser()
    if path.exists():
        return "", None, path
    raise ModelNotFound(f"model '{uri}': no such file or folder; give models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "runs:/RUN_ID/model, a pyfunc folder or a classifier .pt file")


def load_predictor(uri: str | Path, tta: str | None = None):
    """A Predictor from `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID[/model]`, a
    pyfunc folder, or a classifier .pt file beside its meta.json (or the run's config.yaml).
    `tta` overrides the test-time augmentation the model was saved with."""
    from skinclr.serve.predictor import Predictor

    artifact, run_id, path = locate_model(uri)
    if artifact:
        with tempfile.TemporaryDirectory() as tmp:
            return _from_folder(_download(artifact, tmp), run_id, str(uri), tta)
    if path.is_dir():
        return _from_folder(path, None, str(uri), tta)
    return Predictor(_state_dict_from_file(path), _meta_beside(path), None, str(uri), tta)


def _absent_from_sqlite(uri: str) -> str:
    """Why a `runs:/` or `models:/` URI names nothing in the local SQLite store, read with plain
    SQL (no MLflow import); "" when it may exist or this cannot tell (a server, an unreadable
    file, a stage name): MLflow then decides."""
    db = store.sqlite_path()
    if db is None:
        return ""
    where = store.tracking_uri()
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].strip("/").partition("/")[0]
        runs = _query(db, "select run_uuid from runs where run_uuid = ?", (run_id,))
        if runs == []:
            return f"model '{uri}': no run {run_id!r} in the tracking store {where}; check the run id and MLFLOW_TRACKING_URI"
        return ""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
    if match is None:
        return ""
    name, alias, version = match.groups()
    models = _query(db, "select name from registered_models order by name")
    versions = _query(db, "select name, version from model_versions")
    aliases = _query(db, "select name, alias, version from registered_model_aliases")
    if models is None or versions is None or aliases is None:
        return ""
    models = [row[0] for row in models]
    if name not in models:
        why = f"Registered Model with name={name} not found"
    elif alias is not None and alias not in {a for n, a, _ in aliases if n == name}:
        why = f"Registered model alias {alias} not found."
    elif version is not None and (name, int(version)) not in {(n, int(v)) for n, v in versions}:
        why = f"Model Version (name={name}, version={version}) not found"
    else:
        return ""
    return f"model '{uri}' not found in the registry at {where} ({why}); registered: {_listing(models, versions, aliases)}"


def _query(db: Path, sql: str, args: tuple = ()) -> list[tuple] | None:
    """Rows of a read-only query on an MLflow SQLite store: [] when the file does not exist yet,
    None when it cannot be read as one."""
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return list(con.execute(sql, args))
    except sqlite3.Error:
        return None


def _listing(models: list[str], versions: list[tuple], aliases: list[tuple]) -> str:
    """Registered names with their versions and aliases, as `_registered` writes them."""
    if not models:
        return "none (register one with `skinclr promote`)"
    parts = []
    for name in models:
        numbers = sorted(int(v) for n, v in versions if n == name)
        named = ", ".join(f"@{a}->v{v}" for n, a, v in sorted(aliases) if n == name)
        parts.append(f"{name} (versions {', '.join(map(str, numbers)) or 'none'}{'; aliases ' + named if named else ''})")
    return "; ".join(parts)


def _parse_runs_uri(uri: str) -> tuple[str, str]:
    from mlflow.exceptions import MlflowException

    from skinclr.track import tracking
    from skinclr.track.candidates import logged_model

    run_id, _, artifact = uri[len("runs:/"):].strip("/").partition("/")
    artifact = artifact or names.MODEL_ARTIFACT
    c = tracking.client()
    try:
        run = c.get_run(run_id)
        logged = [a.path for a in c.list_artifacts(run_id)]
    except MlflowException:
        raise ModelNotFound(f"model '{uri}': no run {run_id!r} in the tracking store {store.tracking_uri()}; "
                            "check the run id and MLFLOW_TRACKING_URI") from None
    top = artifact.split("/")[0]
    if top not in logged and not (top == names.MODEL_ARTIFACT and logged_model(c, run_id, run) is not None):
        raise ModelNotFound(f"model '{uri}': run {run_id} has no '{artifact}' artifact (it has: "
                            f"{', '.join(logged) or 'nothing'}); only fine-tune runs log a model")
    return run_id, artifact


def _model_version(uri: str):
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from skinclr.track import tracking

    c = tracking.client()
    try:
        name, version = get_model_name_and_version(c, uri)
        return c.get_model_version(name, version)
    except MlflowException as err:
        raise ModelNotFound(f"model '{uri}' not found in the registry at {store.tracking_uri()} "
                            f"({str(err).splitlines()[0]}); registered: {_registered(c)}") from None


def _registered(c) -> str:
    """Registered names with their versions and aliases, for error messages."""
    models = c.search_registered_models()
    versions = [(m.name, v.version) for m in models for v in c.search_model_versions(f"name='{m.name}'")]
    aliases = [(m.name, alias, version) for m in models for alias, version in m.aliases.items()]
    return _listing(sorted(m.name for m in models), versions, aliases)


def _download(uri: str, dst: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst,
                                                    tracking_uri=store.tracking_uri()))


def _from_folder(folder: Path, run_id: str | None, uri: str, tta: str | None = None):
    """A pyfunc folder (weights in artifacts/, or an ensemble's folder there) or a folder holding
    the two files (or an ensemble's) itself."""
    from skinclr.serve.predictor import Predictor, is_ensemble, load_ensemble

    for sub in (folder / "artifacts", folder, folder / "artifacts" / "ensemble"):
        if (sub / names.WEIGHTS_FILE).is_file() and (sub / names.META_FILE).is_file():
            return Predictor.from_files(sub / names.WEIGHTS_FILE, sub / names.META_FILE, run_id, uri, tta)
        if is_ensemble(sub):
            return load_ensemble(sub, run_id, uri, tta)
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise ModelNotFound(f"model '{uri}': {folder} is not a skinclr model folder (no {names.WEIGHTS_FILE} and {names.META_FILE}; "
                        f"it holds {found})")


def _state_dict_from_file(path: Path) -> dict:
    """A classifier state_dict, or a fine-tune checkpoint holding one (its best model if it has one)."""
    import torch

    from skinclr.serve.predictor import load_weights
    from skinclr.train.models import ModelError

    obj = load_weights(path)
    if isinstance(obj, dict):
        for key in ("best_model", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ModelError(f"{path} holds no classifier state_dict (nor a fine-tune checkpoint with one)")


def _meta_beside(path: Path) -> dict:
    """The meta of a bare weights file: meta.json next to it, or the run's resolved config.yaml."""
    if (path.parent / names.META_FILE).is_file():
        return json.loads((path.parent / names.META_FILE).read_text())
    if (path.parent / names.CONFIG_ARTIFACT).is_file():
        from skinclr.serve.predictor import model_meta

        cfg = load_config(path.parent / names.CONFIG_ARTIFACT)
        return model_meta(cfg.model.backbone, cfg.data.image_size, cfg.data.aspect, cfg.finetune.tta)
    raise ModelNotFound(f"model '{path}': a weights file needs its {names.META_FILE} (or the run's config.yaml) in the same "
                        "folder to know its backbone, input size and aspect; download the run's 'model/artifacts/' "
                        "folder whole, or use runs:/RUN_ID/model")
