"""A sweep's Optuna charts: drawn from its sampler's study or from its trials, self-contained
HTML on the parent run, and a chart with nothing to say skipped with a line, never an error."""
from __future__ import annotations

import re

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from skinclr import names
from skinclr.track import tracking
from skinclr.track.tracking import RunLogger
from skinclr.tune.charts import log_charts, study_from_trials, study_storage, sweep_study

METRIC = "knn_balanced_accuracy"
SPACE = {"simclr.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
         "train.epochs": {"type": "randint", "low": 2, "high": 6},
         "pretrain.method": {"type": "choice", "values": ["simclr", "byol"]},
         "augment.crop_min": 0.2}  # fixed by the sweep: no axis of its own


def trials_table(rows: list[tuple]) -> pd.DataFrame:
    """A trials table as records.trials_table writes it (best first), from (temperature, epochs, method, last)."""
    table = pd.DataFrame([{"trial_id": f"abc_{i:05d}", "run_id": f"run{i}", "status": "FINISHED",
                           "simclr.temperature": t, "train.epochs": e, "pretrain.method": m,
                           f"last_{METRIC}": last, f"best_{METRIC}": last, "epochs": 2, "stopped_by": ""}
                          for i, (t, e, m, last) in enumerate(rows)])
    return table.sort_values(f"best_{METRIC}", ascending=False, na_position="last")


SIX = [(0.1, 2, "simclr", 0.41), (0.3, 5, "byol", 0.52), (0.07, 3, "simclr", 0.38),
       (0.6, 6, "byol", None), (0.2, 4, "simclr", 0.47), (0.9, 2, "byol", 0.30)]


def charts_of(table: pd.DataFrame, tmp_path, space=SPACE, search="random") -> tuple[list[str], set[str], str]:
    parent = RunLogger.create("charts", run_name="sweep-x", tags={names.STAGE_TAG: "pretrain"})
    paths = log_charts(parent, tmp_path, table, space, METRIC, "max", search, "pretrain sweep x")
    logged = {a.path for a in tracking.client().list_artifacts(parent.run_id, names.SWEEP_CHARTS)}
    return paths, logged, parent.run_id


def test_a_random_search_is_drawn_from_a_study_of_its_trials():
    study = study_from_trials(trials_table(SIX), SPACE, METRIC, "max")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.user_attrs["trial_id"] for t in study.trials] == [f"abc_{i:05d}" for i in range(6)]  # trial order
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 1  # reported nothing
    assert [t.value for t in study.trials if t.state == TrialState.COMPLETE] == [0.41, 0.52, 0.38, 0.47, 0.30]
    first = study.trials[0]
    assert first.params == {"simclr.temperature": 0.1, "train.epochs": 2, "pretrain.method": "simclr"}
    assert first.distributions == {"simclr.temperature": FloatDistribution(0.05, 1.0, log=True),
                                   "train.epochs": IntDistribution(2, 6),
                                   "pretrain.method": CategoricalDistribution(["simclr", "byol"])}


def test_an_optuna_sweep_draws_its_samplers_own_study(tmp_path):
    own = optuna.create_study(study_name=tmp_path.name, storage=study_storage(tmp_path), direction="maximize")
    own.optimize(lambda trial: trial.suggest_float("simclr.temperature", 0.05, 1.0, log=True), n_trials=3)
    study = sweep_study(tmp_path, trials_table(SIX), SPACE, METRIC, "max", "optuna")
    assert [t.value for t in study.trials] == [t.value for t in own.trials]
    built = sweep_study(tmp_path, trials_table(SIX), SPACE, METRIC, "max", "random")
    assert len(built.trials) == 6


def test_the_three_charts_land_on_the_parent_as_self_contained_html(tmp_path):
    paths, logged, run_id = charts_of(trials_table(SIX), tmp_path)
    expected = {f"{names.SWEEP_CHARTS}/{name}" for name in names.SWEEP_CHART_FILES}
    assert set(paths) == logged == expected
    for name in names.SWEEP_CHART_FILES:
        html = open(tracking.client().download_artifacts(run_id, f"{names.SWEEP_CHARTS}/{name}", str(tmp_path))).read()
        assert "pretrain sweep x" in html and METRIC in html
        assert ("simclr.temperature" in html) == (name != names.SWEEP_HISTORY_HTML)  # an axis or a bar of each key
        assert not re.search(r"<script[^>]+src=", html)  # nothing fetched at view time
        assert "plotly.js v" in html and len(html) > 1_000_000  # plotly.js itself inside


@pytest.mark.parametrize("rows, space, drawn, said", [
    (SIX[:1], SPACE, {names.SWEEP_HISTORY_HTML}, "one finished trial"),
    ([(0.1, 2, "simclr", None), (0.2, 3, "byol", None)], SPACE, set(), "no trial reported"),
    (SIX, {"simclr.temperature": SPACE["simclr.temperature"]}, {names.SWEEP_HISTORY_HTML, names.SWEEP_PARALLEL_HTML},
     "1 swept key"),
    ([(0.1, 2, "simclr", 0.4), (0.1, 2, "simclr", 0.5)], SPACE,
     {names.SWEEP_HISTORY_HTML, names.SWEEP_PARALLEL_HTML}, "never varied"),
], ids=["one-trial", "no-finished-trial", "single-key", "same-values"])
def test_a_chart_with_nothing_to_say_is_skipped_with_one_line(tmp_path, capsys, rows, space, drawn, said):
    paths, logged, _ = charts_of(trials_table(rows), tmp_path, space)
    assert logged == set(paths) == {f"{names.SWEEP_CHARTS}/{name}" for name in drawn}
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sweep] no ")]
    assert len(notes) == 1 and said in notes[0]


def test_a_broken_study_is_a_note_not_a_failed_sweep(tmp_path, capsys):
    (tmp_path / names.SWEEP_STUDY_FILE).write_text("not a journal\n")
    paths, logged, _ = charts_of(trials_table(SIX), tmp_path, search="optuna")
    assert paths == [] and logged == set()
    assert "[sweep] no charts:" in capsys.readouterr().out
