import pytest
import torch
import torch.nn as nn

from stamp_dist.choices import BACKBONES
from stamp_dist.errors import StampError
from stamp_dist.models.backbones import build_backbone, replace_head


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_runs_at_32px(name):
    model = build_backbone(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = model.forward_features(x), model(x)
    assert feats.shape == (2, model.feature_dim) and logits.shape == (2, 7)
    assert replace_head(model, 3)(x).shape == (2, 3)


def test_width_scales_the_cifar_models():
    assert build_backbone("resnet20", 10, width=8).feature_dim == 32
    assert build_backbone("convnet", 10, width=8).feature_dim == 32


# --- torchvision compatibility ------------------------------------------------------------------
# The state dict torchvision's resnet18/resnet50 produce, written out from torchvision's architecture
# (torchvision/models/resnet.py: 7×7 stem, layers [2,2,2,2] BasicBlock / [3,4,6,3] Bottleneck,
# downsample = Sequential(conv1x1, BN) on the first block of a stage when stride or width changes),
# independently of our model.


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": [c], f"{prefix}.bias": [c], f"{prefix}.running_mean": [c],
            f"{prefix}.running_var": [c], f"{prefix}.num_batches_tracked": []}


def torchvision_resnet_shapes(bottleneck: bool, layers: list[int], num_classes: int = 1000) -> dict:
    expansion = 4 if bottleneck else 1
    shapes = {"conv1.weight": [64, 3, 7, 7], **_bn("bn1", 64)}
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            if bottleneck:
                shapes |= {f"{p}.conv1.weight": [planes, inplanes, 1, 1], **_bn(f"{p}.bn1", planes),
                           f"{p}.conv2.weight": [planes, planes, 3, 3], **_bn(f"{p}.bn2", planes),
                           f"{p}.conv3.weight": [planes * 4, planes, 1, 1], **_bn(f"{p}.bn3", planes * 4)}
            else:
                shapes |= {f"{p}.conv1.weight": [planes, inplanes, 3, 3], **_bn(f"{p}.bn1", planes),
                           f"{p}.conv2.weight": [planes, planes, 3, 3], **_bn(f"{p}.bn2", planes)}
            if stride != 1 or inplanes != planes * expansion:
                shapes |= {f"{p}.downsample.0.weight": [planes * expansion, inplanes, 1, 1],
                           **_bn(f"{p}.downsample.1", planes * expansion)}
            inplanes = planes * expansion
    return shapes | {"fc.weight": [num_classes, 512 * expansion], "fc.bias": [num_classes]}


@pytest.mark.parametrize("name, bottleneck, layers, n_keys, n_params", [
    ("resnet18", False, [2, 2, 2, 2], 122, 11_689_512),  # torchvision's published counts
    ("resnet50", True, [3, 4, 6, 3], 320, 25_557_032),
])
def test_torchvision_state_dict_loads_strictly(name, bottleneck, layers, n_keys, n_params):
    shapes = torchvision_resnet_shapes(bottleneck, layers)
    params = [s for k, s in shapes.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(shapes) == n_keys and sum(torch.Size(s).numel() for s in params) == n_params  # the spec itself
    assert "layer2.0.downsample.1.running_var" in shapes
    assert ("layer1.0.downsample.0.weight" in shapes) == bottleneck  # BasicBlock's stage 1 keeps 64 channels

    g = torch.Generator().manual_seed(0)
    state = {k: torch.tensor(5) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)
             for k, s in shapes.items()}
    model = build_backbone(name, 1000)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.layer2[0].downsample[0].weight, state["layer2.0.downsample.0.weight"])
    assert torch.equal(model.fc.weight, state["fc.weight"])


def torchvision_mobilenet_v2_shapes(num_classes: int = 1000) -> dict:
    """torchvision's mobilenet_v2 state dict (torchvision/models/mobilenetv2.py: ConvBNReLU stem of 32,
    inverted residuals per the (t, c, n, s) table, each ``conv`` = [expand ConvBNReLU if t > 1,
    depthwise ConvBNReLU, 1×1 conv, BN], a 1×1 ConvBNReLU to 1280, classifier = [Dropout, Linear])."""
    shapes = {"features.0.0.weight": [32, 3, 3, 3], **_bn("features.0.1", 32)}
    cin, i = 32, 1
    for t, c, n, _ in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                       [6, 320, 1, 1]]:
        for _ in range(n):
            p, hidden, j = f"features.{i}.conv", cin * t, 0
            if t != 1:
                shapes |= {f"{p}.0.0.weight": [hidden, cin, 1, 1], **_bn(f"{p}.0.1", hidden)}
                j = 1
            shapes |= {f"{p}.{j}.0.weight": [hidden, 1, 3, 3], **_bn(f"{p}.{j}.1", hidden),
                       f"{p}.{j + 1}.weight": [c, hidden, 1, 1], **_bn(f"{p}.{j + 2}", c)}
            cin, i = c, i + 1
    shapes |= {f"features.{i}.0.weight": [1280, cin, 1, 1], **_bn(f"features.{i}.1", 1280)}
    return shapes | {"classifier.1.weight": [num_classes, 1280], "classifier.1.bias": [num_classes]}


