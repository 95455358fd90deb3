"""Promotion to the model registry on real fine-tune runs: the alias moves only forward, survives a
crash part-way, and two promotions at once leave the better model as champion."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from skinclr.track import candidates, registry, store, tracking
from skinclr.track.candidates import PromotionError, logged_model
from skinclr.names import PROMOTION_TAG
from skinclr.track.registry import CHAMPION, PREVIOUS, promote, rollback
from skinclr.track.tracking import RunLogger
from skinclr.cli.main import main as cli_main
from tests.track.test_server import running_server

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "skinclr-finetune"
TINY = ["data.image_size=32", "train.epochs=2", "train.batch_size=16", "data.workers=0", "train.max_steps_per_epoch=5"]


def finetune_run(data_root: Path, *overrides: str, config: str = "baseline_scratch.yaml") -> str:
    """A real, tiny fine-tune run in the current store; returns its run id."""
    from skinclr.config import load_config
    from skinclr.run.runner import run_finetune

    cfg = load_config(REPO / "experiments" / "paper" / config, [f"data.root={data_root}", *TINY, *overrides],
                      stage="finetune")
    return run_finetune(cfg, progress=False).run_id


@pytest.fixture(scope="module")
def runs_db(synth_dir, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One store with four fine-tune runs: three seeds/lrs on one split, one on another split.

    Tests copy its database (the artifacts stay shared and read-only), so each starts from the
    same runs with an empty registry."""
    root = tmp_path_factory.mktemp("registry-store")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp_.setenv("SKINCLR_CACHE", str(root / "cache"))
        ids = {"a": finetune_run(synth_dir, "train.seed=0"),
               "b": finetune_run(synth_dir, "train.seed=1", "train.lr=1e-3"),
               "c": finetune_run(synth_dir, "train.seed=2", "train.lr=3e-3"),
               "other_split": finetune_run(synth_dir, "train.seed=0", "data.split_seed=7")}
    return root / "mlflow.db", ids


@pytest.fixture
def runs(runs_db, tmp_path) -> dict[str, str]:
    db, ids = runs_db
    shutil.copy(db, tmp_path / "mlflow.db")  # the autouse store of this test
    return ids


def score(run_id: str, metric: str = "val_balanced_accuracy") -> float:
    c = tracking.client()
    return candidates.run_score(c, c.get_run(run_id), metric)[0]


def alias_run(alias: str, name: str = "skinclr") -> str | None:
    mv = registry.alias_version(tracking.client(), name, alias)
    return mv.run_id if mv else None


def test_runs_differ_in_split_where_intended(runs):
    c = tracking.client()
    splits = {k: c.get_run(v).data.tags["split_fingerprint"] for k, v in runs.items()}
    assert splits["a"] == splits["b"] == splits["c"] != splits["other_split"]


def split_of(run_id: str) -> str:
    return tracking.client().get_run(run_id).data.tags["split_fingerprint"]


def test_promote_picks_the_best_run_and_records_where_it_came_from(runs):
    with pytest.raises(PromotionError, match="2 different splits.*--split"):
        promote(EXPERIMENT)  # no champion yet, and scores on two splits do not compare
    assert not tracking.client().search_registered_models()
    message = promote(EXPERIMENT, split=split_of(runs["a"]))
    champ = registry.alias_version(tracking.client(), "skinclr", CHAMPION)
    best = max(score(runs[k]) for k in ("a", "b", "c"))
    assert score(champ.run_id) == best
    assert "first champion" in message and champ.run_id in message
    c = tracking.client()
    run = c.get_run(champ.run_id)
    model = logged_model(c, champ.run_id)  # the version links to the run's logged model, and it to the version
    assert champ.source == f"models:/{model.model_id}"
    assert json.loads(c.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "skinclr", "version": champ.version}]
    assert champ.tags["skinclr.split_fingerprint"] == run.data.tags["split_fingerprint"]
    assert champ.tags["skinclr.data_fingerprint"] == run.data.tags["data_fingerprint"]
    assert champ.tags["skinclr.git_commit"] == run.data.tags["mlflow.source.git.commit"]
    assert float(champ.tags["skinclr.metric_value"]) == run.data.metrics["best_val_balanced_accuracy"]
    assert champ.tags[PROMOTION_TAG] == "done"
    assert champ.run_id in champ.description and run.data.tags["split_fingerprint"] in champ.description
    assert "Promotion: promoted" in champ.description


