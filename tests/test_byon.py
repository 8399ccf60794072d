"""Bring your own network: MobileNetV2 and a user's module (concat of two branches, a grouped conv) through
group discovery, cost model, masked forward, surgery, and the whole pipeline; networks the dependency graph
cannot follow are refused naming the layer."""

import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from test_surgery import _trained_looking

from stamp_dist.cli import main
from stamp_dist.errors import StampError
from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning import CostModel, check_prunable, discover_groups, masked, prune_model
from stamp_dist.pruning.baselines import aggregate_scores

X = torch.zeros(1, 3, 32, 32)

USER_NET = textwrap.dedent('''
    import torch
    import torch.nn as nn


    def block(cin, cout, k=3, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())


    class TwoBranch(nn.Module):
        def __init__(self, num_classes=5):
            super().__init__()
            self.stem = block(3, 8)
            self.left = block(8, 8)
            self.right = nn.Sequential(block(8, 4), block(4, 6))
            self.fuse = block(14, 16, k=1)  # reads the concatenation
            self.mix = block(16, 16, groups=4)  # a grouped conv: its channels are kept whole
            self.last = block(16, 12)
            self.classifier = nn.Linear(12, num_classes)

        def forward(self, x):
            x = self.stem(x)
            x = torch.cat([self.left(x), self.right(x)], dim=1)
            x = self.last(self.mix(self.fuse(x)))
            return self.classifier(x.mean((2, 3)))


    def make():
        return TwoBranch()
''')


@pytest.fixture
def user_net(tmp_path, monkeypatch):
    """``byon_user_net:make`` importable from a file outside the package."""
    (tmp_path / "byon_user_net.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "byon_user_net", raising=False)
    return "byon_user_net:make"


@pytest.mark.parametrize("which", ["mobilenet_v2_cifar", "user"])
def test_masked_equals_pruned_and_costs_match_torch_pruning(user_net, which):
    model = _trained_looking(*{"mobilenet_v2_cifar": ("mobilenet_v2_cifar", 8), "user": (user_net,)}[which])
    diffs = []
    groups = discover_groups(model, X)
    cost = CostModel(model, groups)
    assert (cost.dense_macs, cost.dense_params) == tp.utils.count_ops_and_params(model, X)
    for frac in (0.3, 0.7):
        keep = [torch.rand(c) < frac for c in groups.sizes]
        for k in keep:
            k[0] = True
        pruned = prune_model(model, groups, keep).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            with masked(model, groups, [k.float() for k in keep]):
                y_masked = model(x)
            diffs.append(float((y_masked - pruned(x)).abs().max()))
            assert diffs[-1] <= 1e-4
            assert (y_masked - model(x)).abs().max() > 1e-3
        assert (float(cost.macs(keep)), float(cost.params(keep))) == tp.utils.count_ops_and_params(pruned, X)
    print(f"{which}: max |masked - pruned| {max(diffs):.2e}")


def test_mobilenet_depthwise_conv_is_coupled_and_costs_kept_channels_once():
    model = build_backbone("mobilenet_v2_cifar", 10, width=8)
    groups = discover_groups(model, X)
    dw = "body.features.2.conv.1.0"  # block 2: expand 1×1 → depthwise 3×3 → project 1×1
    group = next(g for g in groups if dw in g.out_members)
    assert group.out_members == ["body.features.2.conv.0.0", "body.features.2.conv.0.1", dw, "body.features.2.conv.1.1"]
    assert group.in_members == ["body.features.2.conv.2"]
    cost = CostModel(model, groups)
    full = [torch.ones(c) for c in groups.sizes]
    half = [k.clone() for k in full]
    half[group.index][: group.channels // 2] = 0
    conv = model.get_submodule(dw)
    hw = 32 * 32  # small_input: block 2 keeps stride 1
    n_out_next = groups.sizes[[g.index for g in groups if "body.features.2.conv.2" in g.out_members][0]]
    expand_in = 8
    # per channel removed: the expand conv (in·1·hw), its BN (2hw) and ReLU6 (hw), the depthwise conv
    # (9hw, not 9hw·C), its BN and ReLU6, and the project conv (hw·n_out)
    per_channel = hw * (expand_in + 3 + conv.kernel_size[0] ** 2 + 3 + n_out_next)
    assert float(cost.macs(full) - cost.macs(half)) == per_channel * (group.channels // 2)


def test_user_net_concat_and_grouped_conv(user_net):
    model = build_backbone(user_net, 10)
    groups = discover_groups(model, X)
    assert [g.name for g in groups] == ["body.stem.0", "body.left.0", "body.right.0.0", "body.right.1.0", "body.last.0"]
    calls = {c.name: c for c in groups.calls}
    assert calls["body.fuse.0"].inputs == ((1, 8), (3, 6))  # the concatenation: left's group, then right's
    # the grouped conv, the layer feeding it and the one it feeds keep their channels
    assert calls["body.mix.0"].inputs == ((None, 16),) and calls["body.mix.0"].outputs == ((None, 16),)
    assert calls["body.last.0"].outputs == ((4, 12),)


class Branchy(nn.Module):
    """Data-dependent control flow: one branch never runs on the example."""

    def __init__(self, b_in=8):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(b_in, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.a(x)
        x = self.b(x) if x.amax() > 1e6 else self.c(x)  # b only for very bright inputs
        return self.head(x.mean((2, 3)))


class Sliced(Branchy):
    def __init__(self):
        super().__init__(b_in=4)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x)[:, :4])).mean((2, 3)))


