"""The servable model: image files or encoded images in, seven class probabilities out.

A fine-tune run logs its classifier once, as an MLflow pyfunc folder under the artifact path
`model` (what `mlflow.pyfunc.load_model`, the model registry and `mlflow models serve` take).
Its `artifacts/` folder holds two plain files, the weights (`classifier.pt`, a state_dict for
`torch.load`) and a `meta.json` naming the backbone, input size and aspect policy, so the model
preprocesses the way its training data was cached whoever loads it.

The pyfunc folder is written with `mlflow.pyfunc.save_model` and uploaded as plain artifacts
(no active run, no LoggedModel), and it carries a copy of the `core` package: serving it needs
neither this checkout nor an install of it, and keeps the preprocessing code it was trained with.
"""
from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import json
import logging
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, Schema
from PIL import Image

from core import __version__, store, tracking
from core.augment import eval_transform
from core.aspect import ASPECTS, fit_square
from core.config import load_config
from core.images import DECODE_ERRORS, decode_image, load_rgb
from core.problems import DataError
from core.engine import infer
from core.models import BACKBONES, ModelError, build_classifier
from core.tracking import RunLogger
from core import names

BATCH_SIZE = 64
REQUIREMENTS = ("torch", "torchvision", "albumentations", "mlflow", "pillow", "numpy", "pandas", "scikit-learn")
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")


class ModelNotFound(ValueError):
    """A model URI or path that names nothing loadable; the message says what does exist."""


# ---------------------------------------------------------------------------------------------
# Inputs


def _as_items(images: Any) -> list:
    """A batch of images as a list, from every form the model accepts."""
    if isinstance(images, pd.DataFrame):
        if "image" not in images.columns:
            raise DataError(f"input DataFrame has columns {list(images.columns)}; it needs a column 'image' "
                            "holding file paths or base64-encoded JPEG/PNG strings")
        return images["image"].tolist()
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        if images.ndim == 3:
            return [images]
        raise DataError(f"an image array must be HxWx3 or NxHxWx3 uint8, got shape {images.shape}")
    if isinstance(images, (str, Path, bytes, bytearray)):
        return [images]
    return list(images)


def decode_input(item: Any, index: int = 0) -> np.ndarray:
    """One input image as an HxWx3 uint8 RGB array.

    An array is taken as it is; a string is a file path when such a file exists or it does not
    look like base64, else base64 of an encoded image (the form images take over REST); bytes
    are an encoded image. Files go through the data layer, so a broken one fails as in training.
    """
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise DataError(f"image {index}: expected a uint8 HxWx3 RGB array, got {item.dtype} of shape {item.shape}")
        return np.ascontiguousarray(item)
    if isinstance(item, Path):
        return load_rgb(item)
    if isinstance(item, str):
        if not _BASE64.fullmatch(item) or _is_file(item):
            return load_rgb(item)
        try:
            data = base64.b64decode(item, validate=False)
        except binascii.Error as err:
            raise DataError(f"image {index}: {item[:40]!r}... is neither an existing file nor valid base64 "
                            f"({err})") from None
        return _decode_bytes(data, f"image {index} (base64, {len(item)} characters)")
    if isinstance(item, (bytes, bytearray)):
        return _decode_bytes(bytes(item), f"image {index} ({len(item)} bytes)")
    raise DataError(f"image {index}: a {type(item).__name__}; give a file path, a base64-encoded JPEG/PNG string, "
                    "encoded image bytes or a uint8 HxWx3 array")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a base64 string longer than a file name may be
        return False


def _decode_bytes(data: bytes, name: str) -> np.ndarray:
    try:
        return decode_image(io.BytesIO(data))
    except DECODE_ERRORS as err:
        raise DataError(f"{name}: not a readable image ({err}); send a whole JPEG or PNG file, base64-encoded, "
                        "or a path to an existing file") from None


# ---------------------------------------------------------------------------------------------
# The model in memory


