"""Backbones: defined in-project (torchvision is unusable here; see DESIGN.md §5) or brought by the user.

Every backbone exposes the same small interface used by pruning and meta-learning:

* ``forward_features(x)`` → pooled penultimate features ``[B, feature_dim]``
* ``fc``: the final ``nn.Linear`` classifier (excluded from pruning, replaced per target)
* ``feature_dim``

ResNet-18/50 and MobileNetV2 use torchvision's module names (``conv1``, ``layer1.0.downsample.0``,
``fc``; ``features.1.conv.0.0``, ``classifier.1`` …) so a torchvision state dict loads with ``strict=True``.

Any other network (``model.backbone`` = ``package.module:function``, or an ``nn.Module`` in Python)
gets that interface from :func:`as_backbone`: its last ``nn.Linear`` in forward order is the head, and
the network's output must be that layer's output on a ``[B, F]`` feature tensor (checked by running it).
"""

from __future__ import annotations

import abc
import copy
import importlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..choices import is_factory
from ..errors import StampError
from .mobilenet import MobileNetV2


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


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "convnet": lambda num_classes, width=16: ConvNet(num_classes, width),
    "resnet20": lambda num_classes, width=16: CifarResNet(20, num_classes, width),
    "resnet56": lambda num_classes, width=16: CifarResNet(56, num_classes, width),
    "resnet18": lambda num_classes, width=None: ResNet(BasicBlock, [2, 2, 2, 2], num_classes),
    "resnet50": lambda num_classes, width=None: ResNet(Bottleneck, [3, 4, 6, 3], num_classes),
    "vgg19_bn": lambda num_classes, width=None: VGG(_VGG19, num_classes),
    "mobilenet_v2": lambda num_classes, width=None: MobileNetV2(num_classes),
    # width = the stem's channels (torchvision's 32 = width_mult 1.0, whose weights then load strictly)
    "mobilenet_v2_cifar": lambda num_classes, width=16: MobileNetV2(num_classes, width / 32, small_input=True),
}


def build_backbone(backbone: str | nn.Module, num_classes: int, width: int = 16, image_size: int = 32,
                   weights: str | Path | None = None) -> Backbone:
    """A backbone with a ``num_classes`` head: by name (``stamp_dist.choices.BACKBONES``; ``width`` applies
    to the CIFAR ResNets, the ConvNet and MobileNetV2-CIFAR), by a factory ``package.module:function``
    (called without arguments) or from an ``nn.Module`` (copied). ``weights``: a state dict for the
    network as built, loaded strictly before the head is replaced (:func:`load_weights`).
    ``image_size``: what :func:`as_backbone` checks a network without the Backbone interface on."""
    if isinstance(backbone, nn.Module):
        net = copy.deepcopy(backbone)
    elif backbone in _BUILDERS:
        net = _BUILDERS[backbone](num_classes, width)
    elif isinstance(backbone, str) and is_factory(backbone):
        net = _call_factory(backbone)
    else:
        raise StampError(f"unknown backbone {backbone!r}; choose one of {', '.join(_BUILDERS)}, or give a "
                         "factory as package.module:function")
    if weights is not None:
        load_weights(net, weights, image_size)
    model = as_backbone(net, image_size)
    if model.fc.out_features != num_classes:
        replace_head(model, num_classes)
    return model


