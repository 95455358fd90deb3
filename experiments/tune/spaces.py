"""Search spaces as data: a YAML file of `config.key: distribution`, narrowed by a sweep config.

A space file names each tunable by its config key and gives its distribution:

    simclr.temperature: {type: loguniform, low: 0.05, high: 1.0}
    finetune.class_weighted_loss: {type: choice, values: [false, true]}
    monitor.k: {type: randint, low: 5, high: 40}      # both ends included

A grid study (`sweep.search: grid`) lists its values in the sweep config instead,
`sweep.grid: {data.label_fraction: [0.1, 1.0], train.seed: [0, 1, 2]}`, and runs every combination.

A sweep's `sweep.narrow` then fixes a key (`key: value`), narrows a range (`key: {low, high}`)
or restricts it to a few values (`key: [a, b]`), always inside what the space allows, so a
sweep config can never wander outside the ranges the project agreed on.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


import skinclr.configs
import skinclr.search_spaces
from skinclr.config import Config, ConfigError, load_yaml, set_value, validate

# The shipped folders as the checkout lays them out; an installed skinclr carries both as package data.
SHIPPED = {"experiments": Path(skinclr.configs.__file__).parent,
           "search_spaces": Path(skinclr.search_spaces.__file__).parent}
SPACES = SHIPPED["search_spaces"]
RANGES = ("uniform", "loguniform", "randint")
TYPES = (*RANGES, "choice")


def project_path(path: str | Path) -> Path:
    """A relative path from the working directory, else a shipped file (the shipped sweep
    configs name `search_spaces/...` and `experiments/...` that way)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not path.parts or path.parts[0] not in SHIPPED:
        return path
    shipped = SHIPPED[path.parts[0]].joinpath(*path.parts[1:])
    return shipped if shipped.exists() else path


METHODS_SPACE = "methods"  # `sweep.space: methods`: a pretraining sweep that also chooses the method


def pretrain_space(methods: list[str]) -> dict[str, dict[str, Any]]:
    """A pretraining sweep's space: each method's own ranges (declared in its module), then the
    shared ones of search_spaces/pretrain.yaml; with several methods, `pretrain.method` is a choice
    among them (a trial samples every key; the sections of methods it did not draw are unused)."""
    from skinclr.train.methods import METHODS

    space = {"pretrain.method": {"type": "choice", "values": list(methods)}} if len(methods) > 1 else {}
    for name in methods:
        for key, spec in METHODS[name].space.items():
            _check_spec(f"method {name}'s SPACE, key '{key}'", spec)
            space[key] = spec
    return {**space, **load_space(SPACES / "pretrain.yaml")}


def space_path(stage: str, space: str = "") -> Path:
    """`sweep.space`, or the stage's own file in search_spaces/."""
    path = project_path(space) if space else SPACES / f"{stage}.yaml"
    if not path.is_file():
        raise ConfigError(f"sweep.space: search-space file '{path}' does not exist; "
                          f"point sweep.space at a YAML file like search_spaces/{stage}.yaml")
    return path


