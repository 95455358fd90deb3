"""The model registry: register a fine-tune run's model, move alias `champion` only forward.

A promotion registers the run's logged model `model` as a new version of the registered model (the
version links to it, and its page lists the version), then moves
`champion` to it if, and only if, it beats the current champion on the same validation split
(different splits give incomparable numbers). Only runs on the champion's split compete for
it (or on `--split`; with no champion yet, the runs must share one split; core/track/candidates.py
picks and scores them), and a run is
registered once: promoting it again goes through the version it has. The champion it replaces
keeps alias `previous`, so `rollback` is one swap. Everything that serves or evaluates a model loads it as
`models:/NAME@champion`.

Two failure modes are designed out:

* A crash part-way leaves the old champion in place. The version is registered tagged
  `skinclr.promotion=pending`; `previous` is written before `champion`, and `champion` is the
  last write; the tag turns `done` (or `failed` when an error is caught) afterwards. A version
  that never got the alias is only an unused entry in the version list.
* Two promotions at once cannot both compare against the same old champion (a read-modify-write
  race in which the worse model could land last). The compare-and-move runs under a lock:

  - local SQLite store: a file lock (core/runtime.py) beside the database. The kernel releases
    it when its holder dies, so a killed promotion never blocks the next one.
  - tracking server (no shared file system, and MLflow has no compare-and-set on tags or
    aliases): a ticket lock built on the one atomic step the registry offers, numbering new
    versions. Each promotion registers its version first, then waits until no lower-numbered
    version of the same model is still `pending`; promotions therefore run one at a time in
    version order. A `pending` version that stays pending for `STALE_S` seconds (its process
    died without a chance to tag it) stops counting.

  Promote a store through one door: clients of a `skinclr server` should not promote directly
  into its SQLite file at the same time, since the two locks do not see each other.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from skinclr import names
from skinclr.track import store, tracking
from skinclr.track.candidates import Candidate, PromotionError, beats, logged_model, run_score, select_candidate
from skinclr.runtime import BusyError, lock

CHAMPION, PREVIOUS = "champion", "previous"
LOCK_TIMEOUT_S = 120.0  # longest wait for the local lock file
STALE_S = 60.0  # a server-side promotion pending this long is taken for dead
POLL_S = 0.25


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _version_tags(cand: Candidate, metric: str) -> dict[str, str]:
    tags = cand.run.data.tags
    out = {
        names.PROMOTION_TAG: "pending",
        names.SOURCE_RUN_TAG: cand.run_id,
        names.METRIC_TAG: metric,
        names.METRIC_VALUE_TAG: repr(cand.score),
        names.VERSION_SPLIT_TAG: tags.get(names.SPLIT_FINGERPRINT_TAG),
        names.VERSION_DATA_TAG: tags.get(names.DATA_FINGERPRINT_TAG),
        names.VERSION_COMMIT_TAG: tags.get(names.GIT_COMMIT_TAG),
        names.PRETRAIN_RUN_TAG: tags.get(names.PRETRAIN_RUN_TAG),
        names.SWEEP_RUN_TAG: tags.get(names.SWEEP_RUN_TAG),
        names.INIT_TAG: tags.get(names.INIT_TAG, cand.run.data.params.get("finetune.init")),
    }
    return {k: v for k, v in out.items() if v is not None}


def _description(cand: Candidate, metric: str) -> str:
    run, tags, m = cand.run, cand.run.data.tags, cand.run.data.metrics
    lines = [f"Model of fine-tune run `{cand.run_id}` ({tags.get('mlflow.runName', '')}, init "
             f"`{tags.get(names.INIT_TAG, run.data.params.get('finetune.init', '?'))}`).",
             f"Data fingerprint `{tags.get(names.DATA_FINGERPRINT_TAG, '?')}`, split fingerprint "
             f"`{tags.get(names.SPLIT_FINGERPRINT_TAG, '?')}`.",
             f"{metric}: {cand.score:.4f} ({cand.how})."]
    for key in ("best_val_balanced_accuracy", "best_val_accuracy"):
        if key in m and key != f"best_{metric}":
            lines.append(f"{key}: {m[key]:.4f}.")
    return "\n".join(lines)


def register(client: MlflowClient, name: str, cand: Candidate, metric: str) -> ModelVersion:
    """A new version of `name` from the run's model, tagged `skinclr.promotion=pending`."""
    try:
        client.create_registered_model(name, description="skinclr ISIC 2018 Task 3 classifiers; "
                                       f"alias `{CHAMPION}` is the one to serve, `{PREVIOUS}` the one before.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model = logged_model(client, cand.run_id)  # None for a run from before logged models: its artifact folder
    version = client.create_model_version(
        name, source=f"models:/{model.model_id}" if model else f"runs:/{cand.run_id}/{names.MODEL_ARTIFACT}",
        run_id=cand.run_id, tags=_version_tags(cand, metric), description=_description(cand, metric),
        model_id=model.model_id if model else None)
    if model is not None:  # the logged model's page lists the versions made from it, as MLflow's own register does
        made = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]")) + [{"name": name, "version": version.version}]
        client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(made)})
    return version


