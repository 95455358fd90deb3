"""A dataset folder -> a validated manifest: every image, its label and lesion, named by a fingerprint.

Reading a folder reports every problem at once (core/data/problems.py); the folder may be in any of
the layouts of core/data/layouts.py. Nothing downstream reads the folder again: the split, the cache
and training all start from the manifest.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from skinclr.data.images import inspect_images
from skinclr.data.layouts import attach_files, read_labels
from skinclr.names import CLASSES
from skinclr.data.problems import DataError, Problems, relative


@dataclass
class Manifest:
    frame: pd.DataFrame  # image, path (absolute), label (index into CLASSES), lesion_id (str or NaN); sorted by image
    root: Path
    layout: str
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""  # short sha256 of sorted (image, label, file size, mtime): names the data in caches and logs

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.frame["label"].to_numpy(), minlength=len(CLASSES))
        return {name: int(c) for name, c in zip(CLASSES, counts)}

    def lesion_count(self) -> int | None:
        """Distinct lesions, an image without a lesion id counting as its own; None without groupings."""
        ids = self.frame["lesion_id"]
        if ids.isna().all():
            return None
        return int(ids.nunique() + ids.isna().sum())


def read_manifest(root, *, decode: bool = False, workers: int | None = None, progress: bool = False) -> Manifest:
    """The folder's images and labels; raises DataError listing every problem found."""
    manifest, problems, _ = _scan(Path(root), decode, workers, progress)
    if problems:
        raise DataError(problems)
    return manifest


def check_folder(root, workers: int | None = None,
                 progress: bool = True) -> tuple[Manifest | None, list[str], list[str]]:
    """Validate a folder down to every pixel: (manifest or None, problems, warnings)."""
    return _scan(Path(root), True, workers, progress)


def _scan(root: Path, decode: bool, workers: int | None, progress: bool):
    problems, warnings = Problems(), Problems()
    if not root.exists():
        return None, [f"{root}: path does not exist; pass the dataset folder"], []
    if not root.is_dir():
        return None, [f"{root}: is a file, not a folder; pass the folder that holds the ground-truth CSV"], []
    root = root.resolve()

    layout, table = read_labels(root, problems, warnings)
    if table is None:
        return None, problems.lines(), warnings.lines()
    frame = attach_files(root, layout, table, problems, warnings)

    if decode and len(frame):
        present = frame["path"].notna()
        unreadable, doubtful = inspect_images(frame.loc[present, "path"].tolist(), workers, progress)
        for path, reason in unreadable:
            problems.add("unreadable images", f"{relative(root, path)}: {reason}; replace the file or remove its row")
        for path, reason in doubtful:
            warnings.add("doubtful images", f"{relative(root, path)}: {reason}; check the file, or remove its row")

    if problems.kinds:
        return None, problems.lines(), warnings.lines()
    frame = frame.sort_values("image", ignore_index=True)
    _mixed_lesions(frame, warnings)
    absent = [name for name, n in zip(CLASSES, np.bincount(frame["label"], minlength=len(CLASSES))) if n == 0]
    if absent:
        warnings.add("missing classes", f"no images of class {', '.join(absent)}: balanced accuracy over all "
                                        f"{len(CLASSES)} classes cannot be measured on this data; training "
                                        "on it needs data.min_per_class=0 (the run is tagged skinclr.missing_classes)")
    return Manifest(frame, root, layout, warnings.lines(), _fingerprint(frame)), [], warnings.lines()


def _mixed_lesions(frame: pd.DataFrame, warnings: Problems) -> None:
    """A lesion has one diagnosis: images of one lesion_id under several point at a wrong label
    or a wrong grouping."""
    grouped = frame.dropna(subset=["lesion_id"])
    counts = grouped.groupby("lesion_id")["label"].nunique()
    for lesion in counts[counts > 1].index:
        rows = grouped[grouped["lesion_id"] == lesion]
        images = ", ".join(f"{i} {CLASSES[label]}" for i, label in zip(rows["image"], rows["label"]))
        warnings.add("mixed lesions", f"lesion {lesion}: its images have different diagnoses ({images}); one "
                                      "lesion has one diagnosis: fix the ground truth or the groupings")


def _fingerprint(frame: pd.DataFrame) -> str:
    """Names, labels and file stats (size, mtime_ns): an image rewritten with other pixels of the
    same byte size gets a new mtime, so the cache keyed by this is rebuilt, never stale."""
    h = hashlib.sha256()
    for image, label, path in sorted(zip(frame["image"], frame["label"], frame["path"])):
        st = os.stat(path)
        h.update(f"{image},{int(label)},{st.st_size},{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def summary_table(manifest: Manifest) -> str:
    """Images, lesions and per-class counts of a manifest, as aligned text."""
    n = len(manifest.frame)
    lesions = manifest.lesion_count()
    rows = [("images", f"{n:,}", ""), ("lesions", "n/a" if lesions is None else f"{lesions:,}", "")]
    rows += [(name, f"{count:,}", f"{100 * count / max(n, 1):.1f}%") for name, count in manifest.class_counts().items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{manifest.root}  [{manifest.layout}]  fingerprint {manifest.fingerprint}"]
    lines += [f"  {a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in rows]
    if lesions is None:
        lines[2] += "  (no lesion groupings)"
    return "\n".join(lines)