def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a space file: every entry a known distribution with sane bounds."""
    path = Path(path)
    raw = load_yaml(path, "search space")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"search space '{path}' must map config keys to distributions, "
                          "e.g. 'train.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}'")
    for key, spec in raw.items():
        _check_spec(f"search space '{path}', key '{key}'", spec)
    return raw


def _check_spec(where: str, spec: Any) -> None:
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise ConfigError(f"{where}: needs {{type: one of {', '.join(TYPES)}, ...}}, got {spec!r}")
    if spec["type"] == "choice":
        if not isinstance(spec.get("values"), list) or not spec["values"]:
            raise ConfigError(f"{where}: a choice needs a non-empty list 'values', got {spec!r}")
        return
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low <= high:
        raise ConfigError(f"{where}: needs numbers low <= high, got {spec!r}")
    if spec["type"] == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: a loguniform range must be positive, got low={low}")
    if spec["type"] == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: a randint range needs whole numbers, got {spec!r}")


def _inside(spec: dict, value: Any) -> bool:
    if spec["type"] == "choice":
        return value in spec["values"]
    return isinstance(value, (int, float)) and not isinstance(value, bool) and spec["low"] <= value <= spec["high"]


def narrow(space: dict[str, dict], narrowing: dict[str, Any]) -> dict[str, dict | Any]:
    """Apply `sweep.narrow`: a fixed value, a tighter {low, high}, or a list of allowed values."""
    out: dict[str, Any] = copy.deepcopy(space)
    for key, value in (narrowing or {}).items():
        where = f"sweep.narrow '{key}'"
        if key not in space:
            raise ConfigError(f"{where}: not a key of the search space ({', '.join(space)}); "
                              "fixed settings belong in the config itself")
        spec = space[key]
        if isinstance(value, dict):
            if spec["type"] == "choice":
                raise ConfigError(f"{where}: '{key}' is a choice; narrow it with a list of its values {spec['values']}")
            new = {**spec, **{k: v for k, v in value.items() if k in ("low", "high")}}
            if set(value) - {"low", "high"}:
                raise ConfigError(f"{where}: a range narrows with 'low' and/or 'high' only, got {value!r}")
            _check_spec(where, new)
            if not (_inside(spec, new["low"]) and _inside(spec, new["high"])):
                raise ConfigError(f"{where}: [{new['low']}, {new['high']}] leaves the space's range "
                                  f"[{spec['low']}, {spec['high']}]; widen the search-space file instead")
            out[key] = new
        elif isinstance(value, list):
            outside = [v for v in value if not _inside(spec, v)]
            if not value or outside:
                raise ConfigError(f"{where}: values {outside or value} are not allowed by the space's {_describe(spec)}")
            out[key] = {"type": "choice", "values": value}
        else:
            if not _inside(spec, value):
                raise ConfigError(f"{where}: {value!r} is not allowed by the space's {_describe(spec)}")
            out[key] = value
    return out


def _describe(spec: dict) -> str:
    if spec["type"] == "choice":
        return f"choice {spec['values']}"
    return f"{spec['type']} range [{spec['low']}, {spec['high']}]"


def grid_space(grid: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`sweep.grid` as a space: each key a list of values, every combination one trial."""
    if not grid:
        raise ConfigError("sweep.search=grid needs sweep.grid: config key -> list of values, "
                          "e.g. {data.label_fraction: [0.1, 1.0], train.seed: [0, 1, 2]}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid '{key}': needs a non-empty list of values, got {values!r}")
    return {key: {"type": "grid", "values": list(values)} for key, values in grid.items()}


def check_keys(space: dict[str, Any], cfg: Config) -> None:
    """Every key must be a config key taking the space's values, each value one the config's own
    validation accepts (a range at both ends), so a bad range fails here, not in every trial after
    Ray started: one error naming all culprits."""
    problems = []
    for key, spec in space.items():
        if not isinstance(spec, dict):
            values = [spec]
        elif spec["type"] in ("choice", "grid"):
            values = spec["values"]
        else:  # Ray's randint leaves out `high`
            values = [spec["low"], spec["high"] - 1 if spec["type"] == "randint" else spec["high"]]
        for value in values:
            scratch = copy.deepcopy(cfg)
            try:
                set_value(scratch, key, value)
                validate(scratch)
            except ConfigError as err:
                problems.append(f"{key} = {value!r}: {err}")
                break
    if problems:
        raise ConfigError("the search space does not fit the config:\n  " + "\n  ".join(problems))


def distribution(spec: dict[str, Any]) -> str:
    """A space entry as one readable string: `loguniform(0.05, 1.0)`, `uniform(0.08, 0.6)`,
    `randint(5, 40)` (both ends included, as in a space file), `choice(['simclr', 'byol'])`,
    `grid([0.1, 1.0])`."""
    if spec["type"] in ("choice", "grid"):
        return f"{spec['type']}({list(spec['values'])!r})"
    return f"{spec['type']}({spec['low']!r}, {spec['high']!r})"


def parent_params(flat: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """What a sweep's parent run logs as params: the config's values, except that a swept key
    shows the distribution its trials draw from and a key the sweep fixes shows that value (the
    config's own value of either was never trained with)."""
    return {**flat, **{key: distribution(spec) if isinstance(spec, dict) else spec for key, spec in space.items()}}


def sampled_keys(space: dict[str, Any]) -> list[str]:
    """Keys that vary across trials (fixed ones are the same in every trial)."""
    return [k for k, v in space.items() if isinstance(v, dict)]


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune domains (fixed values pass through as constants)."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
        elif spec["type"] == "choice":
            out[key] = tune.choice(spec["values"])
        elif spec["type"] == "grid":
            out[key] = tune.grid_search(spec["values"])
        elif spec["type"] == "uniform":
            out[key] = tune.uniform(spec["low"], spec["high"])
        elif spec["type"] == "loguniform":
            out[key] = tune.loguniform(spec["low"], spec["high"])
        else:
            out[key] = tune.randint(int(spec["low"]), int(spec["high"]) + 1)
    return out
