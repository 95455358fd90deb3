"""Decode once: every image of a manifest, resized to SxS, in one memory-mapped uint8 file.

JPEG decoding is the CPU bottleneck of training on a laptop; after the first build an epoch
reads pixels straight from the page cache. A cache directory is trusted only once its
`meta.json` exists, and it appears by an atomic rename, so a killed build is never read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skinclr.data.images import aspect_problem, fit_square
from skinclr.data.manifest import Manifest
from skinclr.runtime import lock
from skinclr.data.images import default_workers, load_rgb
from skinclr.data.problems import DataError

CACHE_VERSION = 1  # bump when the pixels a key stands for change (resize filter, policy)
CHUNK = 128  # images per worker task
SPLITS = "splits"  # the cache folder's one folder that is not an image cache: drawn splits (data/split.py)


def cache_root(cache_dir=None) -> Path:
    """The folder of the caches: `data.cache_dir` when set, else SKINCLR_CACHE or ~/.cache/skinclr."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("SKINCLR_CACHE") or Path.home() / ".cache" / "skinclr").expanduser()


@dataclass
class ImageCache:
    images: np.ndarray  # read-only memmap (N, S, S, 3) uint8, rows in manifest.frame order
    ids: list[str]
    labels: np.ndarray  # int64
    key: str
    path: Path  # the cache directory
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def rows(self, ids) -> np.ndarray:
        """Row indices of image ids."""
        if not self._index:
            self._index = {image: i for i, image in enumerate(self.ids)}
        ids = list(ids)
        unknown = [i for i in ids if i not in self._index]
        if unknown:
            raise DataError(f"{len(unknown)} image ids are not in the cache at {self.path}: "
                            f"{', '.join(map(str, unknown[:5]))}; rebuild it from the same manifest")
        return np.fromiter((self._index[i] for i in ids), dtype=np.int64, count=len(ids))

    def __reduce__(self):  # reopen by path in the receiving process instead of copying the pixels
        return open_cache, (self.path,)


def cache_key(manifest: Manifest, size: int, aspect: str) -> str:
    return hashlib.sha256(f"{manifest.fingerprint}|{size}|{aspect}|{CACHE_VERSION}".encode()).hexdigest()[:16]


def open_cache(path) -> ImageCache:
    """A finished cache directory; DataError if it is not one."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        shape = tuple(meta["shape"])
        images = np.memmap(path / "images.u8", dtype=np.uint8, mode="r", shape=shape)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: not a usable image cache ({err}); delete the folder to rebuild it") from None
    return ImageCache(images, list(meta["ids"]), np.asarray(meta["labels"], dtype=np.int64), meta["key"], path)


def build_cache(manifest: Manifest, size: int, aspect: str = "center_crop", cache_dir=None,
                workers: int | None = None, progress: bool = True) -> ImageCache:
    """The manifest's images at SxS, decoded by a process pool on first use, reused after."""
    if problem := aspect_problem(aspect):
        raise DataError(problem)
    if size < 1:
        raise DataError(f"cache image size must be positive, got {size}")
    cache_dir = cache_root(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the image cache folder {cache_dir} ({err}); "
                        "set SKINCLR_CACHE to a writable folder") from None
    key = cache_key(manifest, size, aspect)
    final = cache_dir / key
    # One builder per key: a second process waits here, then finds the finished cache.
    with lock(cache_dir / f"{key}.lock", wait=math.inf, holder=f"the image cache {final}"):
        if (final / "meta.json").is_file():
            return open_cache(final)
        for stale in [final, *cache_dir.glob(f".{key}.tmp-*")]:  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, manifest, size, aspect, key, workers, progress)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(final)


def _build(tmp: Path, manifest: Manifest, size: int, aspect: str, key: str, workers: int | None,
           progress: bool) -> None:
    from tqdm.auto import tqdm

    frame = manifest.frame
    shape = (len(frame), size, size, 3)
    need = int(np.prod(shape))
    free = shutil.disk_usage(tmp.parent).free
    if need > free:
        raise DataError(f"the image cache needs {need / 2**20:.0f} MiB but {tmp.parent} has {free / 2**20:.0f} MiB "
                        "free; set SKINCLR_CACHE to a folder with more space")
    tmp.mkdir()
    data = tmp / "images.u8"
    with open(data, "wb") as f:
        f.truncate(need)
    paths = frame["path"].tolist()
    tasks = [(str(data), shape, start, paths[start:start + CHUNK], aspect) for start in range(0, len(paths), CHUNK)]
    workers = workers or default_workers()
    failures: list[str] = []
    with tqdm(total=len(paths), desc=f"caching {size}px", unit="img", disable=not progress) as bar:
        if workers <= 1 or len(paths) <= CHUNK:
            for task in tasks:
                failures += _fill(*task)
                bar.update(len(task[3]))
        else:
            with ProcessPoolExecutor(min(workers, len(tasks))) as pool:
                jobs = {pool.submit(_fill, *task): len(task[3]) for task in tasks}
                for job in as_completed(jobs):
                    failures += job.result()
                    bar.update(jobs[job])
    if failures:
        raise DataError(sorted(failures)[:20] + ([f"... and {len(failures) - 20} more"] if len(failures) > 20 else []))
    meta = {"key": key, "shape": list(shape), "fingerprint": manifest.fingerprint, "size": size, "aspect": aspect,
            "version": CACHE_VERSION, "ids": frame["image"].tolist(), "labels": frame["label"].astype(int).tolist()}
    (tmp / "meta.json").write_text(json.dumps(meta))  # last: its presence means the pixels are complete


def _fill(data: str, shape: tuple, start: int, paths: list[str], aspect: str) -> list[str]:
    """Worker: decode and resize a chunk into its rows of the memmap; messages of files that fail."""
    images = np.memmap(data, dtype=np.uint8, mode="r+", shape=shape)
    failures = []
    for i, path in enumerate(paths):
        try:
            images[start + i] = fit_square(load_rgb(path), shape[1], aspect)
        except DataError as err:
            failures.append(err.problems[0])
    images.flush()
    del images
    return failures


class CachedDataset(torch.utils.data.Dataset):
    """(transform(image), label) for some rows of a cache.

    Holds the file's path, not the array: a memmap pickles by copying, so each DataLoader
    worker opens its own map on first use.
    """

    def __init__(self, cache: ImageCache, rows=None, transform=None):
        self.file = cache.path / "images.u8"
        self.shape = tuple(cache.images.shape)
        self.rows = np.arange(self.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels = cache.labels[self.rows]
        self.transform = transform
        self._images = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self._images is None:
            self._images = np.memmap(self.file, dtype=np.uint8, mode="r", shape=self.shape)
        img = np.array(self._images[self.rows[i]])  # a private, writable copy for the augmentations
        return (self.transform(img) if self.transform else img), int(self.labels[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None
        return state
