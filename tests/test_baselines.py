"""Score-based pruning baselines: each score's definition, the aggregation rule, budget, determinism."""

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from torch.func import functional_call

from stamp_dist.errors import StampError
from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning import CostModel, discover_groups
from stamp_dist.pruning.baselines import (SCORES, aggregate_scores, baseline_masks, baseline_scores, grasp_scores,
                                          l1_scores, snip_scores, synflow_scores, tp_scores)

SIZE = 16
X0 = torch.zeros(1, 3, SIZE, SIZE)


def _setup(name, n_classes=5, width=8):
    model = build_backbone(name, n_classes, width=width)
    groups = discover_groups(model, X0)
    return model, groups


def _batch(seed=0, n=8, n_classes=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=gen), torch.arange(n) % n_classes


@pytest.mark.parametrize("name", ["convnet", "resnet20"])
def test_every_method_meets_budget_and_leaves_model_untouched(name):
    model, groups = _setup(name)
    for p in model.layer1.parameters() if name == "resnet20" else model.features[0].parameters():
        p.requires_grad_(False)  # a partly frozen backbone is scored too, and stays frozen
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    cost = CostModel(model, groups, (3, SIZE, SIZE))
    x, y = _batch()
    for method in SCORES:
        for budget in (0.3, 0.6):
            masks = baseline_masks(method, model, groups, cost, budget, x, y, seed=1)
            assert [m.dtype for m in masks] == [torch.bool] * len(groups)
            assert all(m.sum() >= 1 for m in masks)
            assert float(cost.macs([m.float() for m in masks])) / cost.dense_macs <= budget + 0.02
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN stats too


def test_methods_are_deterministic_and_random_follows_seed():
    model, groups = _setup("resnet20")
    x, y = _batch()
    for method in SCORES:
        a = baseline_scores(method, model, groups, x, y, seed=3)
        b = baseline_scores(method, model, groups, x, y, seed=3)
        assert all(torch.equal(s, t) for s, t in zip(a, b)), method
        assert [len(s) for s in a] == groups.sizes
    other = baseline_scores("random", model, groups, x, y, seed=4)
    assert not all(torch.equal(s, t) for s, t in zip(a, other))


def test_unknown_method_is_rejected():
    model, groups = _setup("convnet")
    with pytest.raises(StampError, match="unknown baseline"):
        baseline_scores("obd", model, groups, *_batch())


def test_aggregation_rule_counts_every_weight_writing_or_reading_a_channel():
    model, groups = _setup("resnet20", n_classes=5, width=8)
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    scores = aggregate_scores(model, groups, ones)
    # group "layer1.0.conv1": its filter (8 in · 3·3) + BN γ, β + the reading conv2's slice (8 out · 3·3)
    plain = next(i for i, g in enumerate(groups) if g.name == "layer1.0.conv1")
    assert torch.equal(scores[plain], torch.full((8,), 8 * 9 + 2 + 8 * 9.0))
    # last residual group (32 channels): out = downsample 1×1 (16 in) + 3 conv2 (32·9) + 4 BNs (γ, β);
    # in = 2 conv1 (32 out · 9) + the head's column (5 classes)
    res = groups[8]
    assert res.name == "layer3.0.downsample.0" and "fc" in res.in_members
    expected = 16 + 3 * 32 * 9 + 4 * 2 + 2 * 32 * 9 + 5
    assert torch.equal(scores[8], torch.full((32,), float(expected)))


