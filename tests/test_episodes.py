import numpy as np
import pytest
import torch

from stamp_dist.data.episodes import ClassPool, EpisodeSampler, split_classes
from stamp_dist.data.shards import PerClassShardWriter
from stamp_dist.errors import StampError


@pytest.fixture
def dataset(tmp_path):
    """6 classes × 8 images of 8×8; each image's pixels all equal 10·class + index (so we can trace it)."""
    w = PerClassShardWriter(tmp_path, [f"c{i}" for i in range(6)], image_size=8, shard_size=3)
    for c in range(6):
        for i in range(8):
            w.add("train", c, np.full((8, 8, 3), 10 * c + i, dtype=np.uint8))
    w.finish()
    return tmp_path


def test_episode_shapes_labels_and_classes(dataset):
    pool = ClassPool(dataset, buffer_size=8)
    sampler = EpisodeSampler(pool, [0, 1, 2, 3, 4], 2, 4, k_shot=2, q_query=3, budget_min=0.2, budget_max=0.5, seed=1)
    for _ in range(5):
        ep = sampler.sample()
        n = ep.n_way
        assert 2 <= n <= 4 and set(ep.classes) <= {0, 1, 2, 3, 4}
        assert ep.support_x.shape == (2 * n, 3, 8, 8) and ep.query_x.shape == (3 * n, 3, 8, 8)
        assert ep.support_y.tolist() == [i for i in range(n) for _ in range(2)]
        assert 0.2 <= ep.budget <= 0.5
        for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
            assert ((x[:, 0, 0, 0] // 10).tolist() == [ep.classes[i] for i in y.tolist()])
        # support and query images of a class are distinct
        s = set(ep.support_x[:, 0, 0, 0].tolist())
        assert not s & set(ep.query_x[:, 0, 0, 0].tolist())


def test_sampling_is_seeded(dataset):
    def draw(seed):
        sampler = EpisodeSampler(ClassPool(dataset, seed=seed), list(range(6)), 2, 3, 1, 1, 0.1, 0.9, seed=seed)
        return [sampler.sample() for _ in range(3)]

    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(x.support_x, y.support_x) and x.budget == y.budget for x, y in zip(a, b))
    assert not all(torch.equal(x.query_x, y.query_x) for x, y in zip(a, c))


def test_bounded_buffer_resamples(dataset):
    pool = ClassPool(dataset, buffer_size=3, reuse=1, seed=0)
    seen = set()
    for _ in range(20):
        seen |= set(pool.get(2, 3)[:, 0, 0, 0].tolist())
        assert len(pool._buffers[2]) == 3
    assert len(seen) > 3  # refills drew other images of the class


def test_too_few_images_is_a_clear_error(dataset):
    with pytest.raises(StampError, match="has 8 'train' images.*needs 9"):
        ClassPool(dataset).get(0, 9)


def test_split_classes_disjoint_and_deterministic():
    train, val = split_classes(20, 4, seed=3)
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert split_classes(20, 4, seed=3) == (train, val)
    with pytest.raises(StampError):
        split_classes(5, 4, seed=0)