# ---------------------------------------------------------------------------------------------
# Serializing the compare-and-move


def lock_file(name: str) -> Path | None:
    """The lock file of `name`'s promotions beside a local SQLite store; None for a server."""
    db = store.sqlite_path()
    if db is None:
        return None
    return db.with_name(f"{db.name}.{name}.promote.lock")


@contextmanager
def file_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """The promotions of one model through a local store, one at a time."""
    try:
        held = lock(path, wait=timeout, poll=POLL_S)
    except BusyError:
        raise PromotionError(f"another promotion has held {path} for over {timeout:.0f} s; "
                             "wait for it, or end the process that holds it") from None
    with held:
        yield


def wait_for_turn(client: MlflowClient, name: str, version: int | None, stale: float = STALE_S) -> None:
    """Return once no version of `name` numbered below `version` (any, when None) is pending.

    Staleness is timed on this machine's clock from when the version was first seen pending,
    so server and client clocks need not agree."""
    first_seen: dict[str, float] = {}
    while True:
        now = time.monotonic()
        ahead = [str(v.version) for v in client.search_model_versions(f"name='{name}'")
                 if (version is None or int(v.version) < version) and v.tags.get(names.PROMOTION_TAG) == "pending"]
        for v in ahead:
            first_seen.setdefault(v, now)
        if all(now - first_seen[v] >= stale for v in ahead):
            return
        time.sleep(POLL_S)


@contextmanager
def serialized(client: MlflowClient, name: str, version: int | None) -> Iterator[None]:
    """Mutual exclusion for alias changes of one registered model (see the module docstring)."""
    path = lock_file(name)
    if path is not None:
        with file_lock(path):
            yield
    else:
        wait_for_turn(client, name, version)
        yield


# ---------------------------------------------------------------------------------------------
# Promotion and rollback


def _move(client: MlflowClient, name: str, new: str, old: ModelVersion | None) -> None:
    """`previous` first, `champion` last: a crash in between leaves the champion unchanged."""
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, new)


def _decide(client: MlflowClient, name: str, version: ModelVersion, cand: Candidate, metric: str,
            force: bool) -> str:
    """Compare with the champion of this moment and move the alias if the candidate wins."""
    v = version.version
    champ = alias_version(client, name, CHAMPION)
    if champ is None:
        _move(client, name, v, None)
        return f"promoted run {cand.run_id} as {name} version {v}, the first {CHAMPION} ({metric} {cand.score:.4f})"
    if champ.run_id == cand.run_id:
        return f"run {cand.run_id} is already {CHAMPION} ({name} version {champ.version}); version {v} left unaliased"
    try:
        champ_run = client.get_run(champ.run_id) if champ.run_id else None
    except MlflowException:
        champ_run = None
    here = cand.run.data.tags.get(names.SPLIT_FINGERPRINT_TAG)
    there = champ_run.data.tags.get(names.SPLIT_FINGERPRINT_TAG) if champ_run else None
    champ_score = run_score(client, champ_run, metric) if champ_run else None
    if champ_run is None or champ_score is None:
        why = f"{CHAMPION} version {champ.version} has no source run with metric '{metric}' to compare with"
    elif here is None or here != there:
        why = (f"not comparable: run {cand.run_id} was validated on split {here}, {CHAMPION} version "
               f"{champ.version} (run {champ.run_id}) on split {there}")
    elif beats(cand.score, champ_score[0], metric):
        _move(client, name, v, champ)
        return (f"promoted run {cand.run_id} as {name} version {v} ({CHAMPION}): {metric} {cand.score:.4f} beats "
                f"{champ_score[0]:.4f} of version {champ.version}, now {PREVIOUS}")
    else:
        why = (f"{metric} {cand.score:.4f} does not beat {champ_score[0]:.4f} of {CHAMPION} version "
               f"{champ.version}")
    if force:
        _move(client, name, v, champ)
        return f"forced: run {cand.run_id} is {CHAMPION} as {name} version {v} although {why}; version {champ.version} is {PREVIOUS}"
    return f"registered run {cand.run_id} as {name} version {v} and kept {CHAMPION} version {champ.version}: {why}" + (
        "; pass --force to promote anyway" if why.startswith("not comparable") else "")


