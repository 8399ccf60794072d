import pytest
import torch

from stamp_dist.config import MetaConfig
from stamp_dist.data.episodes import Task, build_episode
from stamp_dist.meta.objective import Stamp, StampSettings, episode_loss, validate_episode
from stamp_dist.models.heads import prototype_head
from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning.prunable import PrunableBackbone

RECORD = {"backbone": "convnet", "width": 8, "num_classes": 5, "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}


def setup(**overrides):
    cfg = MetaConfig(encoder_dim=16, encoder_heads=2, encoder_inducing=4, generator_hidden=16, inner_steps=2,
                     **overrides)
    backbone = build_backbone("convnet", 5, width=8).eval().requires_grad_(False)
    net = PrunableBackbone.build(backbone, RECORD)  # the groups trace a frozen backbone too
    stamp = Stamp(backbone.feature_dim, net.groups.sizes, StampSettings.of(cfg))
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (5, 3, 16, 16), dtype=torch.uint8, generator=gen) for _ in range(3)]
    episode = build_episode(images, Task([4, 7, 9], 0.4), k_shot=2)
    return net, stamp, episode


def test_prototype_head_is_nearest_prototype():
    feats = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0]])
    head = prototype_head(feats, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(head["fc.weight"], torch.tensor([[0.0, 2.0], [8.0, 0.0]]))
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    logits = x @ head["fc.weight"].T + head["fc.bias"]
    assert logits.argmax(1).tolist() == [1, 0]


@pytest.mark.parametrize("overrides", [{}, {"first_order": False}, {"adapt_backbone": True},
                                       {"straight_through": True, "prior": "beta_bernoulli"}])
def test_meta_gradient_reaches_encoder_and_generator(overrides):
    net, stamp, episode = setup(**overrides)
    out = episode_loss(net, stamp, episode, torch.Generator().manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert 0 < float(out.expected_ratio) <= 1
    for part in (stamp.encoder, stamp.generator):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in net.backbone.parameters())  # frozen unless meta.learn_backbone


def test_learn_backbone_sends_gradient_to_backbone():
    net, stamp, episode = setup(learn_backbone=True, adapt_backbone=True)
    net.backbone.requires_grad_(True)
    episode_loss(net, stamp, episode).loss.backward()
    assert net.backbone.features[0].weight.grad is not None and net.backbone.features[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides", [{}, {"first_order": False}])
def test_micro_batched_episode_has_the_same_loss_and_meta_gradient(overrides):
    """``runtime.micro_batch`` checkpoints the masked forwards chunk by chunk (memory), and changes nothing
    else: the loss and every meta-gradient equal those of one pass over the episode."""
    def run(micro_batch):
        torch.manual_seed(0)  # the same backbone and generator weights in both runs
        net, stamp, episode = setup(stats=["activity", "fisher", "taylor", "redundancy"], **overrides)
        net.micro_batch = micro_batch
        out = episode_loss(net, stamp, episode, torch.Generator().manual_seed(1))
        out.loss.backward()
        return out.loss, [p.grad.clone() for p in stamp.parameters() if p.grad is not None]

    whole, chunked = run(0), run(2)  # 6 support + 9 query images: chunks of 2, the last one short
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-5, rtol=1e-5)
    assert len(chunked[1]) == len(whole[1]) > 0
    for a, b in zip(chunked[1], whole[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_same_seed_same_loss():
    net, stamp, episode = setup()
    a = episode_loss(net, stamp, episode, torch.Generator().manual_seed(3))
    b = episode_loss(net, stamp, episode, torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss)


def test_validation_uses_hard_mask_at_budget():
    net, stamp, episode = setup()
    acc, ratio = validate_episode(net, stamp.eval(), episode)
    assert 0 <= acc <= 1
    assert abs(ratio - episode.budget) <= 0.02


@pytest.mark.parametrize("overrides", [{"allocation": "uniform"},
                                       {"task_transforms": ["gray"], "stats": ["taylor", "redundancy"]}])
def test_objective_variants_train(overrides):
    net, stamp, episode = setup(**overrides)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    out = episode_loss(net, stamp, episode, torch.Generator().manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in stamp.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.backbone.state_dict().items())  # BN statistics untouched


def test_uniform_generator_keeps_the_same_expected_fraction_in_every_group():
    from stamp_dist.models.generator import MaskGenerator, budget_offset

    torch.manual_seed(0)
    gen = MaskGenerator([4, 8, 16], embed_dim=4, hidden=8, uniform=True)
    torch.nn.init.normal_(gen.channel_bias, std=3.0)  # a trained-looking generator with strong preferences
    offset = float(budget_offset(torch.tensor(0.3)))
    learned = MaskGenerator([4, 8, 16], embed_dim=4, hidden=8)
    learned.load_state_dict(gen.state_dict())
    with torch.no_grad():
        for a in gen(torch.randn(4), 0.3):
            assert abs(float(a.mean()) - offset) < 1e-5
        assert max(abs(float(a.mean()) - offset) for a in learned(torch.randn(4), 0.3)) > 0.1


def test_prior_pulls_towards_the_budgets_uniform_keep_rate():
    from stamp_dist.models.generator import prior_keep_rate, prior_kl

    assert prior_keep_rate(None, 0.25) == 0.5 and prior_keep_rate(0.7, 0.25) == 0.7
    logit = lambda p: torch.full((6,), float(torch.tensor(p).logit()))  # noqa: E731
    at = prior_kl([logit(0.5)], "bernoulli", prior_keep_rate(None, 0.25))
    away = prior_kl([logit(0.5)], "bernoulli", prior_keep_rate(None, 0.04))
    assert at.abs() < 1e-6 and away > 0.1
