"""Channel-group discovery on every backbone."""

import pytest
import torch
import torch.nn as nn

from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning import discover_groups

X = torch.zeros(1, 3, 32, 32)
EXPECTED = {"convnet": 4, "resnet20": 12, "resnet18": 12, "resnet50": 37, "vgg19_bn": 16}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_groups_cover_every_channel_once(name):
    model = build_backbone(name, 10)
    groups = discover_groups(model, X)
    assert len(groups) == EXPECTED[name]
    assert [g.index for g in groups] == list(range(len(groups)))

    owner = {}
    for g in groups:
        for n in g.out_members:
            assert n not in owner, f"{n} in two groups"
            owner[n] = g
            m = model.get_submodule(n)
            assert (m.out_channels if isinstance(m, nn.Conv2d) else m.num_features) == g.channels
        for n in g.in_members:
            m = model.get_submodule(n)
            assert (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features) == g.channels
        assert g.mask_points and set(g.mask_points) <= set(g.out_members)
        assert g.name == g.out_members[0]
    # every conv and BN is an out-member; the head never is, but it consumes the last group
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            assert n in owner
    assert "fc" not in owner
    assert sum("fc" in g.in_members for g in groups) == 1


def test_residual_coupling_and_order():
    model = build_backbone("resnet20", 10)
    groups = discover_groups(model, X)
    stem = groups[0]
    assert stem.name == "conv1"
    # the stem and every stage-1 block output are added together, so they share one group
    assert {"conv1", "bn1", "layer1.0.bn2", "layer1.2.bn2"} <= set(stem.out_members)
    assert "layer2.0.conv1" in stem.in_members and "layer2.0.downsample.0" in stem.in_members
    # masks go after the BNs, never on a conv that feeds a BN
    assert stem.mask_points == ["bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]
    assert groups[1].out_members == ["layer1.0.conv1", "layer1.0.bn1"]


def test_deterministic_and_mode_preserved():
    model = build_backbone("resnet18", 10).train()
    a, b = discover_groups(model, X), discover_groups(model, X)
    assert a == b
    assert model.training
    assert all(m.training for m in model.modules())
    assert a.input_shape == (1, 3, 32, 32)


def test_calls_record_groups_of_every_layer():
    model = build_backbone("convnet", 10, width=8)
    groups = discover_groups(model, X)
    calls = {c.name: (c.inputs, c.outputs) for c in groups.calls}
    assert calls["features.0"] == (((None, 3),), ((0, 8),))  # the image is fixed, the conv's output is group 0
    assert calls["features.4"] == (((0, 8),), ((1, 16),))
    assert calls["fc"] == (((3, 32),), ((None, 10),))  # the head's out-features are fixed


def test_frozen_model_has_the_same_groups():
    model = build_backbone("resnet20", 10)
    x = torch.zeros(1, 3, 32, 32)
    expected = discover_groups(model, x).sizes
    model.requires_grad_(False)
    assert discover_groups(model, x).sizes == expected
    assert not any(p.requires_grad for p in model.parameters())
