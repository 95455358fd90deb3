"""Networks by name: ResNet backbones, the SimCLR projector, the classifier head, and loading
backbone weights from any of the places they come from (nothing downloads).

The ResNets are torchvision's architecture (v1.5: stride on the 3x3 convolution of a bottleneck),
built here with its parameter names, module order and initialisation, so torchvision's ImageNet
files load as they are and a seed draws the same weights (tests/train/test_models.py compares the
two). Importing torchvision for two classes costs a command that only predicts (evaluate, predict,
serving) about a second: its package import pulls in torch._dynamo and SymPy.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class ModelError(Exception):
    """A backbone name, weight file or state_dict that cannot be used; the message says why and what to do."""


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv(planes, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            stride, cout = (1 if i == 0 else 2), planes * block.expansion
            down = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None
            blocks = [block(cin, planes, stride, down)] + [block(cout, planes) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    feature_dim: int
    imagenet_url: str  # torchvision's ImageNet weights (IMAGENET1K_V1): where they are published


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(lambda: ResNet(BasicBlock, (2, 2, 2, 2)), 512,
                             "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    "resnet50": BackboneSpec(lambda: ResNet(Bottleneck, (3, 4, 6, 3)), 2048,
                             "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
}


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """A randomly initialised ResNet without its classifier: images -> pooled features."""
    spec = _spec(name)
    net = spec.build()
    net.fc = nn.Identity()
    return net, spec.feature_dim


def imagenet_weights_file(name: str, path: str | Path | None = None) -> Path:
    """Where torchvision's ImageNet weights for `name` are: `path`, or else torch hub's cache.
    Nothing downloads here, so a missing file is an error that says where to put it."""
    url = _spec(name).imagenet_url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    file = Path(path) if path else cached
    if not file.is_file():
        raise ModelError(
            f"ImageNet weights for {name} not found at {file}; nothing is downloaded here. On a machine with "
            f"internet, fetch {url} and copy it to {cached} (or pass its path, e.g. "
            f"--set finetune.imagenet_weights=PATH)")
    return file


def imagenet_state_dict(name: str, path: str | Path | None = None) -> dict:
    return _load_file(imagenet_weights_file(name, path))


def _load_file(file: Path) -> dict:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a pickle of arbitrary objects, not a torch file at all
        raise ModelError(f"cannot read weights from {file}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise ModelError(f"{file} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    return dict(obj)


class Projector(nn.Sequential):
    """A two-layer MLP head: SimCLR's and MoCo v2's projection g(h), on whose output the loss acts
    (features are taken before it). BYOL's projector and predictor put BatchNorm after the
    hidden layer (`batch_norm`); without it BYOL's target-prediction task can collapse."""

    def __init__(self, in_dim: int, hidden: int = 256, out: int = 128, batch_norm: bool = False):
        norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
        super().__init__(nn.Linear(in_dim, hidden), *norm, nn.ReLU(inplace=True), nn.Linear(hidden, out))


class SimCLRNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 256, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.projector = Projector(feature_dim, proj_hidden, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int = 7):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.backbone_frozen = False

    def freeze_backbone(self) -> None:
        """Linear probe: no gradients into the backbone, and its BatchNorm statistics stay as loaded."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # train mode would update BN running stats even without gradients
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_simclr(backbone: str, proj_hidden: int = 256, proj_dim: int = 128) -> SimCLRNet:
    net, dim = build_backbone(backbone)
    return SimCLRNet(net, dim, proj_hidden, proj_dim)


def build_classifier(backbone: str, num_classes: int = 7) -> Classifier:
    net, dim = build_backbone(backbone)
    return Classifier(net, dim, num_classes)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _backbone_keys(state: Mapping) -> dict:
    """Reduce any accepted layout to the backbone's own keys."""
    if isinstance(state.get("backbone"), Mapping):  # a pretrain checkpoint: {"backbone": ..., "epoch": ...}
        state = state["backbone"]
    state = {_strip_wrappers(k): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # a whole SimCLRNet or Classifier: drop projector/head
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}  # torchvision's ImageNet classifier


def _preview(keys: set[str], n: int = 8) -> str:
    shown = sorted(keys)[:n]
    return ", ".join(shown) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_backbone(backbone_module: nn.Module, source: Mapping | str | Path) -> None:
    """Load backbone weights in place from a checkpoint file or a state_dict (see `_backbone_keys`).

    Strict: every backbone tensor must be there and nothing else may be left over, so that a
    wrong file or a different architecture fails here instead of silently training from scratch.
    BatchNorm's `num_batches_tracked` may be absent (older torchvision files); torch fills it in."""
    where = str(source) if isinstance(source, (str, Path)) else "the given state_dict"
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise ModelError(f"backbone weights file {source} does not exist")
        source = _load_file(Path(source))
    state = _backbone_keys(source)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{where} is not a state_dict: some values are not tensors")
    expected = set(backbone_module.state_dict())
    missing = {k for k in expected - set(state) if not k.endswith("num_batches_tracked")}
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ModelError(
            f"weights from {where} do not fit this {type(backbone_module).__name__} backbone"
            + (f"; missing keys: {_preview(missing)}" if missing else "")
            + (f"; unexpected keys: {_preview(unexpected)}" if unexpected else "")
            + " (is it the same backbone architecture, e.g. resnet18 vs resnet50?)")
    try:
        backbone_module.load_state_dict(state)
    except RuntimeError as e:  # same names, different shapes
        raise ModelError(f"weights from {where} do not fit this backbone: {e}") from e
