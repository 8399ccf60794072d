import pytest
import torch

from stamp_dist.meta.set_inputs import NUM_STATS, channel_statistics, read_set
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


def test_separating_channel_has_the_highest_fisher_ratio():
    stats = channel_statistics(_acts(), n_way=4)
    assert stats.shape == (3, NUM_STATS)
    activity, fisher = stats.T
    assert fisher.argmax() == 0 and fisher.argmin() == 2
    assert activity.argmin() == 2
    torch.testing.assert_close(stats.mean(0), torch.zeros(NUM_STATS), atol=1e-5, rtol=0)  # standardised per group


def test_statistics_are_a_function_of_the_set():
    acts = _acts()
    per_class = acts.view(4, 6, *acts.shape[1:])
    shuffled = per_class[torch.tensor([2, 0, 3, 1])][:, torch.tensor([5, 1, 0, 4, 3, 2])].reshape(acts.shape)
    torch.testing.assert_close(channel_statistics(shuffled, 4), channel_statistics(acts, 4))
    other = channel_statistics(_acts(seed=1) * torch.tensor([1.0, 4.0, 1.0]).view(1, 3, 1, 1), 4)
    assert not torch.allclose(other, channel_statistics(acts, 4))


def test_read_set_matches_backbone_and_groups():
    backbone = build_backbone("resnet20", 10, width=8).eval()
    groups = discover_groups(backbone, torch.zeros(1, 3, 16, 16))
    x = torch.randn(3 * 4, 3, 16, 16)
    inputs = read_set(backbone, groups, x, n_way=3)
    torch.testing.assert_close(inputs.features.reshape(12, -1), backbone.forward_features(x))
    assert [tuple(s.shape) for s in inputs.channel_stats] == [(c, NUM_STATS) for c in groups.sizes]
    assert all(torch.isfinite(s).all() for s in inputs.channel_stats)
    assert not any(h for m in backbone.modules() for h in m._forward_hooks.values())  # hooks removed


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
