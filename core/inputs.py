"""A run's inputs, resolved once: folder -> manifest -> lesion-grouped split -> decoded cache.

Nothing downstream reads the dataset folder again; training, evaluation and sweep trials
all take these arrays.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.cache import CachedDataset, ImageCache, build_cache
from core.config import Config, ConfigError
from core.data import (Manifest, check_split, label_fingerprint, label_subset, load_split, read_manifest, save_split,
                       split_by_lesion, split_fingerprint)
from core import names


@dataclass
class Inputs:
    manifest: Manifest
    split: pd.DataFrame  # manifest.frame + column "split" (+ "labelled" under data.label_fraction < 1)
    cache: ImageCache
    train_rows: np.ndarray  # cache rows of the train split (its labelled subset, when there is one)
    val_rows: np.ndarray
    missing_classes: tuple[str, ...] = ()  # classes with no image at all (data.min_per_class 0)

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
        if self.missing_classes:
            tags[names.MISSING_CLASSES_TAG] = ",".join(self.missing_classes)
        return tags


def resolve_inputs(cfg: Config, progress: bool = True) -> Inputs:
    if not cfg.data.root:
        raise ConfigError("config key 'data.root' is empty: set it to a dataset folder in the official "
                          "ISIC 2018 layout (e.g. --set data.root=path/to/isic), or make one with `skinclr data synth`")
    d = cfg.data
    manifest = read_manifest(d.root)
    if d.split_file and Path(d.split_file).is_file():
        split = load_split(d.split_file, manifest)
    else:
        split = split_by_lesion(manifest, d.val_fraction, d.split_seed, d.folds, d.fold)
        if d.split_file:  # the first run writes the split that later runs share
            Path(d.split_file).parent.mkdir(parents=True, exist_ok=True)
            save_split(split, d.split_file)
    missing = tuple(check_split(split, d.min_per_class))
    if cfg.stage == "finetune" and d.label_fraction < 1.0:  # pretraining uses no labels: it keeps all
        split = label_subset(split, d.label_fraction, cfg.train.seed if d.label_seed < 0 else d.label_seed)
    cache = build_cache(manifest, d.image_size, d.aspect, cache_dir=d.cache_dir or None, progress=progress)
    train = (split["split"] == "train") & split.get("labelled", True)
    train_rows = cache.rows(split.loc[train, "image"].tolist())
    val_rows = cache.rows(split.loc[split["split"] == "val", "image"].tolist())
    return Inputs(manifest, split, cache, train_rows, val_rows, missing)


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