def test_promote_keeps_the_champion_unless_beaten_and_rollback_swaps(runs):
    ids = [runs[k] for k in ("a", "b", "c")]
    best, worst = max(ids, key=score), min(ids, key=score)
    promote(EXPERIMENT, run_id=best)
    assert promote(EXPERIMENT, run_id=best).startswith(f"run {best} is already champion")

    message = promote(EXPERIMENT, run_id=worst)
    assert "kept champion version 1" in message and "does not beat" in message
    assert alias_run(CHAMPION) == best and alias_run(PREVIOUS) is None

    message = promote(EXPERIMENT, run_id=worst, force=True)
    assert message.startswith("forced")
    assert (alias_run(CHAMPION), alias_run(PREVIOUS)) == (worst, best)

    assert "champion is version" in rollback("skinclr")
    assert (alias_run(CHAMPION), alias_run(PREVIOUS)) == (best, worst)


def test_a_lower_is_better_metric_is_minimised(runs):
    ids = [runs[k] for k in ("a", "b", "c")]
    promote(EXPERIMENT, metric="val_loss", run_id=max(ids, key=lambda r: score(r, "val_loss")))
    message = promote(EXPERIMENT, metric="val_loss")
    best = min(ids, key=lambda r: score(r, "val_loss"))
    assert alias_run(CHAMPION) == best, message
    assert "min of val_loss history" in registry.alias_version(tracking.client(), "skinclr", CHAMPION).description


def test_a_run_on_another_split_is_not_comparable(runs):
    promote(EXPERIMENT, run_id=runs["a"])
    message = promote(EXPERIMENT, run_id=runs["other_split"])
    assert "not comparable" in message and "--force" in message
    assert alias_run(CHAMPION) == runs["a"]
    promote(EXPERIMENT, run_id=runs["other_split"], force=True)
    assert (alias_run(CHAMPION), alias_run(PREVIOUS)) == (runs["other_split"], runs["a"])


def test_only_runs_on_the_champions_split_compete_and_no_run_is_registered_twice(runs):
    """The champion's split decides who competes: a run on another split never enters, however
    good, and promoting again registers no second version of a run."""
    c = tracking.client()
    ids = [runs[k] for k in ("a", "b", "c")]
    worst = min(ids, key=score)
    promote(EXPERIMENT, run_id=worst)
    for _ in range(2):
        promote(EXPERIMENT)
    versions = c.search_model_versions("name='skinclr'")
    sources = [v.run_id for v in versions]
    assert len(sources) == len(set(sources)), sources  # one version per run
    assert runs["other_split"] not in sources
    assert alias_run(CHAMPION) == max(ids, key=score)

    promote(EXPERIMENT, run_id=worst, force=True)  # champion forced back to the worst run's version 1
    message = promote(EXPERIMENT)  # the best run moves back in through the version it already has
    assert alias_run(CHAMPION) == max(ids, key=score) and "no new version" in message
    assert len(c.search_model_versions("name='skinclr'")) == len(versions)

    other = promote(EXPERIMENT, split=split_of(runs["other_split"]))
    assert "not comparable" in other and alias_run(CHAMPION) == max(ids, key=score)
    with pytest.raises(PromotionError, match="no finished run with a model on split nope"):
        promote(EXPERIMENT, split="nope")


def test_a_crash_before_the_alias_moves_leaves_the_old_champion(runs, monkeypatch):
    promote(EXPERIMENT, run_id=runs["a"])
    real = MlflowClient.set_registered_model_alias

    def crash_on_champion(self, name, alias, version):
        if alias == CHAMPION:
            raise ConnectionError("tracking store went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash_on_champion)
    with pytest.raises(ConnectionError):
        promote(EXPERIMENT, run_id=runs["b"], force=True)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)

    c = tracking.client()
    assert alias_run(CHAMPION) == runs["a"]
    assert c.get_model_version("skinclr", "2").tags[PROMOTION_TAG] == "failed"
    promote(EXPERIMENT, run_id=runs["b"], force=True)  # the retry goes through the version it registered
    assert (alias_run(CHAMPION), alias_run(PREVIOUS)) == (runs["b"], runs["a"])
    assert c.get_model_version("skinclr", "2").tags[PROMOTION_TAG] == "done"
    assert len(c.search_model_versions("name='skinclr'")) == 2


