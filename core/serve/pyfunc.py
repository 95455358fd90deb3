"""The servable model: a fine-tune run's classifier as an MLflow pyfunc model.

A fine-tune (or ensemble) run logs its classifier as an MLflow 3 logged model named `model`: the
run's Models column and the experiment's Models tab show it, `runs:/RUN_ID/model`, the registry
and `mlflow models serve` take it. Its `artifacts/` folder holds two plain files, the weights
(`classifier.pt`, a state_dict for `torch.load`) and a `meta.json` naming the backbone, input
size and aspect policy, so the model preprocesses the way its training data was cached whoever
loads it. Its signature says what REST clients send (base64 images in the column `image`) and
get (seven probabilities named by class); its input example is one of the run's own images.

The folder carries a copy of the library as `skinclr`: serving it needs neither this checkout
nor an install of it, and keeps the preprocessing code it was trained with. Models logged by
runs from before logged models are plain `model/` artifact folders and still load.
skinclr/serve/uris.py loads a model back by URI.
"""
from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import Model, ModelSignature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

import skinclr
from skinclr import names
from skinclr.train.models import ModelError, build_classifier
from skinclr.serve.predictor import Predictor, check_meta, load_ensemble, model_meta
from skinclr.track.candidates import logged_model
from skinclr.track.store import retrying
from skinclr.track.tracking import RunLogger

LIBRARY = Path(skinclr.__file__).resolve().parent  # the library's wings (core/), without tune and cli

REQUIREMENTS = ("torch", "torchvision", "albumentations", "mlflow", "pillow", "numpy", "pandas", "scikit-learn")


class SkinLesionClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: DataFrame column `image` (paths or base64 strings), a list of paths, or
    uint8 arrays -> DataFrame of the seven class probabilities."""

    def load_context(self, context) -> None:
        if "ensemble" in context.artifacts:  # several members (an ensemble: skinclr/serve/predictor.py)
            self.predictor = load_ensemble(Path(context.artifacts["ensemble"]))
        else:
            self.predictor = Predictor.from_files(context.artifacts["weights"], context.artifacts["meta"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame(self.predictor.predict_proba(model_input), columns=self.predictor.classes)


def _write_weights(folder: Path, state_dict: dict, backbone: str, image_size: int, aspect: str,
                   tta: str = "none", offsets=None) -> tuple[Path, Path]:
    """classifier.pt and meta.json, after checking that the weights load into that classifier."""
    meta = check_meta(model_meta(backbone, image_size, aspect, tta, offsets), "save_pyfunc")
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    try:
        build_classifier(backbone, num_classes=len(names.CLASSES)).load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(f"the state_dict to save does not fit a {backbone} classifier: {err}") from None
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / names.WEIGHTS_FILE)
    (folder / names.META_FILE).write_text(json.dumps(meta, indent=1))
    return folder / names.WEIGHTS_FILE, folder / names.META_FILE


def _input_example(image: str | Path | None = None) -> pd.DataFrame:
    """One image as REST clients send it (base64 in the column `image`): a real image of the run's
    data when given (shrunk to at most 256 px, so the example stays a few kilobytes), else a
    tiny plain square. MLflow scores it through the saved model, so a folder that cannot predict
    is never logged."""
    picture = Image.open(image).convert("RGB") if image else Image.fromarray(np.full((8, 8, 3), (150, 100, 80), np.uint8))
    picture.thumbnail((256, 256))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=90)
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def shipped_example(model_folder: Path, out: Path) -> Path | None:
    """The image a pyfunc folder ships as its input example, written to `out` (None if it has none):
    an ensemble shows its members' example."""
    try:
        frame = Model.load(model_folder).load_input_example(str(model_folder))
        out.write_bytes(base64.b64decode(frame["image"].iloc[0]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, mlflow.exceptions.MlflowException):
        return None
    return out


def signature() -> ModelSignature:
    """What REST clients send and get: a column `image` of base64-encoded image files (file paths
    also work in-process), and the seven class probabilities, named by class."""
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                          outputs=Schema([ColSpec("double", c) for c in names.CLASSES]))


