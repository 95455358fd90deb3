"""A run's inputs, resolved once: folder -> manifest -> lesion-grouped split -> decoded cache.

A single run resolves them from the dataset folder (`resolve_inputs`). A sweep's driver does
that once and writes the outcome down (`save_inputs`: the manifest, the split, the cache's
location and key, the fingerprints); its trials open that file (`open_inputs`) and never scan
the folder again. A trial on a node without the decoded cache builds it from the manifest's
files, which a cluster keeps at the same path on every node.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from skinclr.data.cache import SPLITS, CachedDataset, ImageCache, build_cache, cache_root
from skinclr.config import Config, ConfigError
from skinclr.data.manifest import Manifest, read_manifest
from skinclr.data.problems import DataError
from skinclr.data.split import (check_split, label_fingerprint, label_subset, load_split, save_split, side_fingerprint,
                                remembered_split, split_fingerprint, test_fingerprint)
from skinclr import names

INPUTS_VERSION = 1  # bump when the resolved-inputs file changes shape


@dataclass
class Inputs:
    manifest: Manifest
    split: pd.DataFrame  # manifest.frame + column "split" (+ "labelled" under data.label_fraction < 1)
    cache: ImageCache
    train_rows: np.ndarray  # cache rows of the train split (its labelled subset, when there is one)
    val_rows: np.ndarray
    missing_classes: tuple[str, ...] = ()  # classes with no image at all (data.min_per_class 0)
    test_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # data.test_fraction's

    @property
    def split_fingerprint(self) -> str:
        return split_fingerprint(self.split)

    @property
    def train_labels(self) -> np.ndarray:
        return self.cache.labels[self.train_rows]

    @property
    def val_labels(self) -> np.ndarray:
        return self.cache.labels[self.val_rows]

    @property
    def label_fingerprint(self) -> str:
        return label_fingerprint(self.split)

    def tags(self) -> dict[str, str]:
        tags = {names.DATA_FINGERPRINT_TAG: self.manifest.fingerprint, names.SPLIT_FINGERPRINT_TAG: self.split_fingerprint,
                names.DATA_ROOT_TAG: str(self.manifest.root)}
        if "labelled" in self.split:
            tags[names.LABEL_FINGERPRINT_TAG] = self.label_fingerprint
            tags[names.TRAIN_IMAGES_TAG] = str(len(self.train_rows))
        if len(self.test_rows):
            tags[names.TEST_FINGERPRINT_TAG] = test_fingerprint(self.split)
            tags[names.TEST_IMAGES_TAG] = str(len(self.test_rows))
        if self.missing_classes:
            tags[names.MISSING_CLASSES_TAG] = ",".join(self.missing_classes)
        return tags

    def example_path(self) -> str:
        """The image a model trained on these inputs ships as its input example: the first of the val side."""
        val = self.split.loc[self.split["split"] == "val", "path"]
        return str(val.iloc[0] if len(val) else self.split["path"].iloc[0])

    def sides(self) -> list[dict]:
        """What a run learned from and was checked on, one entry per side (train, val, test where
        there is one): its name, fingerprint, folder, MLflow context and a profile (images per class)."""
        out = []
        for part, rows in (("train", self.train_rows), ("val", self.val_rows), ("test", self.test_rows)):
            if len(rows):
                counts = np.bincount(self.cache.labels[rows], minlength=len(names.CLASSES))
                out.append({"name": f"{self.manifest.root.name} {part}", "digest": side_fingerprint(self.split, part),
                            "source": str(self.manifest.root), "context": names.DATASET_CONTEXTS[part],
                            "profile": {"images": int(len(rows)), "per_class": dict(zip(names.CLASSES, counts.tolist())),
                                        "data_fingerprint": self.manifest.fingerprint,
                                        "split_fingerprint": self.split_fingerprint}})
        return out


def resolve_inputs(cfg: Config, progress: bool = True) -> Inputs:
    """Read the dataset folder, split it and decode it: what a run does that no driver resolved for."""
    if not cfg.data.root:
        raise ConfigError("config key 'data.root' is empty: set it to a dataset folder in the official "
                          "ISIC 2018 layout (e.g. --set data.root=path/to/isic), or make one with `skinclr data synth`")
    manifest = read_manifest(cfg.data.root)
    return assemble(cfg, manifest, split_of(cfg, manifest), progress)


def split_of(cfg: Config, manifest: Manifest) -> pd.DataFrame:
    """The config's split of a manifest: its split file, or a fresh lesion-grouped split (which
    the first run writes to `data.split_file`, for later runs to share)."""
    d = cfg.data
    if d.split_file and Path(d.split_file).exists() and not Path(d.split_file).is_file():
        raise DataError(f"data.split_file {d.split_file} is a folder, not a split file; name a CSV file "
                        "(written by the first run that uses it)")
    if d.split_file and Path(d.split_file).is_file():
        split = load_split(d.split_file, manifest)
        if d.test_fraction and not (split["split"] == "test").any():
            raise DataError(f"data.split_file {d.split_file} holds no test images but data.test_fraction is "
                            f"{d.test_fraction}: remove the file to draw a split with a test side, or set "
                            "data.test_fraction=0 to use it as it is")
        return split
    split = remembered_split(manifest, cache_root(d.cache_dir) / SPLITS, val_fraction=d.val_fraction,
                             seed=d.split_seed, folds=d.folds, fold=d.fold, test_fraction=d.test_fraction,
                             test_seed=d.test_seed)
    if d.split_file:
        Path(d.split_file).parent.mkdir(parents=True, exist_ok=True)
        save_split(split, d.split_file)
    return split


def assemble(cfg: Config, manifest: Manifest, split: pd.DataFrame, progress: bool) -> Inputs:
    """From a split on: the checks, the labelled subset and the decoded cache (built once per key)."""
    d = cfg.data
    missing = tuple(check_split(split, d.min_per_class))
    if cfg.stage == "finetune" and d.label_fraction < 1.0:  # pretraining uses no labels: it keeps all
        split = label_subset(split, d.label_fraction, cfg.train.seed if d.label_seed < 0 else d.label_seed)
    cache = build_cache(manifest, d.image_size, d.aspect, cache_dir=d.cache_dir or None, progress=progress)
    train = (split["split"] == "train") & split.get("labelled", True)
    train_rows = cache.rows(split.loc[train, "image"].tolist())
    val_rows = cache.rows(split.loc[split["split"] == "val", "image"].tolist())
    test_rows = cache.rows(split.loc[split["split"] == "test", "image"].tolist())
    return Inputs(manifest, split, cache, train_rows, val_rows, missing, test_rows)


# ---------------------------------------------------------------------------------------------
# The resolved-inputs file: a driver resolves once, its trials open what it wrote


def save_inputs(inputs: Inputs, folder: str | Path) -> Path:
    """Write `folder/split.csv` and, beside it, the resolved-inputs file; return the split file.

    The split is stored as it came from the folder, before any labelled subset: each trial draws
    its own from its own `data.label_fraction` and seed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    split_file = save_split(inputs.split, folder / "split.csv")
    m, frame = inputs.manifest, inputs.manifest.frame
    part = inputs.split.set_index("image").loc[frame["image"], "split"]
    doc = {
        "version": INPUTS_VERSION,
        "manifest": {"root": str(m.root), "layout": m.layout, "warnings": list(m.warnings), "fingerprint": m.fingerprint,
                     "image": frame["image"].tolist(), "path": frame["path"].tolist(),
                     "label": [int(v) for v in frame["label"]],
                     "lesion_id": [None if pd.isna(v) else str(v) for v in frame["lesion_id"]]},
        "split": {"file": str(split_file), "fingerprint": inputs.split_fingerprint, "part": part.tolist()},
        "cache": {"dir": str(inputs.cache.path.parent), "key": inputs.cache.key},  # where the trials find the pixels
    }
    tmp = folder / f".{names.INPUTS_FILE}.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(folder / names.INPUTS_FILE)  # whole or absent: a trial never reads half of it
    return split_file