def test_snip_is_connection_sensitivity_and_a_silent_channel_scores_zero():
    model, groups = _setup("convnet")
    model.eval()
    g, c = groups[1], 3  # features.4 (conv) → features.5 (BN) → read by features.8
    assert g.out_members == ["features.4", "features.5"] and g.in_members == ["features.8"]
    with torch.no_grad():  # channel c carries nothing: filter, BN γ and β are zero
        model.features[4].weight[c] = 0
        model.features[5].weight[c] = 0
        model.features[5].bias[c] = 0
    x, y = _batch()
    per_weight = snip_scores(model, x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(per_weight[n], (p * p.grad).abs(), atol=1e-8), n
    # the reading weights get zero gradient (their input is 0), so the whole channel scores exactly 0
    assert per_weight["features.8.weight"][:, c].abs().sum() == 0
    scores = baseline_scores("snip", model, groups, x, y)
    assert scores[1][c] == 0 and (scores[1][torch.arange(16) != c] > 0).all()


def _grad(model, params, x, y):
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    return torch.autograd.grad(loss, list(params.values()))


def test_grasp_matches_finite_difference_hessian_gradient_product():
    model = build_backbone("convnet", 3, width=4).double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    g = dict(zip(names, _grad(model, {n: t.clone().requires_grad_() for n, t in theta.items()}, x, y)))
    eps = 1e-6

    def grad_at(sign):
        return _grad(model, {n: (theta[n] + sign * eps * g[n]).requires_grad_() for n in names}, x, y)

    hg = [(a - b) / (2 * eps) for a, b in zip(grad_at(+1), grad_at(-1))]
    scores = grasp_scores(model, x, y)
    for n, h in zip(names, hg):
        # keep-score θ ⊙ Hg (the paper removes the highest −θ ⊙ Hg)
        assert torch.allclose(scores[n], theta[n] * h, rtol=1e-4, atol=1e-9), n
    assert any((s < 0).any() for s in scores.values())  # signed, not an absolute value


def test_synflow_is_data_independent_positive_and_conserved():
    model, groups = _setup("resnet20")
    a = baseline_scores("synflow", model, groups, *_batch(0))
    x, _ = _batch(1)
    b = baseline_scores("synflow", model, groups, x * 5 + 2, torch.zeros(8, dtype=torch.long))
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert all((s > 0).all() for s in a)
    # conservation (Tanaka et al. Thm. 2): in a bias-free ReLU net each layer's scores sum to R (1 here)
    toy = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                        nn.Linear(5, 3, bias=False))
    sums = [float(s.sum()) for s in synflow_scores(toy, torch.zeros(2, 4)).values()]
    assert sums == pytest.approx([1.0, 1.0, 1.0], rel=1e-9)
    assert all((p < 0).any() for p in toy.parameters())  # |θ| was applied to copies only


