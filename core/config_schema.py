"""The run config's schema: one dataclass per section, with its defaults.

`skinclr.config` loads, overrides and checks it. A layer above core may add a section of its own:
the sweep layer's `sweep:` lives in experiments/tune/plan.py and subclasses `Config` to type
it; core itself only carries that section as data, so one YAML file holds a run and its sweep
and every run's resolved config keeps both.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ASPECTS = ("center_crop", "pad", "stretch")  # how an image becomes square (core/data/images.py)


@dataclass
class DataConfig:
    root: str = ""  # dataset folder in the official ISIC 2018 layout
    image_size: int = 64  # side of the square network input (and of the cached arrays)
    aspect: str = "center_crop"  # how a 4:3 image becomes square: center_crop | pad | stretch
    val_fraction: float = 0.15
    test_fraction: float = 0.0  # held-out test share, drawn first (lesion-grouped, stratified); no choice reads it
    test_seed: int = 0  # which test share: fixed while split seeds, folds and label subsets vary inside the rest
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
    method: str = "simclr"  # a registered method (skinclr.train.methods.METHODS): its section holds its settings


@dataclass
class MethodConfig:
    """A pretraining method's settings: its config section, named like the method in
    `pretrain.method`. A method module declares one (skinclr/train/methods/)."""

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, key within the section, what a good value is): what validation refuses early."""
        return []


# The pretraining methods' sections by name, in registry order: filled by the method registry
# (skinclr/train/methods/__init__.py, loaded with the package), read by every Config made after.
METHOD_SECTIONS: dict[str, type[MethodConfig]] = {}


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
    select_metric: str = "val_balanced_accuracy"  # picks the best epoch; the lr plateau and early stopping watch it too
    tta: str = "none"  # validation and the saved model's predictions: none | flip (4 views) | d4 (8 views)
    decision_rule: str = "none"  # balanced: per-class logit offsets fitted on val after the last epoch, kept where they help unseen val images (metrics.fit_rule)
    select_smoothing: int = 1  # select on the mean over the last n epochs: tames epoch-to-epoch jumps
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
    precision: str = "auto"  # the training step: auto (the faster: engine.step_precision) | fp32 | bf16
    compile: bool = False  # torch.compile the training forward and the GPU data path's pixel steps (bench_gpu.py measures it)


@dataclass
class TrackingConfig:
    experiment: str = ""  # empty: skinclr-<stage>
    run_name: str = ""
    resume: bool = True  # an unfinished run with the same config resumes instead of restarting
    retry_seconds: float = -1.0  # how long a run waits for a store that went away; -1: $SKINCLR_TRACKING_RETRY_S or 300
    system_metrics: bool = True  # MLflow's system metrics (CPU, memory, disk, network, GPU) every 10 s, per run


@dataclass
class Config:
    stage: str = "pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # each registered method's section (`simclr:`, `moco_v2:`, ...), read as `cfg.simclr`; written after `pretrain:`
    method_sections: dict[str, MethodConfig] = field(
        default_factory=lambda: {name: section() for name, section in METHOD_SECTIONS.items()}, repr=False)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # The sweep layer's section, carried as data: core loads, saves and logs it, never reads it.
    sweep: Any = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the method sections
        sections = self.__dict__.get("method_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!s} has no section or attribute {name!r}")

    def sections(self) -> dict[str, Any]:
        """Every section (and top-level key) by name, in file order, method sections after `pretrain`."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "method_sections":
                out.update(self.method_sections)
            else:
                out[f.name] = getattr(self, f.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
                for name, v in self.sections().items()}

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params and `--set` use (a dict-valued key such
        as `sweep.grid` stays one value)."""
        out = {}
        for name, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{name}.{key}": v for key, v in value.items()})
            else:
                out[name] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or f"skinclr-{self.stage}"


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
