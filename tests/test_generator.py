import pytest
import torch

from stamp_dist.models.generator import (
    MaskGenerator,
    budget_penalty,
    hard_concrete_sample,
    keep_probability,
    prior_kl,
)

SIZES = [3, 16, 8, 1]


def _gen(sizes=SIZES, embed_dim=10) -> MaskGenerator:
    torch.manual_seed(0)
    return MaskGenerator(sizes, embed_dim, hidden=16, group_embed_dim=4)


@pytest.mark.parametrize("sizes", [[1], [4, 4], SIZES, [64, 2, 32, 64]])
def test_shapes(sizes):
    gen = _gen(sizes)
    logits = gen(torch.randn(10), 0.3)
    assert [tuple(a.shape) for a in logits] == [(c,) for c in sizes]
    batched = gen(torch.randn(5, 10), torch.rand(5))
    assert [tuple(a.shape) for a in batched] == [(5, c) for c in sizes]


def test_batched_equals_single():
    gen = _gen()
    r, b = torch.randn(3, 10), torch.tensor([0.1, 0.5, 1.0])
    batched = gen(r, b)
    for i in range(3):
        for a_batch, a_single in zip(batched, gen(r[i], float(b[i]))):
            torch.testing.assert_close(a_batch[i], a_single)


def test_starts_near_dense_and_budget_changes_output():
    gen = _gen()
    r = torch.randn(10)
    lo, hi = torch.cat(gen(r, 0.1)), torch.cat(gen(r, 0.9))
    assert 0.75 < keep_probability(hi).mean() < 0.97
    assert (lo - hi).abs().max() > 1e-4


def test_hard_concrete_range_and_exact_zeros_ones():
    logits = torch.linspace(-3, 3, 4000)
    z = hard_concrete_sample(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).float().mean() > 0.05 and (z == 1).float().mean() > 0.05
    assert ((z > 0) & (z < 1)).any()


def test_keep_probability_is_probability_of_z_above_half():
    logits = torch.full((20000,), 0.8)
    z = hard_concrete_sample(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert abs((z > 0.5).float().mean() - keep_probability(logits[0])) < 0.02


def test_deterministic_with_generator():
    logits = torch.randn(50)
    a = hard_concrete_sample(logits, 0.5, generator=torch.Generator().manual_seed(7))
    b = hard_concrete_sample(logits, 0.5, generator=torch.Generator().manual_seed(7))
    c = hard_concrete_sample(logits, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_straight_through_hard_forward_with_gradient():
    logits = torch.randn(200, requires_grad=True)
    z = hard_concrete_sample(logits, 0.5, generator=torch.Generator().manual_seed(0), straight_through=True)
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    (z * torch.arange(1.0, 201.0)).sum().backward()
    assert (logits.grad != 0).all()


def test_prior_kl():
    p = torch.tensor(0.3)
    at_prior = [torch.full((c,), torch.logit(p).item()) for c in SIZES]
    assert prior_kl(at_prior, "bernoulli", prior_keep=0.3).abs() < 1e-6
    away = [torch.full((c,), 2.0) for c in SIZES]
    assert prior_kl(away, "bernoulli", prior_keep=0.3) > 0.1
    assert prior_kl(away, "none") == 0
    # mean per channel: doubling the width keeps the value
    wide = [torch.full((2 * c,), 2.0) for c in SIZES]
    torch.testing.assert_close(prior_kl(wide, "bernoulli", 0.3), prior_kl(away, "bernoulli", 0.3))


def test_beta_bernoulli_prior():
    at_mean = [torch.full((c,), torch.logit(torch.tensor(0.3)).item()) for c in SIZES]
    kl_at = prior_kl(at_mean, "beta_bernoulli", 0.3)
    kl_away = prior_kl([torch.full((c,), 3.0) for c in SIZES], "beta_bernoulli", 0.3)
    mixed = prior_kl([torch.randn(c) * 3 for c in SIZES], "beta_bernoulli", alpha=0.5, beta=2.0)
    assert 0 <= kl_at < kl_away and mixed > 0
    with pytest.raises(ValueError):
        prior_kl(torch.zeros(3), "laplace")


def test_budget_penalty():
    e = torch.tensor(0.4, requires_grad=True)
    loss = budget_penalty(e, 0.25)
    loss.backward()
    assert torch.isclose(loss, torch.tensor(0.0225)) and e.grad > 0
    assert budget_penalty(torch.tensor(0.2), 0.25, one_sided=True) == 0


@pytest.mark.parametrize("straight_through", [False, True])
def test_gradients_reach_generator(straight_through):
    gen = _gen()
    r = torch.randn(10, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    logits = gen(r, 0.3)
    z = torch.cat([hard_concrete_sample(a, 0.5, generator=g, straight_through=straight_through)
                   for a in logits])
    loss = (z * torch.randn(z.shape)).sum() + prior_kl(logits, "beta_bernoulli")
    loss.backward()
    assert r.grad.abs().sum() > 0
    for name, p in gen.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
