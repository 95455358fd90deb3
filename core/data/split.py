"""A manifest -> a lesion-grouped, class-stratified test/train/val split; labelled subsets; split files.

No lesion has images on both sides of a split: two photographs of one lesion, one in train and
one in val, would let validation reward memorising the lesion.

A split is written in one format, a CSV that reads on its own: `image,label,lesion_id,split`
(label as the class name; split train, val or test), and `copy_hash` when it is written with the
run's cache: a perceptual hash of each image as the model saw it, by which evaluation finds the
model's own images under other names. A test side is held out before anything else is drawn and
no choice reads it: only the saved model is scored on it, once. A labelled subset is not part of
the split: each run draws its own from the split, named by its label fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from skinclr.data.cache import ImageCache
from skinclr.data.manifest import Manifest
from skinclr.names import CLASSES
from skinclr.data.problems import DataError, Problems, listing, plural
from skinclr.data.images import COPY_DISTANCE, copy_distances, copy_hash, file_copy_hash
from skinclr.data.problems import check_columns, check_ids, read_csv

COLUMNS = ("image", "label", "lesion_id", "split")  # every split file's; `copy_hash` may follow
PARTS = ("train", "val", "test")  # the values of "split": test only under data.test_fraction


def lesion_groups(frame: pd.DataFrame) -> np.ndarray:
    """Lesion of each image; an image without one is its own group."""
    return np.where(frame["lesion_id"].isna(), "image:" + frame["image"], frame["lesion_id"].astype(str))


def split_by_lesion(manifest: Manifest, val_fraction: float = 0.15, seed: int = 0, folds: int = 0,
                    fold: int = 0, test_fraction: float = 0.0, test_seed: int = 0) -> pd.DataFrame:
    """manifest.frame + column "split": no lesion on two sides, class proportions kept.

    With `test_fraction`, a lesion-grouped, class-stratified test share is held out first (fold
    0 of round(1 / test_fraction), drawn with `test_seed` alone), and everything below happens
    inside the rest: one test set for every split seed, fold and label subset.
    The rest is cut into lesion-grouped, class-stratified folds and one fold is val: fold `fold`
    of `folds` for cross-validation, else fold 0 of round(1 / val_fraction) (so `folds=7, fold=0`
    is the default 0.15 split, and the folds of one seed are disjoint and cover every image).
    The fractions lie in (0, 0.5]: config validation checks them before any work."""
    n_folds = folds or round(1 / val_fraction)
    if not 0 <= fold < n_folds:
        raise DataError(f"fold {fold} does not exist: folds are numbered 0..{n_folds - 1}")
    frame = manifest.frame.copy()
    split = np.full(len(frame), "train", dtype=object)
    rest = np.arange(len(frame))
    if test_fraction:
        test = _fold(frame, manifest.root, round(1 / test_fraction), 0, test_seed,
                     f"a {test_fraction:.0%} test split", "data.test_fraction")
        split[test] = "test"
        rest = np.setdiff1d(rest, test)
    what = f"{n_folds} folds" if folds else f"a {val_fraction:.0%} validation split"
    val = _fold(frame.iloc[rest], manifest.root, n_folds, fold, seed, what, "data.val_fraction (or use fewer data.folds)")
    split[rest[val]] = "val"
    frame["split"] = split
    return frame


def remembered_split(manifest: Manifest, folder: str | Path, **params) -> pd.DataFrame:
    """`split_by_lesion(manifest, **params)`, kept in `folder` under the hash of all it depends on:
    each image's label and lesion in manifest order, the parameters and scikit-learn's version.
    A repeated run reads it back instead of importing scikit-learn (0.7 s) to draw it again.
    A folder that cannot be written only costs the draw."""
    frame = manifest.frame
    what = [frame["image"].tolist(), frame["label"].astype(int).tolist(), lesion_groups(frame).tolist(),
            sorted(params.items()), version("scikit-learn")]
    path = Path(folder) / f"split-{hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]}.npy"
    try:
        codes = np.load(path)
        if codes.dtype == np.int8 and codes.shape == (len(frame),) and 0 <= codes.min() and codes.max() < len(PARTS):
            return frame.assign(split=np.asarray(PARTS, dtype=object)[codes])
    except (OSError, ValueError, EOFError):
        pass  # not drawn yet, or unreadable: draw it again
    split = split_by_lesion(manifest, **params)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy")  # one per writer, on any node
        np.save(tmp, np.array([PARTS.index(part) for part in split["split"]], dtype=np.int8))
        tmp.replace(path)  # whole or absent
    except OSError:
        pass
    return split


def _fold(frame: pd.DataFrame, root, n_folds: int, fold: int, seed: int, what: str, knob: str) -> np.ndarray:
    """Positions (in `frame`) of fold `fold` of `n_folds` lesion-grouped, class-stratified folds."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    groups = lesion_groups(frame)
    if len(set(groups)) < n_folds:
        raise DataError(f"{root}: only {len(set(groups))} lesions, too few for {what}; add images, or change {knob}")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare classes with fewer lesions than folds are fine here
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        parts = splitter.split(np.zeros(len(frame)), frame["label"].to_numpy(), groups)
        try:
            for _ in range(fold):
                next(parts)
            return next(parts)[1]
        except ValueError:  # scikit-learn: every class has fewer members than folds
            largest = int(np.bincount(frame["label"]).max())
            raise DataError(f"{root}: every class has fewer images than the {n_folds} folds of {what} (largest "
                            f"class: {largest}); add images, or change {knob}") from None


