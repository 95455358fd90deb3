"""`skinclr evaluate` and `skinclr predict`: a model by URI on a labelled folder or on loose images.

Evaluation reads the images through the model's own preprocessing (the served path, not the
training cache), so the numbers are those of the model as deployed. Each evaluation is a new
MLflow run, tagged with the model's URI and source run, so one model can be scored on several
sets without touching the run that trained it.

"Test" means unseen. The evaluated images are matched against the split the model's run
logged (`split.csv`): an image id on it is seen, whatever its pixels now (a re-encoded copy is
still the same image), and an image whose copy hash comes within COPY_DISTANCE bits of one of
the split's is that image copied, under another id or in place of a held-out one (the more
seen role wins). The model's training images are scored as `train_*`, its validation images
as `val_*`, and only the others as `test_*`; a warning says how many overlap.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from skinclr.train import figures, metrics as M
from skinclr import names
from skinclr.data.images import COPY_DISTANCE, copy_distances, decode_input, file_copy_hash
from skinclr.data.manifest import read_manifest
from skinclr.serve.uris import load_predictor
from skinclr.serve.predictor import Predictor
from skinclr.data.problems import DataError
from skinclr.track.tracking import RunLogger, ending

ROLES = ("train", "val", "test")  # what an evaluated image was to the model; test: never seen


def image_roles(predictor: Predictor, manifest, workdir: Path) -> tuple[np.ndarray, str, int]:
    """Each image's role for this model, how it was decided, and how many were found as copies:
    `same data` (the folder the model's run read), `copies` (the split's ids, then the copy
    hashes of every image it did not train on), `ids` (a run from before copy hashes), or
    `unknown` (no run split to compare with: all count as test)."""
    roles = np.full(len(manifest.frame), "test", dtype=object)
    if not predictor.run_id:
        return roles, "unknown", 0
    source = RunLogger(predictor.run_id)
    path = source.download("split.csv", workdir)
    if path is None:
        return roles, "unknown", 0
    split = pd.read_csv(path, dtype={"image": str, "copy_hash": str})
    seen = manifest.frame[["image", "path"]].merge(split, on="image", how="left")
    hit = seen["split"].notna().to_numpy()
    roles[hit] = seen.loc[hit, "split"].to_numpy()  # an id the model knows is seen, whatever its pixels
    if source.run.data.tags.get(names.DATA_FINGERPRINT_TAG) == manifest.fingerprint:
        return roles, "same data", 0
    if "copy_hash" not in split:
        return roles, "ids", 0
    rest = np.flatnonzero(roles != "train")  # only these are read again: a trained image is seen already
    if not len(rest):
        return roles, "copies", 0
    size, aspect = predictor.meta["image_size"], predictor.meta["aspect"]
    hashes = [file_copy_hash(seen.at[i, "path"], size, aspect) for i in rest]
    near = copy_distances(hashes, split["copy_hash"].tolist()) <= COPY_DISTANCE
    rank = np.array([ROLES.index(r) for r in split["split"]])  # train 0, val 1, test 2: the most seen wins
    found = np.where(near, rank[None, :], len(ROLES)).min(axis=1)
    copied = found < np.array([ROLES.index(r) for r in roles[rest]])
    roles[rest[copied]] = np.array(ROLES)[found[copied]]
    return roles, "copies", int(copied.sum())


def _tags(model_uri: str, predictor: Predictor, manifest, role: str, counts: dict[str, int]) -> dict[str, str]:
    tags = {names.MODEL_URI_TAG: model_uri, names.STAGE_TAG: "evaluate", names.DATA_FINGERPRINT_TAG: manifest.fingerprint,
            names.DATA_ROOT_TAG: str(manifest.root), names.DATA_LAYOUT_TAG: manifest.layout, names.DATA_ROLE_TAG: role,
            **{names.ROLE_IMAGES_TAG.format(role=r): str(n) for r, n in counts.items()}}
    note = f"Evaluation of `{model_uri}` on `{manifest.root}` ({len(manifest.frame)} images"
    note += "; unseen by the model)." if role == "test" else f"; {role}: " + ", ".join(
        f"{n} {r}" for r, n in counts.items() if n) + " images)."
    if predictor.run_id:
        tags[names.MODEL_RUN_TAG] = predictor.run_id
        note += f" The model was trained in run [{predictor.run_id}](#/runs/{predictor.run_id})."
    tags[names.NOTE_TAG] = note
    return tags


def missing_classes(report: dict) -> list[str]:
    """Classes with no image in the evaluated set: with any, balanced accuracy (the mean recall over
    classes) covers only the others, and is not the ISIC 2018 metric."""
    return [name for name, m in report["per_class"].items() if not m["support"]]


def balanced_name(report: dict) -> str:
    """The name balanced accuracy goes by: `balanced_accuracy` over every class, else
    `balanced_accuracy_present_classes`."""
    return "balanced_accuracy_present_classes" if missing_classes(report) else "balanced_accuracy"


def balanced_text(result: dict) -> str:
    """Balanced accuracy for a line of text, saying which classes it covers when not all."""
    missing = result.get("missing_classes") or []
    if not missing:
        return f"{result['balanced_accuracy']:.4f}"
    return (f"{result['balanced_accuracy_present_classes']:.4f} over the classes present only (no "
            f"{', '.join(missing)} images: not the ISIC 2018 metric)")


def _run_metrics(report: dict, role: str) -> dict[str, float | None]:
    out = {f"{role}_{balanced_name(report)}": report["balanced_accuracy"], f"{role}_accuracy": report["accuracy"],
           f"{role}_macro_f1": report["macro_f1"], f"{role}_roc_auc_macro": report["roc_auc_macro"]}
    out.update({f"{role}_recall_{name}": m["recall"] for name, m in report["per_class"].items()})
    return out  # None (a class absent from the folder, an undefined AUC) is not logged


def _write_artifacts(report: dict, result: dict, out: Path, title: str) -> list[Path]:
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return [*figures.write_report(report, out, title), out / "metrics.json"]


def _warnings(counts: dict[str, int], how: str, copies: int, run_id: str | None, root: Path,
              missing: list[str]) -> list[str]:
    seen, total = counts["train"] + counts["val"], sum(counts.values())
    out = []
    if seen:
        rest = (f"test_* metrics cover the other {counts['test']} images" if counts["test"] else
                "there is no test number: evaluate on images the model never saw, such as the official "
                "ISIC2018_Task3_Test_Input, or a folder its run's split.csv does not list")
        out.append(f"{seen} of {total} images in {root} were seen by the model in run {run_id} "
                   f"({counts['train']} training, {counts['val']} validation images"
                   f"{', matched by image id' if how == 'ids' else ''}"
                   f"{f', {copies} of them found by their pixels, as copies' if copies else ''}): they are reported as "
                   f"train_*/val_* metrics, not as test; {rest}")
    if how == "unknown":
        out.append("the model comes without the split it was trained on (no MLflow run with a split.csv): "
                   "its test_* numbers are test numbers only if these images were never used to train it")
    if missing:
        out.append(f"{root} holds no images of {', '.join(missing)}: balanced accuracy is reported over the "
                   "classes present only (balanced_accuracy_present_classes), which is not the ISIC 2018 metric; "
                   "evaluate on a folder with every class for that")
    return out


def evaluate(model_uri: str, data_dir, json_out=None, experiment: str = "skinclr-evaluate",
             progress: bool = True, tta: str | None = None) -> dict:
    """Score a model on a labelled folder, log a new MLflow run, return (and optionally write) the result.

    The result's top-level numbers cover the whole folder; `data_role` says what the folder is
    to the model (test when no image was seen in training), and `parts` holds the numbers of
    each role present. The run is created only once every image has been predicted: a broken
    file raises DataError naming it, and leaves no half-logged run behind. `tta` overrides the
    model's own test-time augmentation (logged as the `model_tta` param)."""
    predictor = load_predictor(model_uri, tta)
    manifest = read_manifest(data_dir)
    probs = predictor.predict_proba(manifest.frame["path"].tolist(), progress=progress)
    labels = manifest.frame["label"].to_numpy()
    report = M.classification_metrics(labels, probs)
    with tempfile.TemporaryDirectory() as tmp:
        roles, how, copies = image_roles(predictor, manifest, Path(tmp))
    counts = {r: int((roles == r).sum()) for r in ROLES}
    parts = {r: M.classification_metrics(labels[roles == r], probs[roles == r]) for r in ROLES if counts[r]}
    role = "unknown" if how == "unknown" else next(iter(parts)) if len(parts) == 1 else "mixed"

    logger = RunLogger.create(experiment, run_name=f"evaluate {manifest.root.name}",
                              tags=_tags(str(model_uri), predictor, manifest, role, counts))
    result = {**report, "model_uri": str(model_uri), "model_run_id": predictor.run_id,
              "data_dir": str(manifest.root), "data_fingerprint": manifest.fingerprint,
              "num_images": len(manifest.frame), "run_id": logger.run_id, "data_role": role,
              "images_by_role": counts, "matched_by": how, "parts": parts,
              "copies_found": copies, "tta": predictor.tta,
              "warnings": _warnings(counts, how, copies, predictor.run_id, manifest.root, missing_classes(report))}
    if missing_classes(report):  # never under the metric's own name
        result.update(balanced_accuracy=None, balanced_accuracy_present_classes=report["balanced_accuracy"],
                      missing_classes=missing_classes(report))
    with ending(logger):
        logger.log_params({"model_uri": model_uri, "data_dir": manifest.root, "num_images": len(manifest.frame),
                           **{f"model_{k}": v for k, v in predictor.meta.items() if k != "classes"}})
        counts_by_class = np.bincount(labels, minlength=len(names.CLASSES)).tolist()
        logger.log_datasets([{"name": manifest.root.name, "digest": manifest.fingerprint, "source": str(manifest.root),
                            "context": "testing" if role == "test" else "evaluation",
                            "profile": {"images": len(manifest.frame), "per_class": dict(zip(names.CLASSES, counts_by_class)),
                                        "images_by_role": counts}}])
        logger.log_metrics({k: v for r, part in parts.items() for k, v in _run_metrics(part, r).items()}, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            title = f"{model_uri} on {manifest.root.name}" + ("" if role == "test" else f" ({role} images)")
            for f in _write_artifacts(report, result, Path(tmp), title=title):
                logger.log_artifact(f)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result


def isic_ids(images: list[str]) -> list[str]:
    """The ISIC submission's image column: each file's id, without folder or extension; an id
    given twice would make two rows the scorer cannot tell apart, so it is refused."""
    ids = [Path(image).stem for image in images]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise DataError(f"--format isic: image id(s) {', '.join(twice[:5])} given more than once (from different "
                        "folders or extensions); an ISIC submission has one row per image id: pass each image once")
    return ids


def predict(model_uri: str, images: list[str], out_csv=None, fmt: str = "skinclr", tta: str | None = None
            ) -> pd.DataFrame:
    """One row per image: its path, the seven class probabilities and the most likely class; in
    the ISIC challenge's format (`fmt="isic"`), the image id and the seven probabilities alone,
    which the official scorer reads.

    An image that cannot be read does not cost the others: its row has no probabilities and an
    `error` column (present only then) says why. An ISIC submission must cover every image, so
    then it is not written."""
    ids = isic_ids([str(i) for i in images]) if fmt == "isic" else None
    predictor = load_predictor(model_uri, tta)
    images = [str(i) for i in images]
    errors: dict[int, str] = {}
    try:
        probs = predictor.predict_proba(images)
    except DataError:
        for i, item in enumerate(images):  # find the bad ones, then predict the rest
            try:
                decode_input(item, i)
            except DataError as err:
                errors[i] = "; ".join(err.problems)
        good = [i for i in range(len(images)) if i not in errors]
        probs = np.full((len(images), len(names.CLASSES)), np.nan)
        if good:
            probs[good] = predictor.predict_proba([images[i] for i in good])
    frame = pd.DataFrame(probs, columns=list(names.CLASSES))
    frame.insert(0, "image", ids or images)
    if ids is None:
        frame["predicted"] = [None if i in errors else names.CLASSES[k]
                              for i, k in enumerate(np.nan_to_num(probs).argmax(1))]
    if errors:
        frame["error"] = [errors.get(i) for i in range(len(images))]
    if out_csv and not (errors and ids is not None):
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out_csv, index=False)
    return frame


