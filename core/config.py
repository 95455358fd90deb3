"""Typed run configuration: defaults < stage defaults < YAML file < `--set key=value`.

One resolved config per run; it is written out as `config.yaml` and logged as flat params,
so any run can be repeated from what MLflow holds.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


@dataclass
class DataConfig:
    root: str = ""  # dataset folder in the official ISIC 2018 layout
    image_size: int = 64  # side of the square network input (and of the cached arrays)
    aspect: str = "center_crop"  # how a 4:3 image becomes square: center_crop | pad | stretch
    val_fraction: float = 0.15
    split_seed: int = 0
    split_file: str = ""  # reuse a saved split CSV so that several runs share one split
    folds: int = 0  # >=2: k-fold lesion-grouped cross-validation, fold `fold` is val (0: val_fraction)
    fold: int = 0  # which of the k folds is val, 0..folds-1
    min_per_class: int = 1  # images each class must have on each side of the split
    label_fraction: float = 1.0  # fine-tuning: labelled share of the train side (lesion-grouped, stratified)
    label_seed: int = -1  # which subset of that share; -1: train.seed, so each seed draws its own
    cache_dir: str = ""  # decoded-image cache; empty: $SKINCLR_CACHE or ~/.cache/skinclr
    workers: int = 2  # DataLoader workers (0: load in the training process)


@dataclass
class AugmentConfig:
    crop_min: float = 0.08  # lower bound of RandomResizedCrop's area scale
    color_strength: float = 0.5  # colour jitter strength (SimCLR's s)
    blur_prob: float = 0.5
    gray_prob: float = 0.2
    rotation: float = 30.0  # fine-tune only: +- degrees
    device: str = "auto"  # where augmentation runs: cpu | cuda | auto (the training device)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    proj_hidden: int = 256
    proj_dim: int = 128


@dataclass
class PretrainConfig:
    method: str = "simclr"  # simclr | moco_v2 | byol: the config section of that name holds its settings


@dataclass
class MethodConfig:
    """A pretraining method's settings: the section's name is the method's name in `pretrain.method`."""


@dataclass
class SimCLRConfig(MethodConfig):
    temperature: float = 0.5


@dataclass
class MoCoV2Config(MethodConfig):
    temperature: float = 0.2  # MoCo v2's
    queue_size: int = 4096  # negatives kept from earlier batches (MoCo: 65,536 for ImageNet's 1.28M images)
    momentum: float = 0.99  # key encoder EMA per step (MoCo: 0.999 over ~500k steps; short runs need it faster)


@dataclass
class BYOLConfig(MethodConfig):
    momentum: float = 0.99  # the target's EMA rate at step 0, raised to 1 along a cosine over the run (BYOL: 0.996)


@dataclass
class MonitorConfig:
    every: int = 1  # kNN monitor every k epochs (and always on the last)
    k: int = 20
    balanced: bool = True  # class-balanced vote: a plain vote on HAM10000 mostly says NV
    max_bank: int = 0  # cap on bank images (0: the whole train split)


@dataclass
class FinetuneConfig:
    init: str = "scratch"  # scratch | imagenet | runs:/RUN_ID | checkpoint path
    imagenet_weights: str = ""  # file with torchvision ResNet weights (nothing downloads)
    linear_probe: bool = False  # freeze the backbone, train the head only
    label_smoothing: float = 0.1
    weight_decay: float = 1e-5
    class_weighted_loss: bool = False
    balanced_sampler: bool = False
    monitor: str = "val_balanced_accuracy"  # what the scheduler, stopper and best-model pick watch
    monitor_smoothing: int = 1  # mean over the last n epochs: tames epoch-to-epoch jumps
    lr_factor: float = 0.5
    lr_patience: int = 2
    early_stop_patience: int = 3


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    max_steps_per_epoch: int = 0  # 0: full epochs; >0 caps steps (smoke runs)
    compile: bool = False  # torch.compile the training forward (tests/benchmarks/bench_gpu.py measures what it buys)