def _check_name(name: str) -> None:
    if not name or "'" in name or "/" in name or "@" in name:
        raise PromotionError(f"registered model name {name!r}: use letters, digits, '-', '_' or '.' "
                             "(no quotes, '/' or '@')")


def promote(experiment: str, metric: str = "val_balanced_accuracy", name: str = "skinclr",
            run_id: str | None = None, force: bool = False, split: str | None = None) -> str:
    """Register the best (or the given) run's model as a new version of `name`; make it `champion`
    if it beats the current one on the same split (or `force`). Returns what happened, in words.

    Only runs validated on the champion's split (or `split`) compete, and a run registered
    before is compared again through its existing version, never registered twice.

    The candidate's score is `best_<metric>` when logged, else the max of the metric's history
    (min for a loss); the champion's source run is scored the same way, so the comparison is
    always on the numbers the runs hold now."""
    _check_name(name)
    client = tracking.client()
    champ = alias_version(client, name, CHAMPION)
    if split is None and run_id is None and champ is not None:
        split = _source_split(client, champ)
    cand = select_candidate(client, experiment, metric, run_id, split)
    if champ is not None and champ.run_id == cand.run_id:
        return f"run {cand.run_id} is already {CHAMPION} ({name} version {champ.version}, {metric} {cand.score:.4f})"
    existing = run_versions(client, name, cand.run_id)
    version = existing[-1] if existing else register(client, name, cand, metric)
    try:
        # a version registered earlier holds no place in the ticket order: wait for every pending one
        with serialized(client, name, None if existing else int(version.version)):
            message = _decide(client, name, version, cand, metric, force)
    except BaseException:
        with suppress(MlflowException):
            client.set_model_version_tag(name, version.version, names.PROMOTION_TAG, "failed")
        raise
    client.set_model_version_tag(name, version.version, names.PROMOTION_TAG, "done")
    if existing:
        return f"{message} (run {cand.run_id} was registered before as version {version.version}; no new version)"
    client.update_model_version(name, version.version, description=f"{version.description}\n\nPromotion: {message}.")
    return message


def run_versions(client: MlflowClient, name: str, run_id: str) -> list[ModelVersion]:
    """The versions of `name` registered from this run, oldest first."""
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return []
    return sorted(found, key=lambda v: int(v.version))


def _source_split(client: MlflowClient, version: ModelVersion) -> str | None:
    """The split fingerprint a version's run was validated on (None when unknown)."""
    try:
        return client.get_run(version.run_id).data.tags.get(names.SPLIT_FINGERPRINT_TAG) if version.run_id else None
    except MlflowException:
        return version.tags.get(names.VERSION_SPLIT_TAG)


def rollback(name: str = "skinclr") -> str:
    """Swap `champion` and `previous`: the model served before the last promotion serves again.

    On a tracking server it waits for pending promotions first; a promotion that registers while
    the two alias writes happen may still compare against the champion being rolled back."""
    _check_name(name)
    client = tracking.client()
    with serialized(client, name, None):
        champ, prev = alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)
        if champ is None or prev is None:
            raise PromotionError(f"{name} has no '{CHAMPION}' and '{PREVIOUS}' pair to swap "
                                 f"({CHAMPION}: {champ.version if champ else 'none'}, "
                                 f"{PREVIOUS}: {prev.version if prev else 'none'})")
        if champ.version == prev.version:
            raise PromotionError(f"{name}: '{CHAMPION}' and '{PREVIOUS}' both point at version {champ.version} "
                                 "(a promotion stopped between its two alias writes); nothing to roll back")
        _move(client, name, prev.version, champ)
    return f"rolled back {name}: {CHAMPION} is version {prev.version} again, {PREVIOUS} is version {champ.version}"
