"""A sweep's folder: created once by `start`, read again by `--resume`.

The plan names the folder by the config's hash (skinclr.tune.plan.sweep_folder), so the same
command finds it again. `start` does what must happen once per sweep (decode the images, pin one
split, open the MLflow parent run) and writes the resume state: what every trial starts from and
the parent run it logs under; `read_state` reads it back.
"""
from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from skinclr import names
from skinclr.config import ConfigError
from skinclr.track.tracking import RunLogger
from skinclr.tune.spaces import parent_params, sampled_keys
from skinclr.tune.plan import SweepRunConfig, command_tags
from skinclr.tune.trainables import METRICS, MODE, TrialSetup

SPLIT_KEYS = ("data.folds", "data.fold", "data.val_fraction", "data.split_seed")  # varied: trials split themselves


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else path


def trial_base(cfg: SweepRunConfig, split_file: Path | None, cache_dir: Path) -> SweepRunConfig:
    """What every trial starts from: paths made absolute (trials run in their own folders), the
    driver's split (unless the trials vary it) and cache pinned, one torch thread per CPU of the
    trial, and no implicit resume of some other unfinished run with the same config."""
    base = copy.deepcopy(cfg)
    base.data.root = _absolute(base.data.root)
    base.data.split_file = str(split_file) if split_file else ""
    base.data.cache_dir = str(cache_dir)
    base.finetune.imagenet_weights = _absolute(base.finetune.imagenet_weights)
    if base.finetune.init not in ("scratch", "imagenet") and not base.finetune.init.startswith("runs:/"):
        base.finetune.init = _absolute(base.finetune.init)
    base.train.threads = max(1, int(cfg.sweep.cpus_per_trial))
    base.tracking.resume = False
    return base


def start(cfg: SweepRunConfig, folder: Path, uri: str, drawn_from: dict, space: dict,
          parent_of: str | None, command: str = "") -> tuple[TrialSetup, dict[str, Any]]:
    """A new sweep: decode once, pin the split, open the parent run, write the resume state (and
    return it, with what every trial starts from). `command` reproduces the sweep: the parent
    and every trial carry it."""
    from skinclr.data.inputs import resolve_inputs, save_inputs

    inputs = resolve_inputs(cfg)  # the sweep's only scan and decode of the folder
    split_file = save_inputs(inputs, folder)  # the split, and beside it the resolved inputs its trials open
    own_split = set(SPLIT_KEYS) & set(sampled_keys(space))  # e.g. a study over folds
    base = trial_base(cfg, None if own_split else split_file, inputs.cache.path.parent)
    parent = RunLogger.create(cfg.experiment, cfg.tracking.run_name or f"sweep-{folder.name}",
                              tags={names.SWEEP_PARENT_TAG: "1", names.STAGE_TAG: cfg.stage, names.SWEEP_FOLDER_TAG: str(folder),
                                    names.SEARCH_TAG: cfg.sweep.search,
                                    **inputs.tags(), **command_tags(command)},
                              parent_run_id=parent_of)
    parent.log_params(parent_params(cfg.flat(), space))  # swept keys: their distribution
    with tempfile.TemporaryDirectory() as tmp:
        parent.log_artifact(cfg.save(Path(tmp) / "sweep_config.yaml"), "sweep")
        (Path(tmp) / "search_space.yaml").write_text(yaml.safe_dump(drawn_from, sort_keys=False))
        (Path(tmp) / "search_space_narrowed.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
        for name in ("search_space.yaml", "search_space_narrowed.yaml"):
            parent.log_artifact(Path(tmp) / name, "sweep")
    parent.log_artifact(split_file, "sweep")
    s = cfg.sweep
    setup = TrialSetup(stage=cfg.stage, base=base.to_dict(), parent_run_id=parent.run_id, tracking_uri=uri,
                       name=folder.name, storage=str(folder.parent), cpus=s.cpus_per_trial, gpus=s.gpus_per_trial,
                       workers=s.workers_per_trial, command=command)
    state = {"setup": asdict(setup), "sampled": sampled_keys(space), "metric": METRICS[cfg.stage], "mode": MODE,
             "max_t": s.max_t or cfg.train.epochs, "epochs": cfg.train.epochs}
    (folder / names.SWEEP_STATE_FILE).write_text(json.dumps(state, indent=1))
    return setup, state


def read_state(folder: Path, uri: str) -> dict[str, Any]:
    """The state a resumed sweep continues from: Tune must be able to restore the folder, and the
    store must be the one its runs live in."""
    state_file = folder / names.SWEEP_STATE_FILE
    if not tune.Tuner.can_restore(str(folder)):
        raise ConfigError(f"no sweep to resume in {folder}: it stopped before its first trial; "
                          "remove the folder and run the same command without --resume")
    state = json.loads(state_file.read_text())
    if state["setup"]["tracking_uri"] != uri:
        raise ConfigError(f"the sweep in {folder} logs to {state['setup']['tracking_uri']}, but MLFLOW_TRACKING_URI "
                          f"is {uri}; set MLFLOW_TRACKING_URI to the sweep's store to resume it")
    return state