def format_summary(result: dict) -> str:
    """The headline numbers for the terminal: both accuracies on their own lines, then recall per
    class; on images the model has seen, the numbers of each role apart, never as test."""
    role = result.get("data_role", "test")
    counts = result.get("images_by_role", {})
    seen = {"test": "none seen by the model", "unknown": "the model's own split is unknown"}.get(
        role, f"{counts.get('train', 0)} trained on, {counts.get('val', 0)} validated on, "
              f"{counts.get('test', 0)} unseen by the model")
    lines = [f"model              {result['model_uri']}",
             f"data               {result['data_dir']} ({result['num_images']} images; {seen})"]
    parts = result.get("parts") or {}
    if role in ("test", "unknown"):
        what = "mean recall over classes; the ISIC 2018 metric" if not result.get("missing_classes") else \
            "mean recall over the classes present"
        lines += [f"balanced accuracy  {balanced_text(result)}   ({what})",
                  f"accuracy           {result['accuracy']:.4f}   (fraction of images right)"]
    else:
        for name, part in parts.items():
            label = {"train": "train (trained on)", "val": "val (its validation)", "test": "test (unseen)"}[name]
            over = "" if not missing_classes(part) else " (classes present)"
            lines.append(f"{label:<22} balanced accuracy{over} {part['balanced_accuracy']:.4f}   accuracy "
                         f"{part['accuracy']:.4f}   (n={part['num_samples']})")
    lines.append("recall per class" + ("" if role in ("test", "unknown") else " (whole folder)") + ":")
    for name, m in result["per_class"].items():
        recall = "   -  " if m["recall"] is None else f"{m['recall']:.4f}"
        lines.append(f"  {name:<6} {recall}  (n={m['support']})")
    lines.append(f"MLflow run         {result['run_id']}")
    return "\n".join(lines)
