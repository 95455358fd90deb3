"""Which run a promotion puts forward, and by which number: its best score on one validation split.

Scores on different validation splits are not comparable, so candidates are drawn from the runs
of one split (the champion's, or the one asked for), and a run is scored the same way whether it
is the candidate or the champion's source: `best_<metric>` when the run logged it, else the best
of the metric's history.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from skinclr import names
from skinclr.track import store


class PromotionError(ValueError):
    """Nothing to promote, or a promotion that cannot go ahead; the message says why."""


@dataclass(frozen=True)
class Candidate:
    run: Run
    score: float
    how: str  # which number the score is: `best_<metric>` or `max of <metric> history`

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def beats(a: float, b: float, metric: str) -> bool:
    return a < b if lower_is_better(metric) else a > b


def run_score(client: MlflowClient, run: Run, metric: str) -> tuple[float, str] | None:
    """A run's best value of `metric`: `best_<metric>` when the run logged it (the fine-tune loop
    logs it at its best epoch, the one whose model it saved), else the best of the metric's
    per-epoch history (max, or min for a loss). None when the run has neither."""
    best = run.data.metrics.get(f"best_{metric}")
    if best is not None and math.isfinite(best):
        return best, f"best_{metric}"
    if metric not in run.data.metrics:
        return None
    values = [m.value for m in client.get_metric_history(run.info.run_id, metric) if math.isfinite(m.value)]
    if not values:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(values), f"{pick.__name__} of {metric} history"


def logged_model(client: MlflowClient, run_id: str, run: Run | None = None):
    """The run's model as an MLflow logged model (what a fine-tune or ensemble logs): the one named
    `model` at the run's latest step (a deleted one is not found), or None (a run from before logged models holds a
    plain `model/` artifact folder instead)."""
    run = run or client.get_run(run_id)
    steps = {o.model_id: o.step for o in (run.outputs.model_outputs if run.outputs else [])}
    found = []
    for model_id, step in steps.items():
        try:
            model = client.get_logged_model(model_id)
        except MlflowException:
            continue
        if model.name == names.MODEL_ARTIFACT:
            found.append((step, model.creation_timestamp, model))
    return max(found, key=lambda item: item[:2])[2] if found else None


def has_model(client: MlflowClient, run_id: str) -> bool:
    return logged_model(client, run_id) is not None or any(
        a.path == f"{names.MODEL_ARTIFACT}/MLmodel" for a in client.list_artifacts(run_id, names.MODEL_ARTIFACT))


def trained_nothing(run) -> bool:
    """A run whose last epoch made no optimizer step (0 images/s): runs made before the engine
    failed such epochs finished with an untrained model, and are never promoted."""
    return run.data.metrics.get("images_per_second") == 0.0


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise PromotionError(f"no experiment '{experiment}' in {store.tracking_uri()} (experiments: {known}); "
                             "check --experiment and MLFLOW_TRACKING_URI")
    return exp.experiment_id


def select_candidate(client: MlflowClient, experiment: str, metric: str, run_id: str | None = None,
                     split: str | None = None) -> Candidate:
    """The given run, or the best finished run of the experiment that logged a model, among the
    runs validated on `split` (a split fingerprint). Without a split, the runs must share one:
    scores on different validation splits are not comparable."""
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise PromotionError(f"--run {run_id}: no such run in {store.tracking_uri()}") from None
        if run.info.status != "FINISHED":
            raise PromotionError(f"--run {run_id} is {run.info.status}, not FINISHED; only finished runs are promoted")
        if trained_nothing(run):
            raise PromotionError(f"--run {run_id} trained nothing (its epochs made no optimizer step: 0 images/s); "
                                 "retrain it with a train.batch_size no larger than its train side")
        scored = run_score(client, run, metric)
        if scored is None:
            raise PromotionError(f"--run {run_id} has no metric '{metric}' (nor best_{metric}); pick another --metric")
        if not has_model(client, run_id):
            raise PromotionError(f"--run {run_id} logged no '{names.MODEL_ARTIFACT}' artifact; only fine-tune runs can be promoted")
        return Candidate(run, *scored)

    exp_id = _experiment_id(client, experiment)
    runs = mlflow.search_runs([exp_id], filter_string="attributes.status = 'FINISHED'", output_format="list")
    runs = [run for run in runs if not trained_nothing(run)]
    scored = [(s, run) for run in runs if (s := run_score(client, run, metric)) is not None]
    scored.sort(key=lambda item: item[0][0], reverse=not lower_is_better(metric))
    models = [(s, run) for s, run in scored if has_model(client, run.info.run_id)]
    if not models:
        raise PromotionError(f"experiment '{experiment}' has no finished run with metric '{metric}' and a "
                             f"'{names.MODEL_ARTIFACT}' artifact ({len(runs)} finished runs, {len(scored)} with the metric); "
                             "run `skinclr finetune` first")
    by_split: dict[str | None, list] = {}
    for item in models:
        by_split.setdefault(item[1].data.tags.get(names.SPLIT_FINGERPRINT_TAG), []).append(item)
    if split is None and len(by_split) > 1:
        listing = "; ".join(f"{fp}: {len(items)} runs, best {items[0][0][0]:.4f}" for fp, items in by_split.items())
        raise PromotionError(f"experiment '{experiment}' holds runs validated on {len(by_split)} different splits "
                             f"({listing}); their scores are not comparable: pick one with --split FINGERPRINT")
    if split is not None and split not in by_split:
        raise PromotionError(f"experiment '{experiment}' has no finished run with a model on split {split} "
                             f"(splits there: {', '.join(map(str, by_split))}); pass another --split, or --run RUN_ID "
                             "(with --force to replace a champion of another split)")
    (score, how), run = by_split[split if split is not None else next(iter(by_split))][0]
    return Candidate(run, score, how)
