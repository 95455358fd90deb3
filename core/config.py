"""Typed run configuration: defaults < stage defaults < YAML file < `--set key=value`.

One resolved config per run; it is written out as `config.yaml` and logged as flat params,
so any run can be repeated from what MLflow holds. The sections themselves are in
core/config_schema.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from skinclr import names
from skinclr.config_schema import (ASPECTS, METHOD_SECTIONS, STAGE_DEFAULTS, AugmentConfig, Config, DataConfig,
                                   FinetuneConfig, MethodConfig, ModelConfig, MonitorConfig, PretrainConfig,
                                   TrackingConfig, TrainConfig)

__all__ = ["ConfigError", "RENAMED", "ADDED", "hash_items", "load_config", "load_yaml", "set_value", "parse_override",
           "validate", "require",
           "Config",
           "DataConfig", "AugmentConfig", "ModelConfig", "PretrainConfig", "MethodConfig", "MonitorConfig",
           "FinetuneConfig", "TrainConfig", "TrackingConfig", "METHOD_SECTIONS", "STAGE_DEFAULTS"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


# Keys renamed since runs were first logged, old name -> new. An old key still loads (every run
# logged before holds it in its config.yaml), with one line naming the new key: once a process,
# since a command may load its config more than once.
RENAMED = {
    "finetune.monitor": "finetune.select_metric",  # `monitor.*` is the pretraining kNN monitor
    "finetune.monitor_smoothing": "finetune.select_smoothing",
}
_told: set[str] = set()


def _renamed(key: str) -> str:
    if key in RENAMED and key not in _told:
        _told.add(key)
        print(f"warning: config key '{key}' is now '{RENAMED[key]}'; rename it in your config", file=sys.stderr)
    return RENAMED.get(key, key)


# Keys added since runs were first logged, with the value that means "as before": a config that
# leaves one there hashes as it did before the key existed.
ADDED = {"data.test_fraction": 0.0, "data.test_seed": 0, "finetune.tta": "none", "finetune.decision_rule": "none",
         "tracking.system_metrics": True, "train.precision": "auto"}


def hash_items(cfg: Config) -> dict[str, Any]:
    """`cfg.flat()` as a config's run key hashes it: renamed keys under their old names and added
    keys left at their old meaning omitted, so a config that sets the same things keeps its key,
    and the runs and sweep folder it names, across a rename or an addition."""
    former = {new: old for old, new in RENAMED.items()}
    return {former.get(key, key): value for key, value in cfg.flat().items()
            if not (key in ADDED and value == ADDED[key])}


def _coerce(key: str, current: Any, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or say why it can't be."""
    if isinstance(value, str) and not isinstance(current, str):
        value = yaml.safe_load(value) if value != "" else value
    kind = type(current)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is str:
            return "" if value is None else str(value)
        if kind is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{key}': {value!r} is not a valid {kind.__name__} "
            f"(current value {current!r})"
        ) from None
    return value


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set `section.key` (or a top-level key) with type checking and a did-you-mean hint."""
    key = _renamed(key)
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        names = list(target.sections()) if isinstance(target, Config) else [f.name for f in dataclasses.fields(target)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            hint = difflib.get_close_matches(part, names, n=1)
            fix = f"did you mean '{'.'.join(parts[:i] + hint)}'?" if hint else f"known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{key}': no '{part}' in {where}; {fix}")
        current = getattr(target, part)
        if isinstance(current, dict) and i < len(parts) - 1:
            # `sweep.grid.train.seed=[0,1]`: the rest of the key names one entry of the dict
            entry = ".".join(parts[i + 1:])
            current[entry] = yaml.safe_load(value) if isinstance(value, str) else value
            return
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; give its keys, e.g. {key}.<name>=...")
                for sub, subval in value.items():
                    set_value(cfg, f"{key}.{sub}", subval)
            else:
                setattr(target, part, _coerce(key, current, value))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"unknown config key '{key}': '{'.'.join(parts[:i + 1])}' is not a section")


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.epochs=5)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


class _UniqueKeys(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice: plain YAML keeps the last and loses the rest
    without a word (a second `train:` section replaced the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key '{key}' is given twice, on lines {seen[key]} and {line}; keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: Path, what: str) -> Any:
    """A YAML file, read once: one line naming the file for invalid YAML or a repeated key."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeys) or {}
    except ConfigError as err:
        raise ConfigError(f"{what} '{path}': {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                stage: str | None = None, schema: type[Config] = Config) -> Config:
    """Resolve a config: dataclass defaults, the stage's defaults, the YAML file, the overrides.

    `schema` is `Config` or a subclass that types a section of a layer above (the sweep layer's
    `SweepRunConfig`); that layer checks its own section's values after these."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
        raw = load_yaml(path, "config file")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(raw).__name__}")
    if stage and raw.get("stage", stage) != stage:
        raise ConfigError(f"config file '{path}' is a {raw['stage']} config (stage: {raw['stage']}), not a {stage} "
                          f"one; run it with `skinclr {raw['stage']}`, or pass a config with stage: {stage}")
    cfg = schema()
    cfg.stage = stage or str(raw.get("stage", cfg.stage))
    if cfg.stage not in STAGE_DEFAULTS and cfg.stage != "sweep":
        raise ConfigError(f"config key 'stage': '{cfg.stage}' is not one of pretrain, finetune")
    for key, value in STAGE_DEFAULTS.get(cfg.stage, {}).items():
        set_value(cfg, key, value)
    for key, value in raw.items():
        if key == "stage":
            continue
        where = f" (in {path})" if path else ""
        try:
            set_value(cfg, key, value)
        except ConfigError as err:
            raise ConfigError(f"{err}{where}") from None
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        set_value(cfg, key, value)
    expand_user(cfg)
    validate(cfg)
    return cfg


PATH_KEYS = ("data.root", "data.split_file", "data.cache_dir", "finetune.imagenet_weights", "finetune.init")


def expand_user(cfg: Config) -> None:
    """`~` in a path setting, expanded once, here: every later reader sees the same path."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(getattr(cfg, section), name, str(Path(value).expanduser()))


def validate(cfg: Config) -> None:
    """Catch values that would fail deep inside training, while the fix is still obvious.

    Needs nothing heavier than the config itself, so a wrong value answers at once."""
    for key, value in cfg.flat().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number (got {value!r})")
    init = cfg.finetune.init
    if init.startswith("runs:/") and (not init[len("runs:/"):].strip("/") or set("'\"\\") & set(init)):
        raise ConfigError(f"config key 'finetune.init' {init!r}: give runs:/RUN_ID or runs:/RUN_NAME "
                          "(a run id, or a run name without quotes or backslashes)")
    checks = [
        (cfg.data.image_size >= 16, "data.image_size", "must be at least 16 pixels"),
        (0.0 < cfg.data.val_fraction <= 0.5, "data.val_fraction", "must lie in (0, 0.5]"),
        (cfg.data.folds == 0 or cfg.data.folds >= 2, "data.folds", "must be 0 (use data.val_fraction) or at least 2"),
        (cfg.data.folds == 0 and cfg.data.fold == 0 or 0 <= cfg.data.fold < cfg.data.folds, "data.fold",
         f"must lie in 0..data.folds-1 (data.folds is {cfg.data.folds}; set data.folds=K to use folds)"),
        (cfg.data.min_per_class >= 0, "data.min_per_class", "must be 0 or more"),
        (0.0 < cfg.data.label_fraction <= 1.0, "data.label_fraction", "must lie in (0, 1]"),
        (cfg.data.label_seed >= -1, "data.label_seed", "must be -1 (follow train.seed) or a seed >= 0"),
        (cfg.data.split_seed >= 0, "data.split_seed", "must be 0 or more"),
        (0.0 <= cfg.data.test_fraction <= 0.5, "data.test_fraction",
         "must lie in [0, 0.5] (0: no test split; 0.2 holds out a fifth of the lesions)"),
        (cfg.data.test_seed >= 0, "data.test_seed", "must be 0 or more"),
        (cfg.data.workers >= 0, "data.workers", "must be 0 (load in the training process) or more"),
        (cfg.augment.color_strength >= 0, "augment.color_strength", "must be 0 or more"),
        (0.0 <= cfg.augment.blur_prob <= 1.0, "augment.blur_prob", "must lie in [0, 1]"),
        (0.0 <= cfg.augment.gray_prob <= 1.0, "augment.gray_prob", "must lie in [0, 1]"),
        (0.0 <= cfg.augment.rotation <= 180.0, "augment.rotation", "must lie in [0, 180] degrees"),
        (cfg.model.proj_hidden >= 1, "model.proj_hidden", "must be at least 1"),
        (cfg.model.proj_dim >= 1, "model.proj_dim", "must be at least 1"),
        (cfg.monitor.every >= 1, "monitor.every", "must be at least 1 (monitor every k-th epoch)"),
        (cfg.monitor.k >= 1, "monitor.k", "must be at least 1"),
        (cfg.monitor.max_bank >= 0, "monitor.max_bank", "must be 0 (the whole train split) or more"),
        (cfg.augment.device in ("auto", "cpu", "cuda"), "augment.device", "must be auto, cpu or cuda"),
        (cfg.data.aspect in ASPECTS, "data.aspect", "must be center_crop, pad or stretch"),
        (0.0 < cfg.augment.crop_min <= 1.0, "augment.crop_min", "must lie in (0, 1]"),
        (cfg.pretrain.method in cfg.method_sections, "pretrain.method",
         f"must be one of {', '.join(cfg.method_sections)}"),
        *((ok, f"{name}.{key}", what) for name, section in cfg.method_sections.items() for ok, key, what in section.checks()),
        (cfg.train.epochs >= 1, "train.epochs", "must be at least 1"),
        (cfg.train.batch_size >= 2, "train.batch_size", "must be at least 2"),
        (cfg.train.lr > 0, "train.lr", "must be positive"),
        (cfg.train.seed >= 0, "train.seed", "must be 0 or more"),
        (cfg.train.threads >= 0, "train.threads", "must be 0 (torch's default) or more"),
        (cfg.train.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be 0 (full epochs) or more"),
        (cfg.finetune.weight_decay >= 0, "finetune.weight_decay", "must be 0 or more"),
        (0.0 < cfg.finetune.lr_factor < 1.0, "finetune.lr_factor", "must lie in (0, 1)"),
        (cfg.finetune.lr_patience >= 0, "finetune.lr_patience", "must be 0 or more"),
        (cfg.finetune.early_stop_patience >= 1, "finetune.early_stop_patience", "must be at least 1"),
        (cfg.tracking.retry_seconds >= 0 or cfg.tracking.retry_seconds == -1, "tracking.retry_seconds",
         "must be -1 ($SKINCLR_TRACKING_RETRY_S, else 300) or 0 or more seconds"),
        (0.0 <= cfg.finetune.label_smoothing < 1.0, "finetune.label_smoothing", "must lie in [0, 1)"),
        (cfg.finetune.select_metric in ("val_balanced_accuracy", "val_accuracy", "val_loss"),
         "finetune.select_metric", "must be val_balanced_accuracy, val_accuracy or val_loss"),
        (cfg.finetune.tta in names.TTA_MODES, "finetune.tta", "must be none, flip (4 views) or d4 (8 views)"),
        (cfg.finetune.decision_rule in names.DECISION_RULES, "finetune.decision_rule",
         "must be none (the argmax) or balanced (offsets fitted on val for balanced accuracy)"),
        (cfg.finetune.select_smoothing >= 1, "finetune.select_smoothing", "must be at least 1"),
        (cfg.train.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda"),
        (cfg.train.precision in ("auto", "fp32", "bf16"), "train.precision", "must be auto, fp32 or bf16"),
        (not (cfg.finetune.linear_probe and cfg.finetune.init == "scratch"), "finetune.linear_probe",
         "trains the head alone on a random backbone (finetune.init=scratch), which learns next to nothing; start "
         "from a trained backbone (finetune.init=imagenet or runs:/RUN) or set finetune.linear_probe=false"),
    ]
    require(cfg, checks)


def require(cfg: Config, checks: list[tuple[bool, str, str]]) -> None:
    """Raise for the first `(ok, key, what)` that is not ok, naming the key and its value."""
    for ok, key, what in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {what} (got {_get(cfg, key)!r})")


def _get(cfg: Config, key: str) -> Any:
    target: Any = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target