class Chunked(Sliced):
    def forward(self, x):
        left, right = self.a(x).chunk(2, 1)
        return self.head(self.c(self.b(left) + self.b(right)).mean((2, 3)))


class Shuffled(Branchy):
    def forward(self, x):
        x = self.a(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # a channel shuffle
        return self.head(self.c(self.b(x)).mean((2, 3)))


@pytest.mark.parametrize("net, words", [
    (Branchy, ["layer 'body.b'", "does not run", "control flow"]),
    (Sliced, ["layer 'body.b'", "part of a channel group", "slicing"]),
    (Chunked, ["layer 'body.b'", "split/chunk"]),
])
def test_untraceable_networks_are_refused_naming_the_layer(net, words):
    model = build_backbone(net(), 4)
    with pytest.raises(StampError) as e:
        discover_groups(model, X)
    assert all(w in str(e.value) for w in words), e.value


def test_a_channel_shuffle_is_caught_by_the_pruning_check():
    model = build_backbone(Shuffled(), 4)
    groups = discover_groups(model, X)  # Torch-Pruning follows the reshapes, but not the permutation
    with pytest.raises(StampError, match="rearranges channels"):
        check_prunable(model, groups)
    check_prunable(*(lambda m: (m, discover_groups(m, X)))(build_backbone("resnet20", 4, width=4)))


# --- the whole pipeline: pretrain, meta-train, prune, fine-tune, export ---------------------------------------

def _pipeline(root, tiny_run, backbone, *model):
    d = tiny_run / "data"
    common = ["runtime.device=cpu", f"model.backbone={backbone}", *model, f"data.reference={d}/reference",
              f"pretrain.out={root}/pretrain", f"meta.out={root}/meta", "pretrain.epochs=1",
              "pretrain.batch_size=64"]
    meta = ["meta.steps=2", "meta.meta_batch=1", "meta.n_way_min=2", "meta.n_way_max=2", "meta.k_shot=2",
            "meta.q_query=2", "meta.val_every=2", "meta.val_tasks=1", "meta.val_classes=3", "meta.encoder_dim=16",
            "meta.encoder_heads=2", "meta.encoder_inducing=4", "meta.generator_hidden=16", "meta.checkpoint_every=2",
            "meta.budget_min=0.4",  # the user net's grouped conv is kept whole: lower budgets are out of reach
            "tracking.wandb_mode=disabled"]
    assert main(["pretrain", *common]) == 0
    assert main(["meta-train", *common, *meta]) == 0
    target = d / "targets" / "digits"
    assert main(["prune", "--generator", f"{root}/meta", "--data", str(target), "--budget", "0.5",
                 "--out", f"{root}/pruned", "runtime.device=cpu", "prune.samples_per_class=3"]) == 0
    assert main(["finetune", "--model", f"{root}/pruned", "--data", str(target), "--epochs", "1",
                 "--out", f"{root}/ft", "runtime.device=cpu", "finetune.train_per_class=3"]) == 0
    for fmt in ("onnx", "torch.export"):
        assert main(["export", "--model", f"{root}/ft", "--format", fmt]) == 0


@pytest.mark.slow
def test_pipeline_on_mobilenet_v2(tiny_run, tmp_path):
    _pipeline(tmp_path, tiny_run, "mobilenet_v2_cifar", "model.width=8")


@pytest.mark.slow
def test_pipeline_on_a_user_network(tiny_run, tmp_path, user_net):
    _pipeline(tmp_path, tiny_run, user_net)
    spec = (tmp_path / "ft" / "spec.json").read_text()
    assert user_net in spec


def test_scores_of_a_layer_reading_a_concatenation_go_to_the_right_groups(user_net):
    """SNIP, GraSP and SynFlow credit a channel with the scores of the weights reading it: for a layer reading
    ``cat([left, right])`` those are its own run of the input, not a share of every run."""
    model = build_backbone(user_net, 10)
    groups = discover_groups(model, X)
    scores = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    scores["body.fuse.0.weight"][:, 8:] = 1.0  # only the weights reading the right branch (group 3) score
    per_channel = aggregate_scores(model, groups, scores)
    assert per_channel[1].abs().sum() == 0  # left (group 1): nothing of fuse reads it
    assert torch.equal(per_channel[3], torch.full((6,), 16.0))  # right: 16 output channels × one 1×1 weight
