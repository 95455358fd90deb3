"""ISIC 2018 Task 3 folders -> a validated manifest -> a lesion-grouped, class-stratified split.

Reading a folder reports every problem at once (one line each, naming the file and the fix),
because a dataset with 40 broken rows should cost one round trip, not 40.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps

from core.names import CLASSES
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_LINES = 20  # listed lines per kind of problem; the rest are counted

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

# A truncated file must fail validation, not be padded with grey and trained on.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(Exception):
    """A dataset that cannot be used; `problems` holds one line per culprit."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self):  # keep the list intact across process pools
        return type(self), (self.problems,)


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


class _Report:
    """Problems or warnings grouped by kind, capped per kind so that 10k bad rows stay readable."""

    def __init__(self):
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, line: str) -> None:
        self.kinds.setdefault(kind, []).append(line)

    def lines(self) -> list[str]:
        out = []
        for kind, lines in self.kinds.items():
            out += lines[:MAX_LINES]
            if len(lines) > MAX_LINES:
                out.append(f"... and {len(lines) - MAX_LINES} more {kind}")
        return out


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Images


def load_rgb(path) -> np.ndarray:
    """Fully decode an image file into an HxWx3 uint8 RGB array, whatever its mode or suffix."""
    path = Path(path)
    try:
        return decode_image(path)
    except DECODE_ERRORS as err:
        raise DataError(f"{path}: {_decode_reason(path, err)}; replace or remove the file") from None


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_image(source) -> np.ndarray:
    """Decode a file path or a binary stream (e.g. a served request's bytes) to RGB uint8."""
    with Image.open(source) as img:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))


