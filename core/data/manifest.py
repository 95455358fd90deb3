"""A dataset folder -> a validated manifest: every image, its label and lesion, named by a fingerprint.

Four layouts are read: the ISIC 2018 training, validation and test splits, and HAM10000's own. The
layout is picked from the ground-truth file present; each reader yields one table of image, label
(index into CLASSES) and lesion_id, and `attach_files` finds each image's file. Reading a folder
reports every problem at once (core/data/problems.py). Nothing downstream reads the folder again:
the split, the cache and training all start from the manifest.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from skinclr.data.images import IMAGE_SUFFIXES, inspect_images
from skinclr.data.problems import DataError, Problems, check_columns, check_ids, listing, plural, read_csv, relative
from skinclr.names import CLASSES


TRAINING_GT = "ISIC2018_Task3_Training_GroundTruth.csv"
TRAINING_INPUT = "ISIC2018_Task3_Training_Input"
GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"
HAM_METADATA = "HAM10000_metadata.csv"
HAM_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", "images")
ISIC_SPLITS = {  # layout -> (ground truth, image folder)
    "isic2018-training": (TRAINING_GT, TRAINING_INPUT),
    "isic2018-validation": ("ISIC2018_Task3_Validation_GroundTruth.csv", "ISIC2018_Task3_Validation_Input"),
    "isic2018-test": ("ISIC2018_Task3_Test_GroundTruth.csv", "ISIC2018_Task3_Test_Input"),
}


def read_labels(root: Path, problems: Problems, warnings: Problems):
    """Pick the layout from the ground-truth file present; (layout, table of image/label/lesion_id)."""
    present = [layout for layout, (gt, _) in ISIC_SPLITS.items() if (root / gt).is_file()]
    if len(present) > 1:
        names = ", ".join(ISIC_SPLITS[layout][0] for layout in present)
        problems.add("layout", f"{root}: holds ground truth for several splits ({names}); "
                               "put each split in its own folder")
        return None, None
    if present:
        layout = present[0]
        table = _nonempty(root / ISIC_SPLITS[layout][0], _read_isic_gt(root / ISIC_SPLITS[layout][0], problems),
                          problems)
        if table is not None and layout == "isic2018-training":
            _attach_groupings(root, table, problems, warnings)
        return layout, table
    if (root / HAM_METADATA).is_file():
        return "ham10000", _nonempty(root / HAM_METADATA, _read_ham_metadata(root / HAM_METADATA, problems), problems)

    inputs = [d for _, d in ISIC_SPLITS.values() if (root / d).is_dir()]
    if inputs:
        gt = next(g for g, d in ISIC_SPLITS.values() if d == inputs[0])
        problems.add("layout", f"{root}: has {inputs[0]}/ but no {gt}; put the ground-truth CSV next to it")
    else:
        found = sorted(p.name for p in root.iterdir())
        what = f"it holds {listing(found)}" if found else "it is empty"
        problems.add("layout", f"{root}: no ground-truth file ({what}); expected {TRAINING_GT} "
                               f"(or the Validation/Test one, or {HAM_METADATA}) and its image folder")
    return None, None


def _nonempty(path: Path, table: pd.DataFrame | None, problems: Problems) -> pd.DataFrame | None:
    """A labels table with at least one row: zero images is an error, named at its file."""
    if table is not None and not len(table):
        problems.add("no images", f"{path}: has no rows, only a header; a dataset needs at least one image, "
                                  "one row per image")
        return None
    return table


def _read_isic_gt(path: Path, problems: Problems) -> pd.DataFrame | None:
    table = read_csv(path, problems)
    if table is None:
        return None
    if not check_columns(path, table, ["image", *CLASSES], ["image", *CLASSES], problems):
        return None
    table["image"] = table["image"].str.strip()
    check_ids(path, table, "image", problems)

    values = table[list(CLASSES)].apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce"))
    for name in CLASSES:
        bad = ~values[name].isin([0.0, 1.0])
        for line, image, raw, value in zip(table.loc[bad, "line"], table.loc[bad, "image"], table.loc[bad, name],
                                           values.loc[bad, name]):
            what = "is not a number" if pd.isna(value) else "is not 0 or 1"
            problems.add("bad values", f"{path.name} line {line} ({image}), column {name}: {raw!r} {what}; "
                                       "use 1.0 for the diagnosis and 0.0 elsewhere")
    valid = values.notna().all(axis=1)
    positives = (values == 1.0).sum(axis=1)
    for line, image, ok, count in zip(table["line"], table["image"], valid, positives):
        if ok and count != 1:
            what = "no class is 1.0" if count == 0 else f"{count} classes are 1.0"
            problems.add("bad rows", f"{path.name} line {line} ({image}): {what}; exactly one of "
                                     f"{','.join(CLASSES)} must be 1.0")
    label = values.to_numpy().argmax(axis=1)
    return pd.DataFrame({"image": table["image"], "label": label, "lesion_id": None, "line": table["line"]})


def _attach_groupings(root: Path, table: pd.DataFrame, problems: Problems, warnings: Problems) -> None:
    path = root / GROUPINGS
    if not path.is_file():
        warnings.add("groupings", f"{GROUPINGS} is missing: every image counts as its own lesion, so a split may put "
                                  "two images of one lesion on both sides; add the file from the dataset download")
        return
    groups = read_csv(path, problems)
    if groups is None or not check_columns(path, groups, ["image", "lesion_id"], None, problems):
        return
    groups["image"] = groups["image"].str.strip()
    groups["lesion_id"] = groups["lesion_id"].str.strip()
    check_ids(path, groups, "image", problems)
    known = set(table["image"])
    for line, image in zip(groups["line"], groups["image"]):
        if image and image not in known:
            problems.add("groupings", f"{GROUPINGS} line {line}: image {image} is not in {TRAINING_GT}; "
                                      "the two files must come from the same download")
    lesion = groups[groups["lesion_id"] != ""].drop_duplicates("image").set_index("image")["lesion_id"]
    table["lesion_id"] = table["image"].map(lesion)
    # Not fatal: validation and test sets have no groupings at all, and an ungrouped image is
    # simply its own group. It is still worth knowing, since a split cannot keep it with its twins.
    ungrouped = table.loc[table["lesion_id"].isna(), "image"].tolist()
    if ungrouped:
        warnings.add("groupings", f"{GROUPINGS}: {plural(len(ungrouped), 'image')} without a lesion_id "
                                  f"({listing(ungrouped)}); each counts as its own lesion")


def _read_ham_metadata(path: Path, problems: Problems) -> pd.DataFrame | None:
    table = read_csv(path, problems)
    if table is None or not check_columns(path, table, ["lesion_id", "image_id", "dx"], None, problems):
        return None
    table["image_id"] = table["image_id"].str.strip()
    check_ids(path, table, "image_id", problems)
    dx = table["dx"].str.strip().str.upper()
    for line, image, raw in zip(table["line"], table["image_id"], table["dx"]):
        if raw.strip().upper() not in CLASSES:
            problems.add("bad values", f"{path.name} line {line} ({image}), column dx: {raw!r} is not one of "
                                       f"{','.join(c.lower() for c in CLASSES)}; fix the diagnosis")
    label = dx.map({c: i for i, c in enumerate(CLASSES)}).fillna(0).astype(int)
    lesion = table["lesion_id"].str.strip().replace("", None)
    return pd.DataFrame({"image": table["image_id"], "label": label, "lesion_id": lesion, "line": table["line"]})


def _image_files(folder: Path) -> dict[str, Path]:
    """id -> file for the images in one folder; text files and the like are not images."""
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def attach_files(root: Path, layout: str, table: pd.DataFrame, problems: Problems, warnings: Problems) -> pd.DataFrame:
    """The table with each image's file (`path`): listed images without a file are problems, files
    the ground truth does not list are warnings."""
    gt_name = HAM_METADATA if layout == "ham10000" else ISIC_SPLITS[layout][0]
    if layout == "ham10000":
        folders = [root / d for d in HAM_IMAGE_DIRS if (root / d).is_dir()]
        if not folders:
            problems.add("layout", f"{root}: {HAM_METADATA} found but no image folder; put the images in "
                                   f"{' or '.join(HAM_IMAGE_DIRS[:2])}/")
    else:
        folder = root / ISIC_SPLITS[layout][1]
        if folder.is_dir():
            folders = [folder]
        elif layout == "isic2018-training":
            folders = []
            problems.add("layout", f"{root}: {ISIC_SPLITS[layout][1]}/ is missing; unpack the images next to {gt_name}")
        else:
            folders = [root]  # validation/test images may sit beside their ground truth
    files: dict[str, Path] = {}
    for folder in folders:
        for image, path in _image_files(folder).items():
            if image in files:
                problems.add("duplicate ids", f"{relative(root, path)}: image {image} also exists as "
                                              f"{relative(root, files[image])}; keep one file per image")
            files[image] = path
    if folders and not files:
        problems.add("layout", f"{', '.join(relative(root, f) + '/' for f in folders)}: holds no images "
                               f"({', '.join(IMAGE_SUFFIXES)}); unpack the dataset's images there")

    table["path"] = table["image"].map(lambda i: str(files[i]) if i in files else None)
    if files:
        for line, image in zip(table.loc[table["path"].isna(), "line"], table.loc[table["path"].isna(), "image"]):
            if image and not image.lower().endswith(IMAGE_SUFFIXES):  # an id with its suffix is named apart
                problems.add("missing images", f"{gt_name} line {line}: image file for {image} not found in "
                                               f"{relative(root, folders[0])}/; add {image}.jpg or delete the row")
    unlisted = sorted(set(files) - set(table["image"]))
    if unlisted:
        warnings.add("unlisted", f"{plural(len(unlisted), 'image file')} not in {gt_name}, ignored: "
                                 f"{listing([files[i].name for i in unlisted])}")
    table["lesion_id"] = table["lesion_id"].astype(object).where(table["lesion_id"].notna(), None)
    return table[["image", "path", "label", "lesion_id"]].copy()


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