def _requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def save_pyfunc(path: str | Path, state_dict: dict, backbone: str, image_size: int, aspect: str,
                tta: str = "none", offsets=None, example: str | Path | None = None) -> Path:
    """Write the pyfunc folder (MLmodel, weights, meta, a copy of the library as `skinclr`, pinned
    requirements): the folder loads where skinclr is not installed. `tta` is the test-time
    augmentation it predicts (and serves) with, `offsets` its decision rule (None: the argmax),
    `example` an image file shipped as its input example."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, meta = _write_weights(Path(tmp), state_dict, backbone, image_size, aspect, tta, offsets)
        with _flavor({"weights": str(weights), "meta": str(meta)}, example) as flavor:
            mlflow.pyfunc.save_model(str(path), **flavor)
    return Path(path)


@contextmanager
def _flavor(artifacts: dict[str, str], example: str | Path | None):
    """The pyfunc flavor's arguments: the files, a copy of the library as `skinclr` (tune and cli
    left out), the signature, an input example and pinned requirements."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    # MLflow warns that a Python object is pickled (this one holds no state: the weights are plain
    # files) and announces its input-example check at INFO: neither is news to a user.
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            library = shutil.copytree(LIBRARY, Path(tmp) / "skinclr",
                                      ignore=shutil.ignore_patterns("__pycache__", "tune", "cli"))
            yield dict(python_model=SkinLesionClassifier(), artifacts=artifacts, code_paths=[str(library)],
                       signature=signature(), input_example=_input_example(example), pip_requirements=_requirements())
    finally:
        pyfunc_log.setLevel(level)


def log_model(logger: RunLogger, state_dict: dict, backbone: str, image_size: int, aspect: str,
              tta: str = "none", offsets=None, example: str | Path | None = None, step: int = 0) -> str:
    """Log the classifier as the run's MLflow logged model `model` (the Models column and tab,
    `runs:/RUN_ID/model`); returns that URI. `step` is the epoch it comes from: the run's metrics
    at that step are linked to it. Logging again (a better epoch, its decision rule) replaces it:
    a run has one model."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, meta = _write_weights(Path(tmp), state_dict, backbone, image_size, aspect, tta, offsets)
        return _log(logger, {"weights": str(weights), "meta": str(meta)}, example, step)


def log_ensemble(logger: RunLogger, ensemble_folder: Path, example: str | Path | None = None) -> str:
    """Log an ensemble's folder (skinclr/serve/predictor.py) as the run's logged model `model`."""
    return _log(logger, {"ensemble": str(ensemble_folder)}, example, 0)


def _log(logger: RunLogger, artifacts: dict[str, str], example: str | Path | None, step: int) -> str:
    run = logger.run
    before = logged_model(logger.client, logger.run_id, run)
    # created here, in the run's experiment (MLflow's log_model would put it in the active one)
    model = retrying("logging the model", lambda: logger.client.create_logged_model(
        run.info.experiment_id, names.MODEL_ARTIFACT, source_run_id=logger.run_id, params=run.data.params))
    with _flavor(artifacts, example) as flavor:
        retrying("logging the model", lambda: Model.log(None, mlflow.pyfunc, name=names.MODEL_ARTIFACT, run_id=logger.run_id,
                                                         step=step, model_id=model.model_id, **flavor))
    if before is not None:  # the model it replaces, and its files (a ResNet-18's weights are ~45 MB)
        retrying("replacing the model", lambda: logger.client.delete_logged_model(before.model_id))
        with suppress(Exception):  # best effort: a store that cannot delete files keeps them, the model is gone
            get_artifact_repository(before.artifact_location).delete_artifacts()
    return f"runs:/{logger.run_id}/{names.MODEL_ARTIFACT}"
