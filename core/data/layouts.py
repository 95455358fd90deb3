"""The four folder layouts skinclr reads: the ISIC 2018 training, validation and test splits, and
HAM10000's own.

The layout is picked from the ground-truth file present; each reader yields one table of
image, label (index into CLASSES) and lesion_id, and `attach_files` finds each image's file.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from skinclr.names import CLASSES
from skinclr.data.problems import Problems, listing, plural, relative
from skinclr.data.problems import check_columns, check_ids, read_csv

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
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