def _promote_elsewhere(uri: str, run_id: str, name: str, force: bool, barrier, results) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from skinclr.track.registry import promote as promote_here

    if barrier is not None:
        barrier.wait(timeout=120)
    results.put((run_id, promote_here(EXPERIMENT, metric="val_loss", name=name, run_id=run_id, force=force)))


class Elsewhere:
    """One promotion per run id, each in its own process (spawned: nothing shared with pytest)."""

    def __init__(self, uri: str, run_ids: list[str], name: str = "skinclr", force: bool = False,
                 together: bool = True):
        ctx = mp.get_context("spawn")
        # held here until the end: the children attach to these by name
        self.barrier = ctx.Barrier(len(run_ids)) if together else None
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_promote_elsewhere, args=(uri, r, name, force, self.barrier, self.results))
                      for r in run_ids]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def finish(self) -> dict[str, str]:
        for p in self.procs:
            p.join(timeout=300)
        assert all(p.exitcode == 0 for p in self.procs), [p.exitcode for p in self.procs]
        return dict(self.results.get(timeout=5) for _ in self.procs)


def _by_val_loss(runs: dict[str, str]) -> list[str]:
    ids = sorted((runs[k] for k in ("a", "b", "c")), key=lambda r: score(r, "val_loss"))
    losses = [score(r, "val_loss") for r in ids]
    assert losses[0] < losses[1] < losses[2], f"need three distinct val_loss values, got {losses}"
    return ids


def _race_and_check(uri: str, runs: dict[str, str], name: str) -> None:
    """Champion: the worst val_loss; then the best and the middle run are promoted at once.
    Whatever the order, the best ends champion, and `previous` is what it replaced: the middle
    run if that one got in first (and beat the worst), else the worst."""
    best, middle, worst = _by_val_loss(runs)
    promote(EXPERIMENT, metric="val_loss", name=name, run_id=worst)
    messages = Elsewhere(uri, [best, middle], name).finish()
    assert alias_run(CHAMPION, name) == best, messages
    middle_won = messages[middle].startswith("promoted")
    assert alias_run(PREVIOUS, name) == (middle if middle_won else worst), messages
    states = [v.tags[PROMOTION_TAG] for v in tracking.client().search_model_versions(f"name='{name}'")]
    assert states == ["done"] * 3


