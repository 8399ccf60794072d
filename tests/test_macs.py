"""The differentiable cost model against Torch-Pruning's counter on physically pruned models."""

import pytest
import torch
import torch_pruning as tp

from stamp_dist.errors import StampError
from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning import CostModel, discover_groups, prune_model

X = torch.zeros(1, 3, 32, 32)


def _setup(name, **kw):
    model = build_backbone(name, 10, **kw)
    groups = discover_groups(model, X)
    return model, groups, CostModel(model, groups)


@pytest.mark.parametrize("name", ["convnet", "resnet20", "resnet18", "resnet50", "vgg19_bn"])
def test_dense_counts_match_torch_pruning(name):
    model, _, cost = _setup(name)
    macs, params = tp.utils.count_ops_and_params(model, X)
    assert cost.dense_macs == pytest.approx(macs, rel=1e-9)
    assert cost.dense_params == pytest.approx(params, rel=1e-9)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg19_bn"])
def test_random_hard_masks_match_pruned_model(name):
    model, groups, cost = _setup(name)
    for keep_frac in (0.3, 0.7):
        keep = [torch.rand(c) < keep_frac for c in groups.sizes]
        for k in keep:
            k[0] = True  # at least one channel per group
        macs, params = tp.utils.count_ops_and_params(prune_model(model, groups, keep), X)
        assert float(cost.macs(keep)) == pytest.approx(macs, rel=0.01)
        assert float(cost.params(keep)) == pytest.approx(params, rel=0.01)


def test_other_input_size():
    model = build_backbone("resnet20", 10)
    groups = discover_groups(model, X)
    cost = CostModel(model, groups, input_size=(3, 64, 64))
    keep = [torch.rand(c) < 0.5 for c in groups.sizes]
    for k in keep:
        k[0] = True
    macs, _ = tp.utils.count_ops_and_params(prune_model(model, groups, keep), torch.zeros(1, 3, 64, 64))
    assert float(cost.macs(keep)) == pytest.approx(macs, rel=1e-9)


def test_gradient_reaches_every_group():
    _, groups, cost = _setup("resnet20")
    probs = [torch.full((c,), 0.5, requires_grad=True) for c in groups.sizes]
    ratio = cost.macs(probs) / cost.dense_macs
    ratio.backward()
    for p in probs:
        assert p.grad is not None and (p.grad > 0).all()
    # half of every group kept: convs between two groups cost a quarter, the stem (fixed input) a half
    assert 0.25 < ratio.detach().item() < 0.5


def test_soft_keep_is_expected_cost():
    torch.manual_seed(1)
    _, groups, cost = _setup("convnet", width=4)
    probs = [torch.rand(c) for c in groups.sizes]
    samples = torch.stack([cost.macs([torch.bernoulli(p) for p in probs]) for _ in range(4000)])
    assert float(samples.mean()) == pytest.approx(float(cost.macs(probs)), rel=0.02)


def test_rejects_mismatched_inputs():
    model, groups, cost = _setup("convnet")
    with pytest.raises(StampError):
        cost.macs([torch.ones(c) for c in groups.sizes[:-1]])
    with pytest.raises(StampError):
        cost.macs([torch.ones(c + 1) for c in groups.sizes])
    with pytest.raises(StampError):
        CostModel(build_backbone("resnet20", 10), groups)