def open_inputs(cfg: Config, path: str | Path, progress: bool = False) -> Inputs:
    """A trial's inputs from its driver's resolved-inputs file, without reading the folder.

    The stored split serves a trial that pins the driver's split file; a trial that varies the
    split (folds, seeds) splits the stored manifest itself. A trial on other data than the
    driver's resolves its own."""
    doc = json.loads(Path(path).read_text())
    if doc.get("version") != INPUTS_VERSION:
        raise DataError(f"{path}: resolved inputs of version {doc.get('version')}, not {INPUTS_VERSION}; "
                        "start the sweep again")
    m = doc["manifest"]
    if not cfg.data.root or Path(cfg.data.root).expanduser().resolve() != Path(m["root"]):
        return resolve_inputs(cfg, progress)
    frame = pd.DataFrame({"image": m["image"], "path": m["path"], "label": np.asarray(m["label"], dtype=np.int64),
                          "lesion_id": pd.Series(m["lesion_id"], dtype=object)})
    manifest = Manifest(frame, Path(m["root"]), m["layout"], list(m["warnings"]), m["fingerprint"])
    if cfg.data.split_file == doc["split"]["file"]:
        split = frame.assign(split=doc["split"]["part"])
        if split_fingerprint(split) != doc["split"]["fingerprint"]:
            raise DataError(f"{path}: its split does not match its fingerprint; start the sweep again")
    else:
        split = split_of(cfg, manifest)
    return assemble(cfg, manifest, split, progress)


def load_inputs(cfg: Config, resolved: str | Path | None = None, progress: bool = True) -> Inputs:
    """The driver's resolved inputs when there are some, else the run's own from the folder."""
    return open_inputs(cfg, resolved, progress) if resolved else resolve_inputs(cfg, progress)


# ---------------------------------------------------------------------------------------------
# Loaders


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32  # torch derives it from the loader's generator: fixed by (seed, epoch)
    np.random.seed(seed)  # torch seeds itself and `random` per worker, but not NumPy
    random.seed(seed)  # (augment.Pipeline reseeds its own generator from the same worker seed)


def make_loader(cache: ImageCache, rows: np.ndarray, transform, *, batch_size: int, seed: int, epoch: int = 0,
                shuffle: bool = False, drop_last: bool = False, workers: int = 0, sampler=None,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A loader whose order and augmentation depend only on (seed, epoch): resuming at epoch e
    replays exactly what an uninterrupted run would have seen."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if workers == 0 and hasattr(transform, "set_random_seed"):  # in-process: seed it here
        transform.set_random_seed(seed * 100_003 + epoch)
    dataset = CachedDataset(cache, rows, transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        drop_last=drop_last, num_workers=workers, generator=generator, worker_init_fn=_seed_worker,
        pin_memory=pin_memory, persistent_workers=False)