def _decode_reason(path: Path, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "file does not exist"
    if path.is_file() and path.stat().st_size == 0:
        return "file is empty"
    if "truncated" in str(err):
        return f"image is truncated ({err})"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not a readable image (corrupt or not an image format)"
    return f"cannot decode image ({err})"


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey: scale the full range down; a plain convert() would clip at 255.
        grey = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _decode_problems(paths: list[str]) -> list[tuple[str, str]]:
    """Worker: (path, reason) for every file in the chunk that does not decode."""
    bad = []
    for p in paths:
        try:
            decode_image(Path(p))
        except DECODE_ERRORS as err:
            bad.append((p, _decode_reason(Path(p), err)))
    return bad


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _decode_all(paths: list[str], workers: int | None, progress: bool) -> list[tuple[str, str]]:
    """Decode every file in a process pool (JPEG decoding is CPU bound and holds the GIL)."""
    from tqdm.auto import tqdm

    workers = workers or default_workers()
    bar = tqdm(total=len(paths), desc="decoding", unit="img", disable=not progress)
    bad: list[tuple[str, str]] = []
    if workers <= 1 or len(paths) < 256:
        for chunk in _chunks(paths, 64):
            bad += _decode_problems(chunk)
            bar.update(len(chunk))
    else:
        with ProcessPoolExecutor(workers) as pool:
            jobs = {pool.submit(_decode_problems, c): len(c) for c in _chunks(paths, 128)}
            for job in as_completed(jobs):
                bad += job.result()
                bar.update(jobs[job])
    bar.close()
    return sorted(bad)


# ---------------------------------------------------------------------------------------------
# Reading a folder


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
    problems, warnings = _Report(), _Report()
    if not root.exists():
        return None, [f"{root}: path does not exist; pass the dataset folder"], []
    if not root.is_dir():
        return None, [f"{root}: is a file, not a folder; pass the folder that holds the ground-truth CSV"], []
    root = root.resolve()

    layout, table = _read_labels(root, problems, warnings)
    if table is None:
        return None, problems.lines(), warnings.lines()
    frame = _attach_files(root, layout, table, problems, warnings)

    if decode and len(frame):
        present = frame["path"].notna()
        for path, reason in _decode_all(frame.loc[present, "path"].tolist(), workers, progress):
            problems.add("unreadable images", f"{_rel(root, path)}: {reason}; replace the file or remove its row")

    if problems.kinds:
        return None, problems.lines(), warnings.lines()
    frame = frame.sort_values("image", ignore_index=True)
    absent = [name for name, n in zip(CLASSES, np.bincount(frame["label"], minlength=len(CLASSES))) if n == 0]
    if absent:
        warnings.add("missing classes", f"no images of class {', '.join(absent)}: balanced accuracy over all "
                                        f"{len(CLASSES)} classes cannot be measured on this data; training "
                                        "on it needs data.min_per_class=0 (the run is tagged skinclr.missing_classes)")
    return Manifest(frame, root, layout, warnings.lines(), _fingerprint(frame)), [], warnings.lines()


def _rel(root: Path, path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _read_labels(root: Path, problems: _Report, warnings: _Report):
    """Pick the layout from the ground-truth file present; (layout, table of image/label/lesion_id)."""
    present = [layout for layout, (gt, _) in ISIC_SPLITS.items() if (root / gt).is_file()]
    if len(present) > 1:
        names = ", ".join(ISIC_SPLITS[layout][0] for layout in present)
        problems.add("layout", f"{root}: holds ground truth for several splits ({names}); "
                               "put each split in its own folder")
        return None, None
    if present:
        layout = present[0]
        table = _read_isic_gt(root / ISIC_SPLITS[layout][0], problems)
        if table is not None and layout == "isic2018-training":
            _attach_groupings(root, table, problems, warnings)
        return layout, table
    if (root / HAM_METADATA).is_file():
        return "ham10000", _read_ham_metadata(root / HAM_METADATA, problems)

    inputs = [d for _, d in ISIC_SPLITS.values() if (root / d).is_dir()]
    if inputs:
        gt = next(g for g, d in ISIC_SPLITS.values() if d == inputs[0])
        problems.add("layout", f"{root}: has {inputs[0]}/ but no {gt}; put the ground-truth CSV next to it")
    else:
        found = sorted(p.name for p in root.iterdir())
        what = f"it holds {_listing(found)}" if found else "it is empty"
        problems.add("layout", f"{root}: no ground-truth file ({what}); expected {TRAINING_GT} "
                               f"(or the Validation/Test one, or {HAM_METADATA}) and its image folder")
    return None, None


def _read_csv(path: Path, problems: _Report) -> pd.DataFrame | None:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        problems.add("files", f"{path.name}: file is empty; restore it from the dataset download")
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        problems.add("files", f"{path.name}: not a readable CSV ({str(err).strip()}); "
                              "restore it from the dataset download")
        return None
    table = table.fillna("")
    table.columns = [c.strip() for c in table.columns]
    table["line"] = np.arange(len(table)) + 2  # file line of each row: the header is line 1
    blank = (table.drop(columns="line") == "").all(axis=1)
    return table[~blank].reset_index(drop=True)


def _check_columns(path: Path, table: pd.DataFrame, required: list[str], allowed: list[str] | None,
                   problems: _Report) -> bool:
    columns = [c for c in table.columns if c != "line"]
    missing = [c for c in required if c not in columns]
    unknown = [c for c in columns if allowed is not None and c not in allowed]
    header = f"the header must be {','.join(allowed)}" if allowed else f"the header needs {','.join(required)}"
    for c in missing:
        problems.add("columns", f"{path.name}: column '{c}' is missing; {header}")
    for c in unknown:
        problems.add("columns", f"{path.name}: unknown column '{c}'; {header}")
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    for c in dupes:
        problems.add("columns", f"{path.name}: column '{c}' appears more than once; keep one")
    return not missing


def _check_ids(path: Path, table: pd.DataFrame, column: str, problems: _Report) -> None:
    for line in table.loc[table[column].str.strip() == "", "line"]:
        problems.add("rows", f"{path.name} line {line}: empty {column}; fill it in or delete the row")
    dupes = table[table[column].duplicated(keep=False) & (table[column] != "")]
    for image, rows in dupes.groupby(column, sort=True)["line"]:
        problems.add("duplicate ids", f"{path.name}: {column} {image} appears on lines "
                                      f"{', '.join(map(str, rows))}; keep one row per image")


def _read_isic_gt(path: Path, problems: _Report) -> pd.DataFrame | None:
    table = _read_csv(path, problems)
    if table is None:
        return None
    if not _check_columns(path, table, ["image", *CLASSES], ["image", *CLASSES], problems):
        return None
    table["image"] = table["image"].str.strip()
    _check_ids(path, table, "image", problems)

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


def _attach_groupings(root: Path, table: pd.DataFrame, problems: _Report, warnings: _Report) -> None:
    path = root / GROUPINGS
    if not path.is_file():
        warnings.add("groupings", f"{GROUPINGS} is missing: every image counts as its own lesion, so a split may put "
                                  "two images of one lesion on both sides; add the file from the dataset download")
        return
    groups = _read_csv(path, problems)
    if groups is None or not _check_columns(path, groups, ["image", "lesion_id"], None, problems):
        return
    groups["image"] = groups["image"].str.strip()
    groups["lesion_id"] = groups["lesion_id"].str.strip()
    _check_ids(path, groups, "image", problems)
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
        warnings.add("groupings", f"{GROUPINGS}: {_count(len(ungrouped), 'image')} without a lesion_id "
                                  f"({_listing(ungrouped)}); each counts as its own lesion")


def _read_ham_metadata(path: Path, problems: _Report) -> pd.DataFrame | None:
    table = _read_csv(path, problems)
    if table is None or not _check_columns(path, table, ["lesion_id", "image_id", "dx"], None, problems):
        return None
    table["image_id"] = table["image_id"].str.strip()
    _check_ids(path, table, "image_id", problems)
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


def _attach_files(root: Path, layout: str, table: pd.DataFrame, problems: _Report, warnings: _Report) -> pd.DataFrame:
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
                problems.add("duplicate ids", f"{_rel(root, path)}: image {image} also exists as "
                                              f"{_rel(root, files[image])}; keep one file per image")
            files[image] = path
    if folders and not files:
        problems.add("layout", f"{', '.join(_rel(root, f) + '/' for f in folders)}: holds no images "
                               f"({', '.join(IMAGE_SUFFIXES)}); unpack the dataset's images there")

    table["path"] = table["image"].map(lambda i: str(files[i]) if i in files else None)
    if files:
        for line, image in zip(table.loc[table["path"].isna(), "line"], table.loc[table["path"].isna(), "image"]):
            if image:
                problems.add("missing images", f"{gt_name} line {line}: image file for {image} not found in "
                                               f"{_rel(root, folders[0])}/; add {image}.jpg or delete the row")
    unlisted = sorted(set(files) - set(table["image"]))
    if unlisted:
        warnings.add("unlisted", f"{_count(len(unlisted), 'image file')} not in {gt_name}, ignored: "
                                 f"{_listing([files[i].name for i in unlisted])}")
    table["lesion_id"] = table["lesion_id"].astype(object).where(table["lesion_id"].notna(), None)
    return table[["image", "path", "label", "lesion_id"]].copy()


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


# ---------------------------------------------------------------------------------------------
# Splits


def _groups(frame: pd.DataFrame) -> np.ndarray:
    """Lesion of each image; an image without one is its own group."""
    return np.where(frame["lesion_id"].isna(), "image:" + frame["image"], frame["lesion_id"].astype(str))


def split_by_lesion(manifest: Manifest, val_fraction: float = 0.15, seed: int = 0, folds: int = 0,
                    fold: int = 0) -> pd.DataFrame:
    """manifest.frame + column "split": no lesion on both sides, class proportions kept.

    The data is cut into lesion-grouped, class-stratified folds and one fold is val: fold `fold`
    of `folds` for cross-validation, else fold 0 of round(1 / val_fraction) (so `folds=7, fold=0`
    is the default 0.15 split, and the folds of one seed are disjoint and cover every image)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    if not folds and not 0.0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction {val_fraction} must lie in (0, 0.5]")
    n_folds = folds or round(1 / val_fraction)
    if not 0 <= fold < n_folds:
        raise DataError(f"fold {fold} does not exist: folds are numbered 0..{n_folds - 1}")
    frame = manifest.frame.copy()
    groups = _groups(frame)
    if len(set(groups)) < n_folds:
        what = f"{n_folds} folds" if folds else f"a {val_fraction:.0%} validation split"
        raise DataError(f"{manifest.root}: only {len(set(groups))} lesions, too few for {what}; "
                        "add images, or use fewer folds / a larger data.val_fraction")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare classes with fewer lesions than folds are fine here
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        parts = splitter.split(np.zeros(len(frame)), frame["label"].to_numpy(), groups)
        try:
            for _ in range(fold):
                next(parts)
            _, val = next(parts)
        except ValueError:  # scikit-learn: every class has fewer members than folds
            largest = int(np.bincount(frame["label"]).max())
            raise DataError(f"{manifest.root}: every class has fewer images than the {n_folds} folds of the split "
                            f"(largest class: {largest}); add images, raise data.val_fraction or use fewer "
                            "data.folds") from None
    split = np.full(len(frame), "train", dtype=object)
    split[val] = "val"
    frame["split"] = split
    return frame


def check_split(split: pd.DataFrame, min_per_class: int = 1) -> list[str]:
    """Refuse a split on which balanced accuracy cannot be measured; return the classes absent
    from the data altogether (allowed only with min_per_class 0, for a run to tag).

    Balanced accuracy averages recall over the classes present in val: a val side with 2 of 7
    classes yields a number, but not the official metric, and it would compete with real ones."""
    counts = {part: np.bincount(split.loc[split["split"] == part, "label"].to_numpy(dtype=int),
                                minlength=len(CLASSES)) for part in ("train", "val")}
    short = [f"{name} has {counts['train'][i]} train / {counts['val'][i]} val images"
             for i, name in enumerate(CLASSES) if min(counts["train"][i], counts["val"][i]) < min_per_class]
    if short:
        raise DataError(f"split cannot measure balanced accuracy: {'; '.join(short)}, fewer than "
                        f"data.min_per_class={min_per_class} on a side; add images of "
                        f"{'that class' if len(short) == 1 else 'those classes'}, raise data.val_fraction "
                        "(or use fewer data.folds), or set data.min_per_class=0 to accept it")
    return [name for i, name in enumerate(CLASSES) if counts["train"][i] + counts["val"][i] == 0]


def label_subset(split: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The split + column "labelled": a lesion-grouped, class-stratified share of the train side.

    Per class, the train lesions are put in one seeded order and taken until the class's share of
    images is reached, at least one lesion each. The order does not depend on `fraction`, so for
    one seed a smaller subset lies inside every larger one. Val images stay labelled."""
    out = split.copy()
    out["labelled"] = out["split"] == "val"
    train = out[out["split"] == "train"]
    groups = pd.Series(_groups(train), index=train.index)
    rng = np.random.default_rng(seed)
    for c in range(len(CLASSES)):
        members = groups[train["label"] == c]
        if members.empty:
            continue
        sizes = members.value_counts().sort_index()  # lesion -> images of this class
        order = sizes.index[rng.permutation(len(sizes))]
        target = fraction * len(members)
        taken = np.cumsum(sizes[order].to_numpy())
        keep = set(order[:max(1, int(np.searchsorted(taken, target - 1e-9)) + 1)])
        out.loc[members.index[members.isin(keep)], "labelled"] = True
    return out


def label_fingerprint(split: pd.DataFrame) -> str:
    """Names the labelled train images, so runs on the same subset can be told apart."""
    train = split[(split["split"] == "train") & split.get("labelled", True)]
    return hashlib.sha256(",".join(sorted(train["image"])).encode()).hexdigest()[:16]


def split_fingerprint(split: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for part in ("train", "val"):
        h.update(f"{part}:{','.join(sorted(split.loc[split['split'] == part, 'image']))}\n".encode())
    return h.hexdigest()[:16]


def save_split(split: pd.DataFrame, path) -> Path:
    """CSV with image, label (class name: the file reads on its own), lesion_id, split."""
    path = Path(path)
    out = split[["image", "label", "lesion_id", "split"]].copy()
    out["label"] = [CLASSES[i] for i in out["label"]]
    out.to_csv(path, index=False)
    return path


def load_split(path, manifest: Manifest) -> pd.DataFrame:
    """A saved split applied to a manifest; it must cover exactly the manifest's images."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file does not exist; make one with save_split or drop the setting")
    problems = _Report()
    table = _read_csv(path, problems)
    if table is not None and _check_columns(path, table, ["image", "split"], None, problems):
        table["image"] = table["image"].str.strip()
        _check_ids(path, table, "image", problems)
        frame = manifest.frame.set_index("image")
        labels = table["label"] if "label" in table else [None] * len(table)
        for line, image, part, label in zip(table["line"], table["image"], table["split"], labels):
            if part not in ("train", "val"):
                problems.add("bad values", f"{path.name} line {line} ({image}): split {part!r} must be train or val")
            if image and image not in frame.index:
                problems.add("unknown images", f"{path.name} line {line}: image {image} is not in the dataset at "
                                               f"{manifest.root}; the split was made for other data: remake it")
            elif image and label is not None and label not in (CLASSES[frame.at[image, "label"]],
                                                                str(frame.at[image, "label"])):
                problems.add("labels", f"{path.name} line {line} ({image}): label {label} but the dataset says "
                                       f"{CLASSES[frame.at[image, 'label']]}; remake the split")
        missing = sorted(set(frame.index) - set(table["image"]))
        if missing:
            problems.add("coverage", f"{path.name}: {_count(len(missing), 'dataset image')} not in the split "
                                     f"({_listing(missing)}); the split was made for other data: remake it")
    if problems.kinds:
        raise DataError(problems.lines())
    split = manifest.frame.copy()
    split["split"] = split["image"].map(table.set_index("image")["split"])
    groups = _groups(split)
    shared = sorted(set(groups[split["split"] == "train"]) & set(groups[split["split"] == "val"]))
    if shared:
        raise DataError(f"{path.name}: lesions {_listing(shared)} have images in both train and val; "
                        "remake the split with split_by_lesion")
    return split
