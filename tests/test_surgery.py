"""Masked forward == physical pruning; surgery keeps exactly the given channels; artifacts reload."""

import json

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from torch.func import functional_call

from stamp_dist.errors import StampError
from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning import (CostModel, PruningSpec, budget_mask, discover_groups, load_pruned, masked,
                                prune_model, save_pruned)

X = torch.zeros(1, 3, 32, 32)


def _trained_looking(name, width=16):
    """A backbone (a name, factory or module) in eval mode with non-trivial BN statistics and shifts (so
    a mask placed before a BN, or a missed coupled layer, would show in the output)."""
    model = build_backbone(name, 10, width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _random_keep(groups, frac=0.5):
    keep = [torch.rand(c) < frac for c in groups.sizes]
    for k in keep:
        k[torch.randint(len(k), ())] = True
    return keep


@pytest.mark.parametrize("name", ["convnet", "resnet20", "resnet18", "vgg19_bn"])
def test_hard_mask_equals_pruned_model(name):
    model = _trained_looking(name)
    groups = discover_groups(model, X)
    keep = _random_keep(groups)
    pruned = prune_model(model, groups, keep)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with masked(model, groups, [k.float() for k in keep]):
            y_masked = model(x)
        y_pruned, y_dense = pruned(x), model(x)
    assert (y_masked - y_pruned).abs().max() < 1e-4
    assert (y_masked - y_dense).abs().max() > 1e-3  # the mask did something, and the hooks are gone


def test_masked_functional_call_gradients():
    model = build_backbone("resnet20", 10, width=8).eval()
    groups = discover_groups(model, X)
    masks = [torch.full((c,), 0.7, requires_grad=True) for c in groups.sizes]
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    with masked(model, groups, masks):
        y = functional_call(model, params, (x,))
        y_direct = model(x)
    assert torch.allclose(y, y_direct)
    y.square().sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks)


def test_prune_keeps_exact_indices_and_leaves_original():
    model = _trained_looking("resnet20")
    groups = discover_groups(model, X)
    keep = _random_keep(groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_model(model, groups, keep, num_classes=5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    assert type(pruned) is type(model)
    stem, inner = keep[0].nonzero().flatten(), keep[1].nonzero().flatten()  # layer1.0.conv2: inner → stem
    w = model.layer1[0].conv2.weight[stem][:, inner]
    assert torch.equal(pruned.layer1[0].conv2.weight, w)
    assert torch.equal(pruned.layer1[0].bn2.running_mean, model.layer1[0].bn2.running_mean[stem])
    last = next(g.index for g in groups if "fc" in g.in_members)
    assert pruned.fc.in_features == pruned.feature_dim == int(keep[last].sum())
    assert pruned.fc.out_features == 5
    assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_prune_rejects_empty_group():
    model = build_backbone("convnet", 10)
    groups = discover_groups(model, X)
    keep = [torch.ones(c, dtype=torch.bool) for c in groups.sizes]
    keep[1][:] = False
    with pytest.raises(StampError, match="at least one"):
        prune_model(model, groups, keep)


def test_save_and_load_bit_identical(tmp_path):
    model = _trained_looking("resnet20", width=8)
    groups = discover_groups(model, X)
    cost = CostModel(model, groups)
    keep = budget_mask([torch.rand(c) for c in groups.sizes], cost, 0.4)
    pruned = prune_model(model, groups, keep, num_classes=7).eval()
    macs, params = tp.utils.count_ops_and_params(pruned, X)
    dense_macs, dense_params = tp.utils.count_ops_and_params(model, X)
    meta = {"backbone": "resnet20", "width": 8, "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    report = {"method": "stamp", "macs": macs, "params": params, "dense_macs": dense_macs,
              "dense_params": dense_params}
    spec = PruningSpec.from_masks(meta, groups, keep, num_classes=7, report=report)
    assert spec.pruned_macs < 0.45 * spec.dense_macs and spec.pruned_params < spec.dense_params

    out = save_pruned(tmp_path / "pruned", pruned, spec)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "spec.json"]
    on_disk = json.loads((out / "spec.json").read_text())
    assert on_disk["groups"][0]["kept"] == keep[0].nonzero().flatten().tolist()

    loaded, spec2 = load_pruned(out)
    assert spec2 == spec
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned(x))

    with pytest.raises(StampError, match="exists"):
        save_pruned(out, pruned, spec)
    on_disk["backbone"] = "resnet56"
    (out / "spec.json").write_text(json.dumps(on_disk))
    with pytest.raises(StampError, match="does not match"):
        load_pruned(out)
    with pytest.raises(StampError, match="not found"):
        load_pruned(tmp_path / "missing")


def test_pruned_copy_of_a_frozen_model_is_trainable():
    model = build_backbone("resnet20", 10).requires_grad_(False)
    groups = discover_groups(model, torch.zeros(1, 3, 32, 32))
    keep = [torch.ones(c, dtype=torch.bool) for c in groups.sizes]
    keep[1][:4] = False  # one group pruned, the others untouched
    pruned = prune_model(model, groups, keep)
    assert all(p.requires_grad for p in pruned.parameters())
    assert not any(p.requires_grad for p in model.parameters())