@pytest.mark.parametrize("small_input", [False, True])
def test_torchvision_mobilenet_v2_state_dict_loads_strictly(small_input):
    from stamp_dist.models.mobilenet import MobileNetV2

    shapes = torchvision_mobilenet_v2_shapes()
    params = [s for k, s in shapes.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(shapes) == 314 and sum(torch.Size(s).numel() for s in params) == 3_504_872  # torchvision's count
    assert {"features.1.conv.0.0.weight", "features.2.conv.1.0.weight", "features.18.0.weight"} <= set(shapes)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.tensor(5) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)
             for k, s in shapes.items()}
    state |= {k: v.abs() + 0.5 for k, v in state.items() if k.endswith("running_var")}
    net = MobileNetV2(small_input=small_input)  # small_input changes strides only
    net.load_state_dict(state, strict=True)
    assert net.features[2].conv[1][0].groups == 96  # depthwise
    model = build_backbone(net, 10)  # wrapped: classifier.1 becomes the head, replaced for 10 classes
    assert model.feature_dim == 1280 and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert torch.equal(model.body.features[0][0].weight, state["features.0.0.weight"])


# --- a user's network: as_backbone, factories, weights ------------------------------------------------------

class _Plain(nn.Module):
    def __init__(self, after_head=None, classes=6):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Linear(8, classes)
        self.after_head = after_head

    def forward(self, x):
        y = self.classifier(self.conv(x).mean((2, 3)))
        return y if self.after_head is None else self.after_head(y)


def test_a_plain_module_is_wrapped_with_its_last_linear_as_head():
    net = _Plain().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    model = build_backbone(net, 6)
    assert model.fc is not net.classifier and torch.equal(model.fc.weight, net.classifier.weight)  # a copy
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), want) and model.forward_features(x).shape == (3, 8)
    assert build_backbone(net, 4)(x).shape == (3, 4)


@pytest.mark.parametrize("net, words", [
    (_Plain(after_head=nn.Softmax(1)), ["not the output of its last nn.Linear 'classifier'", "subclass"]),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), ["calls no nn.Linear"]),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(30, 5)), ["called 1 time(s) on input [(2, 4, 30, 30)]", "pooled"]),
])
def test_a_module_without_a_final_linear_head_is_refused(net, words):
    with pytest.raises(StampError) as e:
        build_backbone(net, 6)
    assert all(w in str(e.value) for w in words), e.value


@pytest.mark.parametrize("factory, words", [
    ("nosuchmod:f", ["cannot import 'nosuchmod'", "PYTHONPATH"]),
    ("os:nosuchfn", ["'os' has no function 'nosuchfn'"]),
    ("os:getcwd", ["returned a str, not a torch.nn.Module"]),
    ("os:listdir", ["returned a list"]),
    ("os:chdir", ["raised TypeError", "without arguments"]),
    ("nofactory", ["unknown backbone 'nofactory'", "package.module:function"]),
])
def test_bad_factories_are_refused(factory, words):
    with pytest.raises(StampError) as e:
        build_backbone(factory, 10)
    assert all(w in str(e.value) for w in words), e.value


def test_weights_load_strictly_with_the_files_class_count(tmp_path):
    from safetensors.torch import save_file

    source = build_backbone("resnet20", 7, width=4)
    torch.save(source.state_dict(), tmp_path / "r20.pth")
    save_file(source.state_dict(), str(tmp_path / "r20.safetensors"))
    for path in (tmp_path / "r20.pth", tmp_path / "r20.safetensors"):
        model = build_backbone("resnet20", 3, width=4, weights=path)
        assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 3
    torch.save(build_backbone("convnet", 7, width=4).state_dict(), tmp_path / "convnet.pth")
    with pytest.raises(StampError, match=r"convnet.pth is not a state dict of this CifarResNet: .* missing "
                                         r"\(bn1.bias.*unexpected \(features.0.weight"):
        build_backbone("resnet20", 3, width=4, weights=tmp_path / "convnet.pth")
    with pytest.raises(StampError, match="of another shape"):
        build_backbone("resnet20", 3, width=8, weights=tmp_path / "r20.pth")
    torch.save({"model": source}, tmp_path / "pickled_module.pth")  # not loadable with weights_only=True
    with pytest.raises(StampError, match="cannot read safely|not a state dict torch can read"):
        build_backbone("resnet20", 3, width=4, weights=tmp_path / "pickled_module.pth")