def _wait_for_version(name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(str(v.version) == version for v in tracking.client().search_model_versions(f"name='{name}'")):
            return
        time.sleep(0.2)
    pytest.fail(f"version {version} of {name} never appeared")


def _assert_blocked(other: Elsewhere, name: str, champion: str, settle: float = 2.0) -> None:
    """The other promotion registered its version but, held up, has not moved the alias."""
    time.sleep(settle)  # time enough to finish, had it not been held
    assert other.alive()
    assert alias_run(CHAMPION, name) == champion


@pytest.mark.slow
def test_two_promotions_at_once_leave_the_better_champion(runs):
    _race_and_check(store.tracking_uri(), runs, "skinclr")


@pytest.mark.slow
def test_a_promotion_waits_while_another_holds_the_lock(runs):
    promote(EXPERIMENT, run_id=runs["a"])
    with registry.file_lock(registry.lock_file("skinclr")):
        other = Elsewhere(store.tracking_uri(), [runs["b"]], force=True, together=False)
        _wait_for_version("skinclr", "2")
        _assert_blocked(other, "skinclr", runs["a"])
    other.finish()
    assert (alias_run(CHAMPION), alias_run(PREVIOUS)) == (runs["b"], runs["a"])


@pytest.fixture(scope="module")
def server_url(runs_db, tmp_path_factory):
    """A tracking server over a copy of the runs' store; its tests use model names of their own."""
    root = tmp_path_factory.mktemp("registry-server")
    shutil.copy(runs_db[0], root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        with running_server(root / "server.log", workers=2) as (url, _):
            yield url


@pytest.mark.slow
def test_two_promotions_at_once_through_a_server_leave_the_better_champion(runs, server_url, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    _race_and_check(server_url, runs, "race")


@pytest.mark.slow
def test_through_a_server_promotions_take_turns_in_version_order(runs, server_url, monkeypatch):
    """A lower version still pending (another promotion in flight) holds the next one back."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    promote(EXPERIMENT, name="turns", run_id=runs["a"])
    c = tracking.client()
    c.create_model_version("turns", source=f"runs:/{runs['c']}/model", run_id=runs["c"],
                           tags={PROMOTION_TAG: "pending"})
    other = Elsewhere(server_url, [runs["b"]], name="turns", force=True, together=False)
    _wait_for_version("turns", "3")
    _assert_blocked(other, "turns", runs["a"])
    c.set_model_version_tag("turns", "2", PROMOTION_TAG, "done")
    other.finish()
    assert (alias_run(CHAMPION, "turns"), alias_run(PREVIOUS, "turns")) == (runs["b"], runs["a"])

    # a version left pending by a process that died stops counting once stale
    c.create_model_version("turns", source=f"runs:/{runs['c']}/model", run_id=runs["c"],
                           tags={PROMOTION_TAG: "pending"})
    registry.wait_for_turn(c, "turns", 5, stale=0.5)


def test_promote_errors_name_the_problem(runs, capsys):
    with pytest.raises(PromotionError, match="no experiment 'nope'.*skinclr-finetune"):
        promote("nope")
    empty = RunLogger.create("skinclr-empty", run_name="no model")
    empty.log_metrics({"val_balanced_accuracy": 0.9}, step=1)
    empty.end()
    with pytest.raises(PromotionError, match="no 'model' artifact"):
        promote("skinclr-empty", run_id=empty.run_id)
    with pytest.raises(PromotionError, match="has no finished run with metric 'val_balanced_accuracy' and a 'model'"):
        promote("skinclr-empty")
    with pytest.raises(PromotionError, match="no metric 'knn_balanced_accuracy'"):
        promote(EXPERIMENT, metric="knn_balanced_accuracy", run_id=runs["a"])
    with pytest.raises(PromotionError, match="no 'champion' and 'previous' pair"):
        rollback("skinclr")

    assert cli_main(["promote", "--experiment", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no experiment 'nope'")


@pytest.mark.real_data
def test_the_champion_alias_loads_in_skinclr_predict(runs, real_data_dir, tmp_path):
    promote(EXPERIMENT, run_id=runs["b"])
    images = sorted((real_data_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:2]
    out = tmp_path / "probs.csv"
    proc = subprocess.run([sys.executable, "-m", "skinclr.cli.main", "predict", "--model", "models:/skinclr@champion",
                           *map(str, images), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = pd.read_csv(out)
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert list(got.columns) == ["image", *classes, "predicted"]
    assert got[classes].sum(axis=1).round(6).eq(1.0).all()

    from skinclr.serve.uris import load_predictor

    direct = load_predictor(f"runs:/{runs['b']}/model").predict_proba([str(p) for p in images])
    assert got[classes].to_numpy() == pytest.approx(direct, abs=1e-4)


def test_a_run_that_trained_nothing_is_never_promoted(runs):
    """A finished run whose epochs made no optimizer step (as runs made before the engine's guard
    could be) is refused by --run and passed over by the experiment's pick."""
    c = tracking.client()
    best = max(("a", "b", "c"), key=lambda k: score(runs[k]))
    c.log_metric(runs[best], "images_per_second", 0.0, step=99)  # its last epoch trained nothing
    with pytest.raises(candidates.PromotionError, match="trained nothing"):
        candidates.select_candidate(c, EXPERIMENT, "val_balanced_accuracy", run_id=runs[best])
    split = c.get_run(runs["a"]).data.tags["split_fingerprint"]
    picked = candidates.select_candidate(c, EXPERIMENT, "val_balanced_accuracy", split=split)
    assert picked.run_id != runs[best]