def check_split(split: pd.DataFrame, min_per_class: int = 1) -> list[str]:
    """Refuse a split on which balanced accuracy cannot be measured; return the classes absent
    from the data altogether (allowed only with min_per_class 0, for a run to tag).

    Balanced accuracy averages recall over the classes present in val: a val side with 2 of 7
    classes yields a number, but not the official metric, and it would compete with real ones.
    A test side, when there is one, is held to the same rule."""
    parts = ("train", "val", "test") if (split["split"] == "test").any() else ("train", "val")
    counts = {part: np.bincount(split.loc[split["split"] == part, "label"].to_numpy(dtype=int),
                                minlength=len(CLASSES)) for part in parts}
    short = [f"{name} has {' / '.join(f'{counts[p][i]} {p}' for p in parts)} images"
             for i, name in enumerate(CLASSES) if min(counts[p][i] for p in parts) < min_per_class]
    if short:
        raise DataError(f"split cannot measure balanced accuracy: {'; '.join(short)}, fewer than "
                        f"data.min_per_class={min_per_class} on a side; add images of "
                        f"{'that class' if len(short) == 1 else 'those classes'}, raise data.val_fraction "
                        f"{'or data.test_fraction ' if 'test' in parts else ''}(or use fewer data.folds), "
                        "or set data.min_per_class=0 to accept it")
    return [name for i, name in enumerate(CLASSES) if sum(counts[p][i] for p in parts) == 0]