class Predictor:
    """A classifier with its preprocessing: what evaluation, prediction and the pyfunc all call."""

    def __init__(self, state_dict: dict, meta: dict, run_id: str | None = None, uri: str = ""):
        self.meta = _check_meta(meta, uri or "the given meta")
        self.run_id = run_id
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_classifier(self.meta["backbone"], num_classes=len(self.meta["classes"]))
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
            raise ModelError(f"weights of {uri or 'the model'} do not fit a {self.meta['backbone']} "
                             f"classifier: {err}") from None
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.size = self.meta["image_size"]
        self.transform = eval_transform(self.size)

    @classmethod
    def from_files(cls, weights: str | Path, meta: str | Path, run_id: str | None = None, uri: str = "") -> Predictor:
        return cls(load_weights(Path(weights)), json.loads(Path(meta).read_text()), run_id, uri or str(weights))

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Square it exactly as the training cache did, then the eval transform."""
        return self.transform(fit_square(rgb, self.size, self.meta["aspect"]))

    def _forward(self, batch: list[torch.Tensor]) -> np.ndarray:
        return infer(self.model, [torch.stack(batch)], self.device).double().softmax(1).numpy()

    def predict_proba(self, images: Any, batch_size: int = BATCH_SIZE, progress: bool = False) -> np.ndarray:
        """(N, 7) class probabilities in `classes` order; rows sum to 1.

        Every unreadable image is reported in one DataError, not just the first: decoding goes on
        after a failure (without the forward pass) so a folder with several broken files costs
        one round trip."""
        from tqdm.auto import tqdm

        items = _as_items(images)
        if not items:
            raise DataError("no images given")
        out, problems = [], []
        for start in tqdm(range(0, len(items), batch_size), desc="predicting", unit="batch", disable=not progress):
            batch = []
            for i, item in enumerate(items[start:start + batch_size], start):
                try:
                    batch.append(self.preprocess(decode_input(item, i)))
                except DataError as err:
                    problems += err.problems
            if not problems:
                out.append(self._forward(batch))
        if problems:
            raise DataError(problems)
        return np.concatenate(out)


def _check_meta(meta: dict, where: str) -> dict:
    missing = [k for k in ("backbone", "image_size", "aspect", "classes") if k not in meta]
    if missing:
        raise ModelError(f"{where}: model meta lacks {', '.join(missing)}; it was not written by skinclr's save_pyfunc")
    if meta["backbone"] not in BACKBONES:
        raise ModelError(f"{where}: unknown backbone {meta['backbone']!r}; known: {', '.join(BACKBONES)}")
    if meta["aspect"] not in ASPECTS:
        raise ModelError(f"{where}: aspect {meta['aspect']!r} is not one of {', '.join(ASPECTS)}")
    if tuple(meta["classes"]) != names.CLASSES:
        raise ModelError(f"{where}: classes {meta['classes']} differ from {list(names.CLASSES)}; skinclr evaluates the "
                         "seven ISIC 2018 classes in that order")
    return {**meta, "image_size": int(meta["image_size"])}


# ---------------------------------------------------------------------------------------------
# The MLflow pyfunc


class SkinLesionClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: DataFrame column `image` (paths or base64 strings), a list of paths, or
    uint8 arrays -> DataFrame of the seven class probabilities."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.from_files(context.artifacts["weights"], context.artifacts["meta"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame(self.predictor.predict_proba(model_input), columns=self.predictor.classes)


def _meta(backbone: str, image_size: int, aspect: str) -> dict:
    return {"backbone": backbone, "image_size": int(image_size), "aspect": aspect, "classes": list(names.CLASSES),
            "skinclr_version": __version__}


def _write_weights(folder: Path, state_dict: dict, backbone: str, image_size: int, aspect: str) -> tuple[Path, Path]:
    """classifier.pt and meta.json, after checking that the weights load into that classifier."""
    meta = _check_meta(_meta(backbone, image_size, aspect), "save_pyfunc")
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


def save_pyfunc(path: str | Path, state_dict: dict, backbone: str, image_size: int, aspect: str) -> Path:
    """Write the pyfunc folder (MLmodel, weights, meta, a copy of `core`, pinned requirements)."""
    path = Path(path)
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    # MLflow warns that a Python object is pickled (this one holds no state: the weights are plain
    # files) and announces its input-example check at INFO: neither is news to a user.
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            weights, meta = _write_weights(Path(tmp), state_dict, backbone, image_size, aspect)
            mlflow.pyfunc.save_model(
                str(path), python_model=SkinLesionClassifier(), artifacts={"weights": str(weights), "meta": str(meta)},
                code_paths=[str(Path(__file__).resolve().parent)], signature=signature(),
                input_example=_input_example(), pip_requirements=_requirements())
    finally:
        pyfunc_log.setLevel(level)
    return path


def log_model(logger: RunLogger, state_dict: dict, backbone: str, image_size: int, aspect: str) -> str:
    """Log the pyfunc under `model`; returns the model URI. Logging again (a better epoch)
    overwrites it in place."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pyfunc(Path(tmp) / names.MODEL_ARTIFACT, state_dict, backbone, image_size, aspect)
        logger.log_artifact(folder, names.MODEL_ARTIFACT)
    return f"runs:/{logger.run_id}/{names.MODEL_ARTIFACT}"