def _call_factory(spec: str) -> nn.Module:
    """``package.module:function`` imported and called; every failure is a StampError naming the fix."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it is imported
        raise StampError(f"backbone factory {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
                         "put the folder holding it on PYTHONPATH or install its package") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise StampError(f"backbone factory {spec!r}: module {module_name!r} has no function {attr!r}")
    try:
        net = factory()
    except Exception as e:
        raise StampError(f"backbone factory {spec!r} raised {type(e).__name__}: {e}; it must build the "
                         "network without arguments") from None
    if not isinstance(net, nn.Module):
        raise StampError(f"backbone factory {spec!r} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


class WrappedNetwork(Backbone):
    """A network without the Backbone interface: ``fc`` is its head, ``body`` the rest (the head
    replaced by ``nn.Identity``), whose output is the features."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body, self.fc = body, head
        self.feature_dim = head.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def as_backbone(net: nn.Module, image_size: int = 32) -> Backbone:
    """``net`` itself if it is a Backbone, else ``net`` wrapped (and its head swapped out) as a
    :class:`WrappedNetwork`. Raises StampError unless its output is its last ``nn.Linear``'s output on
    pooled features, checked on a random ``[2, 3, image_size, image_size]`` batch in eval mode."""
    if isinstance(net, Backbone):
        return net
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    name, inputs, want = _head_calls(net, x)
    head = net.get_submodule(name)
    what = f"{type(net).__name__}'s last nn.Linear {name!r}"
    if len(inputs) != 1 or len(inputs[0]) != 2:
        raise StampError(f"{what} is called {len(inputs)} time(s) on input {inputs}: the head must be called once, "
                         "on pooled features [batch, features]; end the network with one nn.Linear classifier")
    net.set_submodule(name, nn.Identity())
    model = WrappedNetwork(net, head)
    got = _eval_forward(model, x)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        net.set_submodule(name, head)
        raise StampError(f"{type(net).__name__}'s output is not the output of its last nn.Linear {name!r} (an op "
                         "after it?); end the network with the nn.Linear classifier, or subclass "
                         "stamp_dist.models.backbones.Backbone")
    return model


def _head_calls(net: nn.Module, x: torch.Tensor) -> tuple[str, list[tuple[int, ...]], torch.Tensor]:
    """The last ``nn.Linear`` called in ``net``'s forward, the input shapes of its calls, and the output."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.append((n, tuple(i[0].shape))))
             for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    try:
        out = _eval_forward(net, x)
    finally:
        for h in hooks:
            h.remove()
    if not calls:
        raise StampError(f"{type(net).__name__} calls no nn.Linear: STAMP needs a classifier head; end the "
                         "network with an nn.Linear on pooled features")
    name = calls[-1][0]
    return name, [shape for n, shape in calls if n == name], out


@torch.no_grad()
def _eval_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = net.training
    try:
        out = net.eval()(x)
    except Exception as e:
        raise StampError(f"{type(net).__name__} fails on a {list(x.shape)} batch ({type(e).__name__}: {e}); "
                         "check model.backbone and the image size") from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise StampError(f"{type(net).__name__} returns a {type(out).__name__}; it must return the logits tensor")
    return out


def load_weights(net: nn.Module, path: str | Path, image_size: int = 32) -> None:
    """Load a state dict (``torch.save`` of ``state_dict()``, read with ``weights_only=True``, or
    ``.safetensors``) into ``net`` with ``strict=True``: every name and shape must match, except the
    head's number of classes, which follows the file (the head is replaced for the task anyway)."""
    path = Path(path)
    if not path.is_file():
        raise StampError(f"model.weights: {path} not found")
    try:
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                 weights_only=True)
    except Exception as e:
        raise StampError(f"model.weights: {path} is not a state dict torch can read safely ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); save one with "
                         "torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StampError(f"model.weights: {path} is not a flat state dict (parameter name → tensor); save "
                         "model.state_dict(), not a training checkpoint")
    name = "fc" if isinstance(net, Backbone) else _head_calls(net, torch.zeros(1, 3, image_size, image_size))[0]
    head, file_head = net.get_submodule(name), state.get(f"{name}.weight")
    if file_head is not None and file_head.dim() == 2 and file_head.shape[0] != head.out_features:
        net.set_submodule(name, nn.Linear(head.in_features, file_head.shape[0], head.bias is not None))
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {list(state[k].shape)} (needs {list(own[k].shape)})" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{len(v)} {what} ({', '.join(v[:3])}{', …' if len(v) > 3 else ''})" for what, v in
                    (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if v]
        raise StampError(f"model.weights: {path} is not a state dict of this {type(net).__name__}: "
                         f"{'; '.join(problems)}; give the weights of this architecture (torchvision's names), "
                         "or the model.backbone they were saved from")
    net.load_state_dict(state, strict=True)


def replace_head(model: Backbone, num_classes: int) -> Backbone:
    """Give ``model`` a fresh classifier for ``num_classes`` (same device/dtype)."""
    old = model.fc
    model.fc = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
    return model
