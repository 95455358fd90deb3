"""`skinclr ensemble`: several fine-tune runs combined into one model, scored and logged as a run.

The members are named (`--runs`), or the finished children of a study or sweep (`--parent`), or
the best K runs of an experiment on one split (`--top`). The ensemble run holds the model (a
pyfunc like any other, so it is promoted, predicted and served like one), its members' run ids
and weights, its TTA, and its scores where they mean something:

* members that share one split: the ensemble on their val side, as `best_val_*` (what promotion
  compares, against single models of that split), and its decision rule fitted there;
* members of k folds: no common val side; the rule is fitted on the out-of-fold predictions
  (each val image predicted by the member that did not train on it), and the run is promoted
  only with `--force`;
* a test side all members held out (`data.test_fraction`): `test_*`, once, with and without the rule.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from skinclr import names
from skinclr.data.manifest import read_manifest
from skinclr.data.problems import DataError, listing, plural
from skinclr.data.split import changed_images
from skinclr.run.records import say_rule, test_scores
from skinclr.serve.predictor import EnsemblePredictor, Predictor, predict_items, write_ensemble
from skinclr.serve.pyfunc import log_ensemble, shipped_example
from skinclr.track import tracking
from skinclr.track.candidates import PromotionError, has_model, run_score, trained_nothing
from skinclr.track.tracking import RunLogger, ending
from skinclr.train import figures
from skinclr.train import metrics as M


def _run(client, run_id: str, flag: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise PromotionError(f"{flag} {run_id}: no such run in {tracking.tracking_uri()}; check the run id and "
                             "MLFLOW_TRACKING_URI") from None


def member_runs(runs: list[str] | None = None, parent: str | None = None, top: int = 0, experiment: str = "",
                metric: str = "val_balanced_accuracy") -> list:
    """The member runs: named, a parent's finished children with a model, or an experiment's top K on
    one split. Each once: a run named twice would silently count double."""
    c = tracking.client()
    if runs:
        twice = sorted({r for r in runs if runs.count(r) > 1})
        if twice:
            raise PromotionError(f"--runs: {', '.join(twice)} given more than once; an ensemble weighs its members "
                                 "equally: give each run once")
        found = [_run(c, r, "--runs") for r in runs]
    else:
        if parent:
            where, filters = [_run(c, parent, "--parent").info.experiment_id], f"tags.`{names.PARENT_TAG}` = '{parent}'"
        else:
            if top < 1:
                raise PromotionError(f"--top {top}: give the number of runs to combine, 1 or more")
            exp = c.get_experiment_by_name(experiment)
            if exp is None:
                raise PromotionError(f"--experiment {experiment!r}: no such experiment in {tracking.tracking_uri()}")
            where, filters = [exp.experiment_id], f"tags.`{names.STAGE_TAG}` = 'finetune'"
        found = c.search_runs(where, f"attributes.status = 'FINISHED' and {filters}", max_results=10_000)
        found = [r for r in found if run_score(c, r, metric) is not None and not trained_nothing(r)]
        found.sort(key=lambda r: run_score(c, r, metric)[0], reverse=True)
        if not parent:
            split = found[0].data.tags.get(names.SPLIT_FINGERPRINT_TAG) if found else None
            found = [r for r in found if r.data.tags.get(names.SPLIT_FINGERPRINT_TAG) == split][:top]
        if not found:
            raise PromotionError(f"{f'--parent {parent}' if parent else f'--experiment {experiment!r}'}: no finished "
                                 "fine-tune run with a model and a val score; give a study's or sweep's parent run, or "
                                 "name the members with --runs")
    bad = [r.info.run_id for r in found if r.info.status != "FINISHED" or not has_model(c, r.info.run_id)
           or r.data.tags.get(names.STAGE_TAG, "finetune") != "finetune" or trained_nothing(r)]
    if bad:
        raise PromotionError(f"ensemble members must be finished fine-tune runs that trained a model; "
                             f"{', '.join(bad)}: pick others")
    return found


def _one_dataset(members, splits: list[pd.DataFrame]) -> None:
    """Members of one dataset list the same images with the same labels in their split files. (The
    data fingerprint also names the files' sizes and times, which a copy of the folder changes.)"""
    first = set(zip(splits[0].index, splits[0]["label"]))
    for run, split in zip(members[1:], splits[1:]):
        other = set(zip(split.index, split["label"]))
        if other != first:
            raise PromotionError(
                f"the members were trained on different data: run {members[0].info.run_id} split {len(first)} images, "
                f"run {run.info.run_id} {len(other)}, {len(first ^ other)} (image, label) pairs differ; an ensemble "
                "combines models of one dataset")


def _scored_images(members, splits: list[pd.DataFrame], model, data: str | None):
    """The dataset folder's images by id (`data`, else the folder the first member read), after
    checking that the images the members are scored on (every val and test side) are still the
    ones they held out: an image replaced under its id would be scored as unseen."""
    root = data or members[0].data.tags[names.DATA_ROOT_TAG]
    manifest = read_manifest(root)
    if manifest.fingerprint != members[0].data.tags.get(names.DATA_FINGERPRINT_TAG):
        held = pd.concat([s["split"] for s in splits], axis=1).isin(["val", "test"]).any(axis=1)
        first = model.members[0]
        changed = changed_images(splits[0][held.to_numpy()].reset_index(), manifest, first.size, first.meta["aspect"])
        if changed:
            raise DataError(f"{manifest.root}: {plural(len(changed), 'image')} the members held out changed since they "
                            f"were trained ({listing(changed)}); pass --data with the folder they were trained on")
    return manifest.frame.set_index("image")


def build_ensemble(members: list, experiment: str = "", tta: str = "none", rule: str = "none",
                   run_name: str = "", data: str | None = None) -> dict:
    """Combine, score and log; returns the ensemble run's id and scores. `data`: the dataset
    folder, where it is no longer where the members read it."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders, splits = [], []
        for i, run in enumerate(members):
            logger = RunLogger(run.info.run_id)
            model = logger.download(names.MODEL_ARTIFACT, tmp / f"m{i}")
            split = logger.download("split.csv", tmp / f"s{i}")
            if model is None or not (model / "artifacts").is_dir() or split is None:
                raise PromotionError(f"run {run.info.run_id} lacks its model files or split.csv: not a fine-tune run")
            folders.append(model / "artifacts")
            splits.append(pd.read_csv(split, dtype={"image": str, "copy_hash": str}).set_index("image"))
        _one_dataset(members, splits)
        ids = [r.info.run_id for r in members]
        sides = [s["split"] for s in splits]
        model = EnsemblePredictor([Predictor.from_files(f / names.WEIGHTS_FILE, f / names.META_FILE, r) for f, r in
                                   zip(folders, ids)], tta=tta, sources=ids)
        frame = _scored_images(members, splits, model, data)
        shared = len({r.data.tags.get(names.SPLIT_FINGERPRINT_TAG) for r in members}) == 1
        scores, reports = {}, {}
        offsets = None
        if shared:
            val = sides[0][sides[0] == "val"].index
            probs = model.predict_proba(frame.loc[val, "path"].tolist())
            labels = frame.loc[val, "label"].to_numpy()
        else:  # out of fold: each member on its own val images
            parts = [(m, s[s == "val"].index) for m, s in zip(model.members, sides)]
            probs = np.concatenate([predict_items(lambda rgbs, m=m: m.raw_probs(rgbs, tta), frame.loc[v, "path"].tolist())
                                    for m, v in parts])
            labels = np.concatenate([frame.loc[v, "label"].to_numpy() for _, v in parts])
        expected = None
        if rule == "balanced":
            offsets, expected = M.fit_rule(labels, probs)
            say_rule(offsets, expected, "val" if shared else "out-of-fold")
            model = model.with_offsets(offsets)
        plain = M.classification_metrics(labels, probs)
        if shared:  # as a single model of this split logs them: without the rule, which was fitted here
            reports["val"] = plain
            scores.update(best_val_balanced_accuracy=plain["balanced_accuracy"], best_val_accuracy=plain["accuracy"])
            if expected is not None:
                scores["val_balanced_accuracy_with_rule"] = expected  # cross-fitted
        else:  # the cross-validated estimate: over folds, and of the out-of-fold predictions
            reports["out_of_fold"] = plain
            folds = [r.data.metrics["best_val_balanced_accuracy"] for r in members]
            mean, std = M.mean_std(folds)
            scores.update(folds_val_balanced_accuracy_mean=mean, folds_val_balanced_accuracy_std=std,
                          oof_balanced_accuracy=plain["balanced_accuracy"])
            if expected is not None:
                scores["oof_balanced_accuracy_with_rule"] = expected  # cross-fitted
        test = sorted(set.intersection(*(set(s[s == "test"].index) for s in sides)))
        if test:
            raw = model.with_offsets(None).predict_proba(frame.loc[test, "path"].tolist())
            reports["test"], metrics = test_scores(frame.loc[test, "label"].to_numpy(), raw, offsets)
            scores.update(metrics)
        return _log(members, splits, folders, model, offsets, scores, reports, experiment, tta, rule, run_name, tmp)


def _shared_sides(members) -> list:
    """The dataset inputs every member logged (a fold ensemble's members share only the test side)."""
    def sides(run) -> dict:
        return {(d.dataset.name, d.dataset.digest): d for d in (run.inputs.dataset_inputs if run.inputs else [])}
    common = set.intersection(*(set(sides(run)) for run in members))
    return [d for key, d in sides(members[0]).items() if key in common]


def _log(members, splits, folders, model, offsets, scores, reports, experiment, tta, rule, run_name, tmp: Path) -> dict:
    first = members[0].data.tags
    tags = {names.STAGE_TAG: "ensemble", names.DATA_FINGERPRINT_TAG: first.get(names.DATA_FINGERPRINT_TAG, ""),
            names.DATA_ROOT_TAG: first.get(names.DATA_ROOT_TAG, ""), names.ENSEMBLE_TAG: ",".join(model.meta["ensemble"])}
    if "val" in reports:
        tags[names.SPLIT_FINGERPRINT_TAG] = first.get(names.SPLIT_FINGERPRINT_TAG, "")
    if "test" in reports and first.get(names.TEST_FINGERPRINT_TAG):
        tags[names.TEST_FINGERPRINT_TAG] = first[names.TEST_FINGERPRINT_TAG]
    experiment = experiment or tracking.client().get_experiment(members[0].info.experiment_id).name
    logger = RunLogger.create(experiment, run_name or f"ensemble of {len(members)}", tags=tags)
    with ending(logger):
        logger.log_params({"members": ",".join(model.meta["ensemble"]), "weights": model.meta["weights"], "tta": tta,
                           "decision_rule": rule})
        logger.log_metrics(scores, step=0)
        logger.log_datasets(_shared_sides(members))
        folder = write_ensemble(tmp / "ensemble", folders, model.meta["ensemble"], model.meta["weights"], tta, offsets)
        log_ensemble(logger, folder, shipped_example(folders[0].parent, tmp / "example"))
        sides = pd.concat([s["split"] for s in splits], axis=1).reindex(splits[0].index)
        seen = splits[0].drop(columns="split").assign(
            split=[next((r for r in ("train", "val") if (row == r).any()), "test") for row in sides.to_numpy()])
        seen.reset_index().to_csv(tmp / "split.csv", index=False)
        logger.log_artifact(tmp / "split.csv")  # an image any member saw counts as seen, for `evaluate`
        for side, report in reports.items():
            for f in figures.write_report(report, tmp / side, f"ensemble of {len(members)}, {side}"):
                logger.log_artifact(f, f"report/{side}")
    return {"run_id": logger.run_id, "members": model.meta["ensemble"], "scores": scores, "offsets": offsets}
