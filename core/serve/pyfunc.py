"""The servable model: a fine-tune run's classifier as an MLflow pyfunc folder.

A fine-tune run logs its classifier once, as an MLflow pyfunc folder under the artifact path
`model` (what `mlflow.pyfunc.load_model`, the model registry and `mlflow models serve` take).
Its `artifacts/` folder holds two plain files, the weights (`classifier.pt`, a state_dict for
`torch.load`) and a `meta.json` naming the backbone, input size and aspect policy, so the model
preprocesses the way its training data was cached whoever loads it.

The pyfunc folder is written with `mlflow.pyfunc.save_model` and uploaded as plain artifacts
(no active run, no LoggedModel), and it carries a copy of the `core` package: serving it needs
neither this checkout nor an install of it, and keeps the preprocessing code it was trained with.
core/serve/uris.py loads a model back by URI.
"""
from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, Schema
from PIL import Image

import skinclr
from skinclr import names
from skinclr.train.models import ModelError, build_classifier
from skinclr.serve.predictor import Predictor, check_meta, model_meta
from skinclr.track.tracking import RunLogger

LIBRARY = Path(skinclr.__file__).resolve().parent  # the library's wings (core/), without tune and cli

REQUIREMENTS = ("torch", "torchvision", "albumentations", "mlflow", "pillow", "numpy", "pandas", "scikit-learn")


class SkinLesionClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: DataFrame column `image` (paths or base64 strings), a list of paths, or
    uint8 arrays -> DataFrame of the seven class probabilities."""

    def load_context(self, context) -> None:
        if "ensemble" in context.artifacts:  # several members (skinclr/serve/ensemble.py)
            from skinclr.serve.ensemble import load_ensemble

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


def _input_example() -> pd.DataFrame:
    """A tiny base64 PNG: shows REST clients the input format, and passes the signature check."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), (150, 100, 80), dtype=np.uint8)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def signature() -> ModelSignature:
    """`image` is typed `any` so in-process callers may also pass uint8 arrays through the pyfunc."""
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), "image")]),
                          outputs=Schema([ColSpec("double", c) for c in names.CLASSES]))


def _requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def save_pyfunc(path: str | Path, state_dict: dict, backbone: str, image_size: int, aspect: str,
                tta: str = "none", offsets=None) -> Path:
    """Write the pyfunc folder (MLmodel, weights, meta, a copy of the library as `skinclr`, pinned
    requirements): the folder loads where skinclr is not installed. `tta` is the test-time
    augmentation it predicts (and serves) with, `offsets` its decision rule (None: the argmax)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, meta = _write_weights(Path(tmp), state_dict, backbone, image_size, aspect, tta, offsets)
        return _save(Path(path), {"weights": str(weights), "meta": str(meta)})


def save_ensemble_pyfunc(path: str | Path, ensemble_folder: Path) -> Path:
    """The pyfunc folder of an ensemble (skinclr/serve/ensemble.py): its folder is the one artifact."""
    return _save(Path(path), {"ensemble": str(ensemble_folder)})


def _save(path: Path, artifacts: dict[str, str]) -> Path:
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    # MLflow warns that a Python object is pickled (this one holds no state: the weights are plain
    # files) and announces its input-example check at INFO: neither is news to a user.
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            library = shutil.copytree(LIBRARY, Path(tmp) / "skinclr",
                                      ignore=shutil.ignore_patterns("__pycache__", "tune", "cli"))
            mlflow.pyfunc.save_model(str(path), python_model=SkinLesionClassifier(), artifacts=artifacts,
                                     code_paths=[str(library)], signature=signature(),
                                     input_example=_input_example(), pip_requirements=_requirements())
    finally:
        pyfunc_log.setLevel(level)
    return path


def log_model(logger: RunLogger, state_dict: dict, backbone: str, image_size: int, aspect: str,
              tta: str = "none", offsets=None) -> str:
    """Log the pyfunc under `model`; returns the model URI. Logging again (a better epoch)
    overwrites it in place."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pyfunc(Path(tmp) / names.MODEL_ARTIFACT, state_dict, backbone, image_size, aspect, tta, offsets)
        logger.log_artifact(folder, names.MODEL_ARTIFACT)
    return f"runs:/{logger.run_id}/{names.MODEL_ARTIFACT}"
