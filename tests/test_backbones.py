import pytest
import torch

from stamp_dist.config import BACKBONES
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
