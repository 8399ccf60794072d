import torch

from stamp_dist.models.set_encoder import SetEncoder

D, DIM = 12, 32


def _encoder(dtype=torch.float64) -> SetEncoder:
    torch.manual_seed(0)
    return SetEncoder(D, dim=DIM, heads=4, num_inducing=4).to(dtype).eval()


def _classes(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, D, generator=g, dtype=torch.float64) for k in sizes]


def test_permutation_invariant_within_and_across_classes():
    enc = _encoder()
    x = torch.randn(5, 7, D, dtype=torch.float64)
    shuffled = torch.stack([c[torch.randperm(7)] for c in x])[torch.randperm(5)]
    torch.testing.assert_close(enc(shuffled), enc(x), atol=1e-5, rtol=0)
    # float32, as used in training, is invariant to the same tolerance
    enc32 = _encoder(torch.float32)
    torch.testing.assert_close(enc32(shuffled.float()), enc32(x.float()), atol=1e-5, rtol=0)


def test_permutation_invariant_with_unequal_k():
    enc = _encoder()
    classes = _classes([1, 4, 9, 2])
    shuffled = [c[torch.randperm(len(c))] for c in classes][::-1]
    torch.testing.assert_close(enc(shuffled), enc(classes), atol=1e-5, rtol=0)


def test_any_n_and_k():
    enc = _encoder(torch.float32)
    with torch.no_grad():
        for n in (1, 2, 5, 10):
            for k in (1, 3, 20):
                r = enc(torch.randn(n, k, D))
                assert r.shape == (DIM,) and torch.isfinite(r).all()


def test_padding_does_not_leak():
    enc = _encoder()
    classes = _classes([1, 4, 9])
    together = enc.encode_classes(classes)
    for i, c in enumerate(classes):
        torch.testing.assert_close(together[i], enc.encode_classes(c[None])[0], atol=1e-8, rtol=0)
    # the list form equals the tensor form when all K are equal
    same = _classes([3, 3, 3])
    torch.testing.assert_close(enc(same), enc(torch.stack(same)), atol=1e-8, rtol=0)
    # also through nn.MultiheadAttention's inference fast path (float32, eval, no grad)
    enc32 = _encoder(torch.float32)
    with torch.no_grad():
        together = enc32.encode_classes([c.float() for c in classes])
        for i, c in enumerate(classes):
            torch.testing.assert_close(together[i], enc32.encode_classes(c[None].float())[0], atol=1e-5, rtol=0)


def test_forward_batch_matches_single_tasks():
    enc = _encoder()
    tasks = [_classes([2, 5], seed=2), torch.randn(4, 3, D, dtype=torch.float64), _classes([1, 1, 6], seed=3)]
    batched = enc.forward_batch(tasks)
    assert batched.shape == (3, DIM)
    for row, task in zip(batched, tasks):
        torch.testing.assert_close(row, enc(task), atol=1e-8, rtol=0)


def test_gradient_reaches_every_parameter():
    enc = _encoder(torch.float32).train()
    r = enc([c.float() for c in _classes([2, 5, 3])])
    # a random projection: the plain sum of a LayerNorm output has zero gradient
    (r * torch.randn(DIM)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
