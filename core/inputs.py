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
from core.data import Manifest, load_split, read_manifest, save_split, split_by_lesion, split_fingerprint


@dataclass
class Inputs:
    manifest: Manifest
    split: pd.DataFrame  # manifest.frame + column "split"
    cache: ImageCache
    train_rows: np.ndarray  # cache rows of the train split
    val_rows: np.ndarray

    @property
    def split_fingerprint(self) -> str:
        return split_fingerprint(self.split)

    @property
    def train_labels(self) -> np.ndarray:
        return self.cache.labels[self.train_rows]

    @property
    def val_labels(self) -> np.ndarray:
        return self.cache.labels[self.val_rows]

    def tags(self) -> dict[str, str]:
        return {"data_fingerprint": self.manifest.fingerprint, "split_fingerprint": self.split_fingerprint,
                "data_root": str(self.manifest.root)}


def resolve_inputs(cfg: Config, progress: bool = True) -> Inputs:
    if not cfg.data.root:
        raise ConfigError("config key 'data.root' is empty: set it to a dataset folder in the official "
                          "ISIC 2018 layout (e.g. --set data.root=path/to/isic), or make one with `skinclr data synth`")
    manifest = read_manifest(cfg.data.root)
    if cfg.data.split_file and Path(cfg.data.split_file).is_file():
        split = load_split(cfg.data.split_file, manifest)
    else:
        split = split_by_lesion(manifest, cfg.data.val_fraction, cfg.data.split_seed)
        if cfg.data.split_file:  # the first run writes the split that later runs share
            Path(cfg.data.split_file).parent.mkdir(parents=True, exist_ok=True)
            save_split(split, cfg.data.split_file)
    cache = build_cache(manifest, cfg.data.image_size, cfg.data.aspect,
                        cache_dir=cfg.data.cache_dir or None, progress=progress)
    train_rows = cache.rows(split.loc[split["split"] == "train", "image"].tolist())
    val_rows = cache.rows(split.loc[split["split"] == "val", "image"].tolist())
    return Inputs(manifest, split, cache, train_rows, val_rows)


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
