"""A classifier with its preprocessing: what evaluation, prediction and the served pyfunc all call.

A model is its weights and its meta (backbone, input size, aspect policy, classes): the meta says
how to square an image exactly as the training cache did, so predictions match training.
"""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from skinclr import __version__, names
from skinclr.data.images import aspect_problem, fit_square
from skinclr.train.augment import eval_transform
from skinclr.train.engine import TTA_VIEWS, infer
from skinclr.train.metrics import apply_offsets
from skinclr.data.images import decode_input
from skinclr.train.models import BACKBONES, ModelError, build_classifier
from skinclr.data.problems import DataError

BATCH_SIZE = 64


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


class Predictor:
    """A classifier with its preprocessing: what evaluation, prediction and the pyfunc all call."""

    def __init__(self, state_dict: dict, meta: dict, run_id: str | None = None, uri: str = "", tta: str | None = None):
        """`tta` overrides the test-time augmentation the model was saved with (its meta's)."""
        self.meta = check_meta({**meta, "tta": tta} if tta else meta, uri or "the given meta")
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
    def from_files(cls, weights: str | Path, meta: str | Path, run_id: str | None = None, uri: str = "",
                   tta: str | None = None) -> Predictor:
        return cls(load_weights(Path(weights)), json.loads(Path(meta).read_text()), run_id, uri or str(weights), tta)

    @property
    def tta(self) -> str:
        return self.meta["tta"]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Square it exactly as the training cache did, then the eval transform."""
        return self.transform(fit_square(rgb, self.size, self.meta["aspect"]))

    @property
    def offsets(self) -> list[float] | None:
        """The decision rule's per-class logit offsets, when the model was saved with one."""
        return self.meta.get("offsets")

    def raw_probs(self, rgbs: list[np.ndarray], tta: str) -> np.ndarray:
        """Class probabilities of decoded images, averaged over `tta`'s views, before any decision rule."""
        x = torch.stack([self.preprocess(rgb) for rgb in rgbs])
        return infer(self.model, [x], self.device, tta).double().softmax(1).numpy()

    def probs(self, rgbs: list[np.ndarray]) -> np.ndarray:
        """As this model predicts: its own TTA, then its decision rule."""
        probs = self.raw_probs(rgbs, self.tta)
        return probs if self.offsets is None else apply_offsets(probs, self.offsets)

    def predict_proba(self, images: Any, batch_size: int = BATCH_SIZE, progress: bool = False) -> np.ndarray:
        """(N, 7) class probabilities in `classes` order; rows sum to 1."""
        return predict_items(self.probs, images, batch_size, progress)


def predict_items(probs, images: Any, batch_size: int = BATCH_SIZE, progress: bool = False) -> np.ndarray:
    """`probs` (decoded images -> (n, 7) probabilities) over every form of input, a batch at a time.

    Each image is decoded once, whatever reads it. Every unreadable image is reported in one
    DataError, not just the first: decoding goes on after a failure (without the forward pass)
    so a folder with several broken files costs one round trip."""
    from tqdm.auto import tqdm

    items = _as_items(images)
    if not items:
        raise DataError("no images given")
    out, problems = [], []
    for start in tqdm(range(0, len(items), batch_size), desc="predicting", unit="batch", disable=not progress):
        batch = []
        for i, item in enumerate(items[start:start + batch_size], start):
            try:
                batch.append(decode_input(item, i))
            except DataError as err:
                problems += err.problems
        if not problems:
            out.append(probs(batch))
    if problems:
        raise DataError(problems)
    return np.concatenate(out)


def check_meta(meta: dict, where: str) -> dict:
    """A model meta that serving can use, its image size an int; ModelError naming `where` if not."""
    missing = [k for k in ("backbone", "image_size", "aspect", "classes") if k not in meta]
    if missing:
        raise ModelError(f"{where}: model meta lacks {', '.join(missing)}; it was not written by skinclr's save_pyfunc")
    if meta["backbone"] not in BACKBONES:
        raise ModelError(f"{where}: unknown backbone {meta['backbone']!r}; known: {', '.join(BACKBONES)}")
    if problem := aspect_problem(meta["aspect"]):
        raise ModelError(f"{where}: {problem}")
    offsets = meta.get("offsets")
    if offsets is not None and not (len(offsets) == len(names.CLASSES) and np.isfinite(offsets).all()):
        raise ModelError(f"{where}: decision-rule offsets {offsets!r} must be {len(names.CLASSES)} finite numbers")
    if meta.get("tta", "none") not in TTA_VIEWS:
        raise ModelError(f"{where}: test-time augmentation {meta['tta']!r} is not one of {', '.join(TTA_VIEWS)}")
    if tuple(meta["classes"]) != names.CLASSES:
        raise ModelError(f"{where}: classes {meta['classes']} differ from {list(names.CLASSES)}; skinclr evaluates the "
                         "seven ISIC 2018 classes in that order")
    return {**meta, "image_size": int(meta["image_size"]), "tta": meta.get("tta", "none")}  # saved before tta: none


def model_meta(backbone: str, image_size: int, aspect: str, tta: str = "none", offsets=None) -> dict:
    """The meta skinclr writes beside a model's weights: how it squares an image, its test-time
    augmentation, and its decision rule's per-class logit offsets (None: the plain argmax)."""
    meta = {"backbone": backbone, "image_size": int(image_size), "aspect": aspect, "classes": list(names.CLASSES),
            "tta": tta, "skinclr_version": __version__}
    if offsets is not None:
        meta["offsets"] = [round(float(v), 6) for v in offsets]
    return meta


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
