"""One model or an ensemble, with its preprocessing: class probabilities of images, what
evaluation, prediction and the served pyfunc all call.

A model is its weights and its meta (backbone, input size, aspect policy, classes): the meta says
how to square an image exactly as the training cache did, so predictions match training.

An ensemble is several classifiers as one model, the mean of their class probabilities: each
image is decoded once and every member squares it its own way (size, aspect) and predicts it; the
members' probabilities are averaged with their weights, over the ensemble's own test-time views,
and the ensemble's decision rule, if it has one, decides. The members' own TTA and rules are not
used: the ensemble is one model with one setting of each. On disk it is a folder:
`ensemble.json` (the members' run ids and folders, their weights, the ensemble's TTA and offsets)
and `members/<i>/` holding each member's weights and meta as a single model keeps them. The
pyfunc model (skinclr/serve/pyfunc.py) carries that folder, so the registry, `predict`,
`evaluate` and the REST server take an ensemble like any model.
"""
from __future__ import annotations

import json
import pickle
import shutil
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
ENSEMBLE_FILE = "ensemble.json"


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


class EnsemblePredictor(Predictor):
    """A Predictor over several members: its TTA, decision rule and prediction are Predictor's;
    only the probabilities before them are the members' weighted mean (so there is no single
    model to load, and Predictor.__init__ is not called)."""

    def __init__(self, members: list[Predictor], weights: list[float] | None = None, tta: str = "none",
                 offsets=None, sources: list[str | None] | None = None, run_id: str | None = None, uri: str = ""):
        if not members:
            raise ModelError("an ensemble needs at least one member")
        weights = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(weights) != len(members) or not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum()):
            raise ModelError(f"ensemble weights {weights.tolist()} must be {len(members)} non-negative numbers, not all 0")
        self.members, self.weights = members, weights / weights.sum()
        self.run_id, self.uri = run_id, uri
        first = members[0].meta
        self.meta = check_meta({"backbone": first["backbone"], "image_size": first["image_size"], "aspect": first["aspect"],
                                "classes": list(names.CLASSES), "tta": tta, "ensemble": list(sources or [None] * len(members)),
                                "weights": [round(float(w), 6) for w in self.weights],
                                **({"offsets": [round(float(v), 6) for v in offsets]} if offsets is not None else {})},
                               uri or "the ensemble")

    def raw_probs(self, rgbs: list[np.ndarray], tta: str) -> np.ndarray:
        return sum(w * m.raw_probs(rgbs, tta) for w, m in zip(self.weights, self.members))

    def with_offsets(self, offsets) -> EnsemblePredictor:
        """The same members, weights and TTA, with this decision rule."""
        return EnsemblePredictor(self.members, self.weights.tolist(), self.tta, offsets, self.meta["ensemble"],
                                 self.run_id, self.uri)


def is_ensemble(folder: Path) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


def load_ensemble(folder: Path, run_id: str | None = None, uri: str = "", tta: str | None = None) -> EnsemblePredictor:
    """An ensemble folder back as a predictor; `tta` overrides the ensemble's own."""
    folder = Path(folder)
    doc = json.loads((folder / ENSEMBLE_FILE).read_text())
    members = [Predictor.from_files(folder / m["path"] / names.WEIGHTS_FILE, folder / m["path"] / names.META_FILE,
                                    m.get("run_id"), f"{uri or folder} member {i}") for i, m in enumerate(doc["members"])]
    return EnsemblePredictor(members, doc["weights"], tta or doc["tta"], doc.get("offsets"),
                             [m.get("run_id") for m in doc["members"]], run_id, uri or str(folder))


def write_ensemble(folder: Path, member_folders: list[Path], sources: list[str | None], weights: list[float],
                   tta: str = "none", offsets=None) -> Path:
    """The ensemble folder: each member's weights and meta copied under members/<i>/, and ensemble.json."""
    folder = Path(folder)
    members = []
    for i, (src, run_id) in enumerate(zip(member_folders, sources)):
        dst = folder / "members" / str(i)
        dst.mkdir(parents=True, exist_ok=True)
        for name in (names.WEIGHTS_FILE, names.META_FILE):
            shutil.copyfile(Path(src) / name, dst / name)
        members.append({"run_id": run_id, "path": f"members/{i}"})
    doc = {"members": members, "weights": [float(w) for w in weights], "tta": tta,
           "offsets": None if offsets is None else [float(v) for v in offsets], "classes": list(names.CLASSES)}
    (folder / ENSEMBLE_FILE).write_text(json.dumps(doc, indent=1))
    return folder