@dataclass
class TrackingConfig:
    experiment: str = ""  # empty: skinclr-<stage>
    run_name: str = ""
    resume: bool = True  # an unfinished run with the same config resumes instead of restarting
    retry_seconds: float = -1.0  # how long a run waits for a store that went away; -1: $SKINCLR_TRACKING_RETRY_S or 300


@dataclass
class SweepConfig:
    stage: str = "pretrain"  # pretrain | finetune | pipeline
    space: str = ""  # search-space YAML; empty: search_spaces/<stage>.yaml
    narrow: dict = field(default_factory=dict)  # key -> fixed value or {low, high} / [choices]
    num_samples: int = 8  # trials (a grid study runs each combination of sweep.grid once instead)
    max_concurrent: int = 2
    search: str = "optuna"  # optuna | random | grid (every combination of sweep.grid, no ASHA)
    grid: dict = field(default_factory=dict)  # grid search: config key -> list of values
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int = 0  # 0: train.epochs
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1  # >1: data-parallel trials (Ray Train TorchTrainer)
    max_failures: int = 1
    storage: str = ""  # Ray results folder; empty: ~/ray_results
    name: str = ""
    finetune_config: str = ""  # pipeline: the fine-tune stage's config (with a sweep section: swept)
    eval_data: str = ""  # pipeline: a labelled folder the best fine-tuned model is evaluated on


@dataclass
class Config:
    stage: str = "pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    moco_v2: MoCoV2Config = field(default_factory=MoCoV2Config)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params and `--set` use."""
        return dict(_flatten(self.to_dict()))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"skinclr-{self.stage}"


# Pretraining methods, named by their config sections (adding a method adds its section).
PRETRAIN_METHODS = tuple(f.name for f in dataclasses.fields(Config)
                         if isinstance(f.default_factory, type) and issubclass(f.default_factory, MethodConfig))


# The paper's per-stage settings: a fine-tune config file need not repeat them.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {},
    "finetune": {
        "augment.crop_min": 0.6,
        "augment.color_strength": 0.2,
        "train.epochs": 20,
        "train.batch_size": 32,
        "train.lr": 1e-4,
    },
}


DICT_KEYS = ("narrow", "grid")  # dict-valued keys: their entries are config keys, not sections


def _flatten(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict) and key not in DICT_KEYS:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


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
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
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


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                stage: str | None = None) -> Config:
    """Resolve a config: dataclass defaults, the stage's defaults, the YAML file, the overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(raw).__name__}")
    cfg = Config()
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
    validate(cfg)
    return cfg


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
        (cfg.data.aspect in ("center_crop", "pad", "stretch"), "data.aspect", "must be center_crop, pad or stretch"),
        (0.0 < cfg.augment.crop_min <= 1.0, "augment.crop_min", "must lie in (0, 1]"),
        (cfg.simclr.temperature > 0, "simclr.temperature", "must be positive"),
        (cfg.pretrain.method in PRETRAIN_METHODS, "pretrain.method", f"must be one of {', '.join(PRETRAIN_METHODS)}"),
        (cfg.moco_v2.temperature > 0, "moco_v2.temperature", "must be positive"),
        (cfg.moco_v2.queue_size >= 1, "moco_v2.queue_size", "must be at least 1"),
        (0.0 <= cfg.moco_v2.momentum < 1.0, "moco_v2.momentum", "must lie in [0, 1)"),
        (0.0 <= cfg.byol.momentum < 1.0, "byol.momentum", "must lie in [0, 1)"),
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
        (cfg.finetune.monitor in ("val_balanced_accuracy", "val_accuracy", "val_loss"),
         "finetune.monitor", "must be val_balanced_accuracy, val_accuracy or val_loss"),
        (cfg.finetune.monitor_smoothing >= 1, "finetune.monitor_smoothing", "must be at least 1"),
        (cfg.train.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda"),
        (cfg.sweep.search in ("optuna", "random", "grid"), "sweep.search", "must be optuna, random or grid"),
    ]
    for ok, key, what in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {what} (got {_get(cfg, key)!r})")


def _get(cfg: Config, key: str) -> Any:
    target: Any = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target