def label_subset(split: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The split + column "labelled": a lesion-grouped, class-stratified share of the train side.

    Per class, the train lesions are put in one seeded order and taken until the class's share of
    images is reached, at least one lesion each. The order does not depend on `fraction`, so for
    one seed a smaller subset lies inside every larger one. Val images stay labelled."""
    out = split.copy()
    out["labelled"] = out["split"] == "val"
    train = out[out["split"] == "train"]
    groups = pd.Series(lesion_groups(train), index=train.index)
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


def test_fingerprint(split: pd.DataFrame) -> str:
    """Names the held-out test images ("" without a test split): runs that share it can be compared on it."""
    return side_fingerprint(split, "test")


def side_fingerprint(split: pd.DataFrame, part: str) -> str:
    """Names the images of one side ("" when it has none): the train side as trained on (its
    labelled subset under data.label_fraction < 1), val, or test."""
    rows = split["split"] == part
    if part == "train" and "labelled" in split:
        rows &= split["labelled"].astype(bool)
    images = sorted(split.loc[rows, "image"])
    return hashlib.sha256(f"{part}:{','.join(images)}".encode()).hexdigest()[:16] if images else ""


def split_fingerprint(split: pd.DataFrame) -> str:
    """Names which images were train and which val (a test side is named apart, by test_fingerprint)."""
    h = hashlib.sha256()
    for part in ("train", "val"):
        h.update(f"{part}:{','.join(sorted(split.loc[split['split'] == part, 'image']))}\n".encode())
    return h.hexdigest()[:16]


def save_split(split: pd.DataFrame, path, cache: ImageCache | None = None) -> Path:
    """Write a split file (the module's one format); `cache` adds each image's copy hash (of the
    square the model saw), by which evaluation finds the split's images under other names."""
    path = Path(path)
    out = split[list(COLUMNS)].copy()
    out["label"] = [CLASSES[i] for i in out["label"]]
    if cache is not None:
        out["copy_hash"] = [copy_hash(cache.images[row]) for row in cache.rows(out["image"])]
    out.to_csv(path, index=False)
    return path


def load_split(path, manifest: Manifest) -> pd.DataFrame:
    """A split file applied to a manifest; it must cover exactly the manifest's images, with the
    dataset's labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file does not exist; make one with save_split or drop the setting")
    problems = Problems()
    table = read_csv(path, problems)
    if table is not None and check_columns(path, table, list(COLUMNS), None, problems):
        table["image"] = table["image"].str.strip()
        check_ids(path, table, "image", problems)
        frame = manifest.frame.set_index("image")
        for line, image, part, label in zip(table["line"], table["image"], table["split"], table["label"]):
            if part not in PARTS:
                problems.add("bad values", f"{path.name} line {line} ({image}): split {part!r} must be train, val "
                                           "or test")
            if image and image not in frame.index:
                problems.add("unknown images", f"{path.name} line {line}: image {image} is not in the dataset at "
                                               f"{manifest.root}; the split was made for other data: remake it")
            elif image and label != CLASSES[frame.at[image, "label"]]:
                problems.add("labels", f"{path.name} line {line} ({image}): label {label} but the dataset says "
                                       f"{CLASSES[frame.at[image, 'label']]}; remake the split")
        missing = sorted(set(frame.index) - set(table["image"]))
        if missing:
            problems.add("coverage", f"{path.name}: {plural(len(missing), 'dataset image')} not in the split "
                                     f"({listing(missing)}); the split was made for other data: remake it")
    if problems.kinds:
        raise DataError(problems.lines())
    split = manifest.frame.copy()
    split["split"] = split["image"].map(table.set_index("image")["split"])
    groups = lesion_groups(split)
    for i, one in enumerate(PARTS):
        for other in PARTS[i + 1:]:
            shared = sorted(set(groups[split["split"] == one]) & set(groups[split["split"] == other]))
            if shared:
                raise DataError(f"{path.name}: lesions {listing(shared)} have images in both {one} and {other}; "
                                "remake the split with split_by_lesion")
    return split


def changed_images(split: pd.DataFrame, manifest: Manifest, size: int, aspect: str) -> list[str]:
    """The images of a split file (or some of its rows) that the folder no longer holds as they
    were when it was written: gone, under another label, or other pixels under the same id (the
    copy hash of the square the model saw, `size` and `aspect`, moved beyond COPY_DISTANCE). One
    short phrase each. A model's val and test numbers mean something only on its own held-out
    images; reading the pixels is needed only where the folder's fingerprint changed since."""
    frame = manifest.frame.set_index("image")
    out = [f"{image} is gone" if image not in frame.index else
           f"{image} is {CLASSES[frame.at[image, 'label']]}, not {label}"
           for image, label in zip(split["image"], split["label"])
           if image not in frame.index or CLASSES[frame.at[image, "label"]] != label]
    if "copy_hash" in split:
        kept = split[split["image"].isin(frame.index)]
        for image, known in zip(kept["image"], kept["copy_hash"]):
            if copy_distances([file_copy_hash(frame.at[image, "path"], size, aspect)], [known])[0, 0] > COPY_DISTANCE:
                out.append(f"{image} is another picture")
    return out
