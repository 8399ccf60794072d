import pytest
import torch

from stamp_dist.choices import CHANNEL_STATS
from stamp_dist.meta.set_inputs import LEGACY_STATS, _pooled, channel_statistics, read_set
from stamp_dist.models.backbones import build_backbone
from stamp_dist.models.generator import MaskGenerator
from stamp_dist.pruning.groups import discover_groups


def _acts(n_way=4, k=6, seed=0):
    """Channel 0 separates the classes, channel 1 is class-independent noise, channel 2 is dead."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_way).repeat_interleave(k).float()
    acts = torch.rand(n_way * k, 3, 5, 5, generator=gen)
    acts[:, 0] += 3 * labels.view(-1, 1, 1)
    acts[:, 2] = -1.0  # negative before the ReLU: never active
    return acts


NUM_STATS = len(LEGACY_STATS)


def test_separating_channel_has_the_highest_fisher_ratio():
    stats = channel_statistics(_pooled(_acts()), n_way=4)
    assert stats.shape == (3, NUM_STATS)
    activity, fisher = stats.T
    assert fisher.argmax() == 0 and fisher.argmin() == 2
    assert activity.argmin() == 2
    torch.testing.assert_close(stats.mean(0), torch.zeros(NUM_STATS), atol=1e-5, rtol=0)  # standardised per group


def test_a_copied_channel_is_redundant():
    acts = _acts()
    acts = torch.cat([acts, 2 * acts[:, :1]], dim=1)  # channel 3 = 2 × channel 0
    (redundancy,) = channel_statistics(_pooled(acts), 4, ["redundancy"]).T
    assert set(redundancy.topk(2).indices.tolist()) == {0, 3}


def test_taylor_statistic_is_the_mask_gradient_per_image():
    """``taylor`` = Σ_images |∂L_i/∂m_c| at m = 1 for a mask m scaling the group's channels at all its mask
    points: checked against an independent computation through the masked forward."""
    import torch.nn.functional as F

    from stamp_dist.meta.set_inputs import _log, _standardise
    from stamp_dist.pruning.masking import masked

    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 3, width=4).double().eval().requires_grad_(False)  # float64: exact enough
    groups = discover_groups(backbone, torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    x = torch.randn(3 * 4, 3, 16, 16, dtype=torch.float64) + torch.arange(3).repeat_interleave(4).view(-1, 1, 1, 1)
    y = torch.arange(3).repeat_interleave(4)
    inputs = read_set(backbone, groups, x, 3, CHANNEL_STATS)
    assert [tuple(s.shape) for s in inputs.channel_stats] == [(c, len(CHANNEL_STATS)) for c in groups.sizes]
    with torch.no_grad():
        feats = backbone.forward_features(x)
    protos = torch.stack([feats[y == c].mean(0) for c in range(3)])
    sq = (protos**2).sum(1)
    w, b = 2 * protos / sq.mean(), -sq / sq.mean()
    expected = [torch.zeros(c, dtype=torch.float64) for c in groups.sizes]
    for i in range(len(x)):
        masks = [torch.ones(c, dtype=torch.float64, requires_grad=True) for c in groups.sizes]
        with masked(backbone, groups, masks):
            loss = F.cross_entropy(F.linear(backbone.forward_features(x[i:i + 1]), w, b), y[i:i + 1], reduction="sum")
        for e, g in zip(expected, torch.autograd.grad(loss, masks)):
            e += g.abs()
    column = CHANNEL_STATS.index("taylor")
    for stats, e in zip(inputs.channel_stats, expected):
        torch.testing.assert_close(stats[:, column], _standardise(_log(e)).float(), atol=1e-4, rtol=0)
    assert all(p.grad is None for p in backbone.parameters())


def test_read_set_matches_backbone_and_groups():
    backbone = build_backbone("resnet20", 10, width=8).eval()
    groups = discover_groups(backbone, torch.zeros(1, 3, 16, 16))
    x = torch.randn(3 * 4, 3, 16, 16)
    inputs = read_set(backbone, groups, x, n_way=3, stats=CHANNEL_STATS)
    torch.testing.assert_close(inputs.features.reshape(12, -1), backbone.forward_features(x))
    assert [tuple(s.shape) for s in inputs.channel_stats] == [(c, len(CHANNEL_STATS)) for c in groups.sizes]
    assert all(torch.isfinite(s).all() for s in inputs.channel_stats)
    assert not any(h for m in backbone.modules() for h in m._forward_hooks.values())  # hooks removed


@pytest.mark.parametrize("micro_batch", [4, 5])
def test_reading_a_set_in_chunks_reads_the_same(micro_batch):
    """``micro_batch`` bounds memory, not results: every statistic (``taylor`` included, whose loss needs the
    whole set's prototypes) and the features equal one pass over the set."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 3, width=4).double().eval().requires_grad_(False)
    groups = discover_groups(backbone, torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    x = torch.randn(3 * 4, 3, 16, 16, dtype=torch.float64) + torch.arange(3).repeat_interleave(4).view(-1, 1, 1, 1)
    whole = read_set(backbone, groups, x, 3, CHANNEL_STATS)
    chunked = read_set(backbone, groups, x, 3, CHANNEL_STATS, micro_batch=micro_batch)
    torch.testing.assert_close(chunked.features, whole.features)
    for a, b in zip(chunked.channel_stats, whole.channel_stats):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_generator_reads_statistics_once_trained():
    torch.manual_seed(0)
    gen = MaskGenerator([3, 5], embed_dim=4, hidden=8, channel_stats=NUM_STATS)
    r = torch.randn(4)
    stats = [torch.randn(3, NUM_STATS), torch.randn(5, NUM_STATS)]
    flipped = [-s for s in stats]
    # The read-out starts at zero: an untrained generator equals the plain one...
    assert all(torch.equal(a, b) for a, b in zip(gen(r, 0.5, stats), gen(r, 0.5, flipped)))
    torch.nn.init.normal_(gen.stats_out.weight)
    # ...and once trained, its logits follow the statistics channel by channel.
    assert not any(torch.allclose(a, b) for a, b in zip(gen(r, 0.5, stats), gen(r, 0.5, flipped)))


def test_generator_without_statistics_rejects_them():
    gen = MaskGenerator([3], embed_dim=4, hidden=8)
    with pytest.raises(ValueError, match="reads 0 channel statistics"):
        gen(torch.randn(4), 0.5, [torch.randn(3, NUM_STATS)])