def test_l1_ranks_scaled_filter_first_and_zeroed_filter_last():
    for name in ("convnet", "resnet20"):
        model, groups = _setup(name)
        g = groups[0]  # resnet20: the residual stream group, 4 coupled convs
        convs = [m for m in map(model.get_submodule, g.out_members) if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            convs[0].weight[5] *= 100  # in one conv only
            for conv in convs:
                conv.weight[2] = 0
        s = l1_scores(model, groups)[0]
        assert int(s.argmax()) == 5 and int(s.argmin()) == 2 and s[2] == 0
    # per-conv normalisation: rescaling one whole coupled conv does not change its vote
    with torch.no_grad():
        convs[-1].weight *= 1000
    assert torch.allclose(l1_scores(model, groups)[0], s, rtol=1e-5)


@pytest.mark.parametrize("method,importance", [("magnitude", tp.importance.GroupMagnitudeImportance),
                                               ("taylor", tp.importance.GroupTaylorImportance)])
def test_taylor_and_magnitude_equal_torch_pruning_on_the_same_groups(method, importance):
    model, groups = _setup("resnet20")
    x, y = _batch()
    ours = baseline_scores(method, model, groups, x, y)
    # reference: Torch-Pruning directly, rooted at each group's *last* conv, gradients via backward
    ref_model = copy.deepcopy(model).eval()
    dg = tp.DependencyGraph().build_dependency(ref_model, X0)
    nn.functional.cross_entropy(ref_model(x), y).backward()
    for g, s in zip(groups, ours):
        root = [m for m in map(ref_model.get_submodule, g.out_members) if isinstance(m, nn.Conv2d)][-1]
        group = dg.get_pruning_group(root, tp.prune_conv_out_channels, list(range(g.channels)))
        assert torch.allclose(s, importance()(group), rtol=1e-4), g.name
    assert all(p.grad is None for p in model.parameters())


def test_tp_scores_uses_given_importance():
    model, groups = _setup("convnet")
    x, y = _batch()
    l1_first = tp_scores(model, groups, tp.importance.GroupMagnitudeImportance(
        p=1, normalizer=None, group_reduction="first"), x, y)
    for g, s in zip(groups, l1_first):
        w = model.get_submodule(g.out_members[0]).weight
        assert torch.allclose(s, w.detach().abs().flatten(1).sum(1))


# --- learn gates on the target (pruning/gates.py) --------------------------------------------------


def _gate_setup(budget_weight=50.0):
    from stamp_dist.pruning.gates import GateSettings

    from stamp_dist.pruning.prunable import PrunableBackbone

    model, groups = _setup("convnet")
    model.eval().requires_grad_(False)
    net = PrunableBackbone(model, {"image_size": SIZE}, groups, CostModel(model, groups, (3, SIZE, SIZE)))
    x, y = _batch(n=20)
    gates = lambda steps, lr: GateSettings(tau=0.5, straight_through=False, prior="bernoulli", prior_keep=None,  # noqa: E731
                                           prior_weight=0.01, budget_weight=budget_weight, steps=steps, lr=lr,
                                           batch_size=8)
    return net, x, y, gates


def test_learned_gates_start_at_the_budget_and_train_only_gates_and_head():
    from stamp_dist.models.generator import keep_probability
    from stamp_dist.pruning.gates import learn_gate_logits

    net, x, y, gates = _gate_setup()
    model = net.backbone
    state = copy.deepcopy(model.state_dict())
    # lr 0: the logits stay at their initial value logit(√b): each channel kept with probability √b
    logits = learn_gate_logits(net, x, y, 5, 0.36, gates(steps=2, lr=0.0), seed=0)
    assert all(torch.allclose(keep_probability(a), torch.full_like(a, 0.6)) for a in logits)
    trained = learn_gate_logits(net, x, y, 5, 0.36, gates(steps=5, lr=0.1), seed=0)
    again = learn_gate_logits(net, x, y, 5, 0.36, gates(steps=5, lr=0.1), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(trained, again))  # seeded
    assert not all(torch.equal(a, b) for a, b in zip(trained, logits))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_learned_gates_follow_the_budget_penalty_and_give_masks_at_the_budget():
    from stamp_dist.models.generator import keep_probability
    from stamp_dist.pruning.gates import gate_masks, learn_gate_logits

    net, x, y, gates = _gate_setup(budget_weight=1e4)
    cost = net.cost
    # the initial expected ratio (√b per channel) is off the budget for this net; the penalty pulls it in
    expected = lambda ls: float(cost.macs([keep_probability(a) for a in ls]) / cost.dense_macs)  # noqa: E731
    start = expected(learn_gate_logits(net, x, y, 5, 0.2, gates(1, 0.0), 0))
    end = expected(learn_gate_logits(net, x, y, 5, 0.2, gates(60, 0.05), 0))
    assert abs(end - 0.2) < abs(start - 0.2) / 3
    masks = gate_masks(net, x, y, 5, 0.2, gates(10, 0.05), 0)
    assert [m.dtype for m in masks] == [torch.bool] * len(net.groups)
    assert float(cost.macs([m.float() for m in masks])) / cost.dense_macs <= 0.2


# --- train then prune (methods.py): L1 on the dense model fine-tuned on the target -----------------------------


def test_train_then_prune_ranks_the_fine_tuned_weights_and_keeps_them(tiny_run):
    from conftest import tiny_config
    from stamp_dist.bench import plan, run, samples
    from stamp_dist.choices import Method
    from stamp_dist.methods import METHODS
    from stamp_dist.pruning.hardmask import uniform_ratio_masks

    cfg = tiny_config(tiny_run, f"bench.targets=[{tiny_run}/data/targets/digits]", "bench.methods=[train_prune]")
    b = run.Bench(cfg, torch.device("cpu"))
    src = b.source
    [cell] = plan.plan_cells(cfg)
    sample, evaluation = samples.split_sample(b.data(cell.target), cell.train_per_class, cell.seed)
    batch = samples.pruning_batch(sample, 5, cell.seed, b.device)
    g = src.net.groups[1]
    pretrained = uniform_ratio_masks(l1_scores(src.net.backbone, src.net.groups), src.net.cost, cell.budget)
    best = int(l1_scores(src.net.backbone, src.net.groups)[1].argmax())

    def fine_tune(model, cell, sample, evaluation):  # a "fine-tune" that silences the pretrained ranking's best filter
        with torch.no_grad():
            model.get_submodule(g.name).weight[best] = 0
        return {"seconds": 1.5, "top1": 0.5, "top1_before": 0.1}

    b.finetune = fine_tune
    pruned = METHODS[Method.TRAIN_PRUNE].prune(src, b.job(cell, sample, batch, evaluation))
    dense = b.dense_finetune(cell, sample, batch, evaluation)  # the memo: that fine-tuned model
    assert pruned.seconds["dense_finetune"] == pytest.approx(sum(dense.pruned.seconds.values()) + 1.5)
    dense = dense.pruned.model
    masks = uniform_ratio_masks(l1_scores(dense, src.net.groups), src.net.cost, cell.budget)
    assert pretrained[1][best] and not masks[1][best]  # ranked on the fine-tuned weights
    assert all(torch.equal(a, b) for a, b in zip(pruned.masks, masks))
    kept_out, kept_in = masks[1].nonzero().squeeze(1), masks[0].nonzero().squeeze(1)
    model = pruned.model
    assert torch.equal(model.get_submodule(g.name).weight, dense.get_submodule(g.name).weight[kept_out][:, kept_in])
    assert torch.equal(model.fc.bias, dense.fc.bias)  # and the fine-tuned head is kept