# ---------------------------------------------------------------------------------------------
# Loading by URI


def load_predictor(uri: str | Path) -> Predictor:
    """A Predictor from `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID[/model]`, a
    pyfunc folder, or a classifier .pt file beside its meta.json (or the run's config.yaml)."""
    uri = str(uri)
    if uri.startswith("runs:/"):
        run_id, artifact = _parse_runs_uri(uri)
        with tempfile.TemporaryDirectory() as tmp:
            return _from_folder(_download(f"runs:/{run_id}/{artifact}", tmp), run_id, uri)
    if uri.startswith("models:/"):
        version = _model_version(uri)
        with tempfile.TemporaryDirectory() as tmp:
            return _from_folder(_download(uri, tmp), version.run_id, uri)
    path = Path(uri).expanduser()
    if path.is_dir():
        return _from_folder(path, None, uri)
    if path.is_file():
        return Predictor(_state_dict_from_file(path), _meta_beside(path), None, uri)
    raise ModelNotFound(f"model '{uri}': no such file or folder; give models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "runs:/RUN_ID/model, a pyfunc folder or a classifier .pt file")


def _parse_runs_uri(uri: str) -> tuple[str, str]:
    run_id, _, artifact = uri[len("runs:/"):].strip("/").partition("/")
    artifact = artifact or names.MODEL_ARTIFACT
    try:
        logged = [a.path for a in tracking.client().list_artifacts(run_id)]
    except MlflowException:
        raise ModelNotFound(f"model '{uri}': no run {run_id!r} in the tracking store {store.tracking_uri()}; "
                            "check the run id and MLFLOW_TRACKING_URI") from None
    if artifact.split("/")[0] not in logged:
        raise ModelNotFound(f"model '{uri}': run {run_id} has no '{artifact}' artifact (it has: "
                            f"{', '.join(logged) or 'nothing'}); only fine-tune runs log a model")
    return run_id, artifact


def _model_version(uri: str):
    from mlflow.store.artifact.utils.models import get_model_name_and_version

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
    if not models:
        return "none (register one with `skinclr promote`)"
    parts = []
    for m in models:
        versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{m.name}'"))
        aliases = ", ".join(f"@{a}->v{v}" for a, v in sorted(m.aliases.items()))
        parts.append(f"{m.name} (versions {', '.join(map(str, versions)) or 'none'}"
                     f"{'; aliases ' + aliases if aliases else ''})")
    return "; ".join(parts)


def _download(uri: str, dst: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst,
                                                    tracking_uri=store.tracking_uri()))


def _from_folder(folder: Path, run_id: str | None, uri: str) -> Predictor:
    """A pyfunc folder (weights in artifacts/) or a folder holding the two files themselves."""
    for sub in (folder / "artifacts", folder):
        if (sub / names.WEIGHTS_FILE).is_file() and (sub / names.META_FILE).is_file():
            return Predictor.from_files(sub / names.WEIGHTS_FILE, sub / names.META_FILE, run_id, uri)
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise ModelNotFound(f"model '{uri}': {folder} is not a skinclr model folder (no {names.WEIGHTS_FILE} and {names.META_FILE}; "
                        f"it holds {found})")


def load_weights(path: Path) -> Any:
    """`torch.load` of tensors only; anything else is refused in words of our own (torch's own
    message advises loading arbitrary code, which skinclr never does)."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every way a file can fail to be plain weights
        if isinstance(err, (EOFError, RuntimeError)):
            reason = "it is empty, truncated or damaged"
        elif isinstance(err, pickle.UnpicklingError):
            reason = "it is not a weights file, or it holds Python objects besides tensors"
        else:
            reason = "it is not a weights file"
        raise ModelError(f"{path}: not a PyTorch weights file skinclr can load ({reason}); give models:/NAME@ALIAS, "
                         "runs:/RUN_ID/model, a pyfunc folder, or a state_dict saved with torch.save such as a "
                         "run's model/artifacts/classifier.pt") from None


def _state_dict_from_file(path: Path) -> dict:
    """A classifier state_dict, or a fine-tune checkpoint holding one (its best model if it has one)."""
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
        cfg = load_config(path.parent / names.CONFIG_ARTIFACT)
        return _meta(cfg.model.backbone, cfg.data.image_size, cfg.data.aspect)
    raise ModelNotFound(f"model '{path}': a weights file needs its {names.META_FILE} (or the run's config.yaml) in the same "
                        "folder to know its backbone, input size and aspect; download the run's 'model/artifacts/' "
                        "folder whole, or use runs:/RUN_ID/model")
