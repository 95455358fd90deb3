"""Several classifiers as one model: the mean of their class probabilities.

Each image is decoded once and every member squares it its own way (size, aspect) and predicts
it; the members' probabilities are averaged with their weights, over the ensemble's own
test-time views, and the ensemble's decision rule, if it has one, decides. The members' own TTA
and rules are not used: the ensemble is one model with one setting of each.

On disk an ensemble is a folder: `ensemble.json` (the members' run ids and folders, their
weights, the ensemble's TTA and offsets) and `members/<i>/` holding each member's weights and
meta as a single model keeps them. The pyfunc model (skinclr/serve/pyfunc.py) carries that folder,
so the registry, `predict`, `evaluate` and the REST server take an ensemble like any model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
import numpy as np

from skinclr import names
from skinclr.serve.predictor import Predictor, check_meta
from skinclr.train.models import ModelError

ENSEMBLE_FILE = "ensemble.json"


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
