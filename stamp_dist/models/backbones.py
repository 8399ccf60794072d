"""Backbones defined in-project (torchvision is unusable here; see DESIGN.md §5).

Every backbone exposes the same small interface used by pruning and meta-learning:

* ``forward_features(x)`` → pooled penultimate features ``[B, feature_dim]``
* ``fc``: the final ``nn.Linear`` classifier (excluded from pruning, replaced per target)
* ``feature_dim``

ResNet-18/50 use torchvision's module names (``conv1``, ``layer1.0.downsample.0``, ``fc`` …) so a
torchvision state dict loads with ``strict=True``.
"""

from __future__ import annotations

import abc
from typing import Callable

import torch
import torch.nn as nn


class Backbone(nn.Module, abc.ABC):
    feature_dim: int
    fc: nn.Linear

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``[B, feature_dim]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- torchvision-compatible ImageNet ResNets -------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    """torchvision's ResNet layout. ``small_input=True`` swaps the 7×7/2 stem + max-pool for a 3×3/1
    stem (for 32×32 images); that changes ``conv1``'s shape, so torchvision weights then need
    ``strict=False`` for the stem."""

    def __init__(self, block, layers: list[int], num_classes: int = 1000, small_input: bool = False):
        super().__init__()
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512 * block.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# --- CIFAR ResNets (He et al. 2016, §4.2), projection shortcuts so every block is traceable ---


class CifarResNet(Backbone):
    def __init__(self, depth: int, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


# --- VGG-19-BN (CIFAR variant: global pool + one linear classifier) ---------------------------

_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


class VGG(Backbone):
    def __init__(self, cfg: list, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


# --- a small ConvNet for tests ---------------------------------------------------------------


class ConvNet(Backbone):
    """Four conv-BN-ReLU blocks (the few-shot "Conv-4" shape), width ``width``."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = chans[-1]
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


_BUILDERS: dict[str, Callable[..., Backbone]] = {
    "convnet": lambda num_classes, width=16: ConvNet(num_classes, width),
    "resnet20": lambda num_classes, width=16: CifarResNet(20, num_classes, width),
    "resnet56": lambda num_classes, width=16: CifarResNet(56, num_classes, width),
    "resnet18": lambda num_classes, width=None: ResNet(BasicBlock, [2, 2, 2, 2], num_classes),
    "resnet50": lambda num_classes, width=None: ResNet(Bottleneck, [3, 4, 6, 3], num_classes),
    "vgg19_bn": lambda num_classes, width=None: VGG(_VGG19, num_classes),
}


def build_backbone(name: str, num_classes: int, width: int = 16) -> Backbone:
    """Build a backbone by name (``stamp_dist.config.BACKBONES``). ``width`` applies to the CIFAR
    ResNets and the ConvNet; the ImageNet ResNets and VGG have fixed widths."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(_BUILDERS)}")
    return _BUILDERS[name](num_classes, width)


def replace_head(model: Backbone, num_classes: int) -> Backbone:
    """Give ``model`` a fresh classifier for ``num_classes`` (same device/dtype)."""
    old = model.fc
    model.fc = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
    return model
