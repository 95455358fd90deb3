"""A sweep's charts: Optuna's own views of its trials (optimization history, parameter
importances, parallel coordinates) as self-contained HTML on the parent run, under
`sweep_charts/` (names.SWEEP_CHARTS), which the MLflow UI's artifact viewer shows as they are.

An Optuna sweep draws its sampler's study, which its folder keeps (names.SWEEP_STUDY_FILE), so
a resumed driver draws every trial, those of the driver before it too. A random or grid sweep,
or an Optuna one whose folder has no study, gets a study built from its trials table: each
trial's sampled values, with the distributions of the space it drew them from. Either way a
trial's value is what the search heard last: the sweep's metric at its last reported epoch.
A chart with nothing to say (no finished trial; one trial; importances of a single swept key or
of values that never varied) is skipped with one line saying why, and drawing never fails a sweep.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinclr import names
from skinclr.track.tracking import RunLogger


def study_storage(folder: Path):
    """The Optuna journal in a sweep's folder: where an Optuna sweep's sampler keeps its study."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(folder) / names.SWEEP_STUDY_FILE)))


def _plain(value: Any) -> Any:
    """A value as Optuna's categorical choices take it: None, bool, int, float or str."""
    value = value.item() if isinstance(value, np.generic) else value
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def optuna_distribution(spec: dict[str, Any]):
    """A space entry (spaces.py) as the Optuna distribution it is."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if spec["type"] in ("choice", "grid"):
        return CategoricalDistribution(list(dict.fromkeys(_plain(v) for v in spec["values"])))
    if spec["type"] == "randint":  # both ends included, as in a space file
        return IntDistribution(int(spec["low"]), int(spec["high"]))
    return FloatDistribution(float(spec["low"]), float(spec["high"]), log=spec["type"] == "loguniform")


def _param(distribution, value: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    value = _plain(value)
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[distribution.to_internal_repr(value)]  # ValueError: not a choice
    return int(value) if isinstance(distribution, IntDistribution) else float(value)


def study_from_trials(table: pd.DataFrame, space: dict[str, Any], metric: str, mode: str):
    """An Optuna study of a sweep's trials (one row each of its trials table), in trial order:
    COMPLETE with the metric at its last reported epoch, FAIL when it reported none. A trial
    whose values its space does not hold (the space changed since) is left out."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study made
    distributions = {key: optuna_distribution(spec) for key, spec in space.items() if isinstance(spec, dict)}
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for row in table.sort_values("trial_id").to_dict("records"):
        try:
            value = float(row.get(f"last_{metric}"))
        except (TypeError, ValueError):
            value = math.nan
        done = not math.isnan(value)
        try:
            params = {key: _param(d, row[key]) for key, d in distributions.items()}
            study.add_trial(create_trial(params=params, distributions=distributions,
                                         value=value if done else None,
                                         state=TrialState.COMPLETE if done else TrialState.FAIL,
                                         user_attrs={"trial_id": row["trial_id"], "run_id": row.get("run_id", "")}))
        except (KeyError, ValueError, TypeError):
            continue
    return study


def sweep_study(folder: Path, table: pd.DataFrame, space: dict[str, Any], metric: str, mode: str, search: str):
    """The study to draw: the sampler's own (an Optuna sweep), else one built from the trials."""
    import optuna

    if search == "optuna" and (Path(folder) / names.SWEEP_STUDY_FILE).is_file():
        return optuna.load_study(study_name=None, storage=study_storage(folder))
    return study_from_trials(table, space, metric, mode)


def figures(study, metric: str, title: str) -> tuple[dict[str, Any], list[str]]:
    """Optuna's figures that say something, by artifact file name, and one note per chart skipped."""
    from optuna.trial import TrialState
    from optuna.visualization import plot_optimization_history, plot_parallel_coordinate, plot_param_importances

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return {}, [f"no charts: no trial reported {metric}"]
    keys = sorted({key for trial in done for key in trial.distributions})
    varied = [k for k in keys if len({repr(t.params.get(k)) for t in done}) > 1]
    target = f"{metric} (last epoch)"
    draw = {names.SWEEP_HISTORY_HTML: lambda: plot_optimization_history(study, target_name=target)}
    notes = []
    if len(done) < 2:
        notes.append(f"no {names.SWEEP_IMPORTANCES_HTML} or {names.SWEEP_PARALLEL_HTML}: one finished trial, "
                     "nothing to compare")
    else:
        if len(keys) < 2:
            notes.append(f"no {names.SWEEP_IMPORTANCES_HTML}: {len(keys)} swept key(s), nothing to weigh against")
        elif not varied or len({t.value for t in done}) < 2:
            notes.append(f"no {names.SWEEP_IMPORTANCES_HTML}: the finished trials' values or {metric} never varied")
        else:
            draw[names.SWEEP_IMPORTANCES_HTML] = lambda: plot_param_importances(study, target_name=target)
        if keys:
            draw[names.SWEEP_PARALLEL_HTML] = lambda: plot_parallel_coordinate(study, target_name=target)
        else:
            notes.append(f"no {names.SWEEP_PARALLEL_HTML}: the sweep swept no key")
    out = {}
    for name, plot in draw.items():
        try:
            figure = plot()
        except Exception as err:  # a chart Optuna cannot draw is a note, never a failed sweep
            notes.append(f"no {name}: {type(err).__name__}: {err}")
            continue
        figure.update_layout(title=f"{title}: {figure.layout.title.text or name}")
        out[name] = figure
    return out, notes


def log_charts(parent: RunLogger, folder: Path, table: pd.DataFrame, space: dict[str, Any], metric: str,
               mode: str, search: str, title: str) -> list[str]:
    """Draw the sweep's charts onto its parent run (`sweep_charts/<chart>.html`, plotly.js
    inside each file: the UI may have no internet); the artifact paths logged. One line per
    chart skipped; any error becomes a line too."""
    try:
        study = sweep_study(folder, table, space, metric, mode, search)
        drawn, notes = figures(study, metric, title)
        with tempfile.TemporaryDirectory() as tmp:
            for name, figure in drawn.items():
                figure.write_html(Path(tmp) / name, include_plotlyjs=True, full_html=True)
            if drawn:
                parent.log_artifact(Path(tmp), names.SWEEP_CHARTS)
    except Exception as err:  # the trials' runs and table are what matter; a chart never fails the sweep
        drawn, notes = {}, [f"no charts: {type(err).__name__}: {err}"]
    for note in notes:
        print(f"[sweep] {note}", flush=True)
    paths = [f"{names.SWEEP_CHARTS}/{name}" for name in drawn]
    if paths:
        print(f"[sweep] Optuna charts on the parent run: {', '.join(paths)}", flush=True)
    return paths
