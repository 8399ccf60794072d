import numpy as np
import pytest
import torch

from stamp_dist.config import MetaConfig
from stamp_dist.data.episodes import ClassPool, EpisodeSampler, sample_task, split_classes, task_families
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
    m = MetaConfig(n_way_min=2, n_way_max=4, k_shot=2, q_query=3, budget_min=0.2, budget_max=0.5)
    sampler = EpisodeSampler(pool, [0, 1, 2, 3, 4], m, seed=1)
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
        m = MetaConfig(n_way_min=2, n_way_max=3, k_shot=1, q_query=1, budget_min=0.1, budget_max=0.9)
        sampler = EpisodeSampler(ClassPool(dataset, seed=seed), list(range(6)), m, seed=seed)
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


def test_a_refill_decodes_only_the_images_it_keeps(dataset, monkeypatch):
    """At ImageNet scale a class holds ~1,300 images and a buffer a few dozen: decoding the whole class
    per refill was the sampler's cost (issue 13). Now a fill decodes exactly the images it keeps."""
    from stamp_dist.data import readers

    decoded = []
    real = readers.decode_image
    monkeypatch.setattr(readers, "decode_image", lambda *a: decoded.append(1) or real(*a))
    pool = ClassPool(dataset, buffer_size=3, reuse=1, seed=0)
    served = 0
    for _ in range(10):
        x = pool.get(4, 3)
        served += len(x)
        assert ((x[:, 0, 0, 0] // 10) == 4).all()
    assert len(decoded) == served  # one decode per delivered image (reuse=1: a refill per draw)


def test_too_few_images_is_a_clear_error(dataset):
    with pytest.raises(StampError, match="has 8 'train' images.*needs 9"):
        ClassPool(dataset).get(0, 9)


def test_split_classes_disjoint_and_deterministic():
    train, val = split_classes(20, 4, seed=3)
    assert len(val) == 4 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert split_classes(20, 4, seed=3) == (train, val)
    with pytest.raises(StampError):
        split_classes(5, 4, seed=0)


def _manifest(names):
    from stamp_dist.data.manifest import Manifest, SplitInfo

    return Manifest(classes=names, image_size=8, splits={"train": SplitInfo([1] * len(names), [[]] * len(names))})


NAMES = ["red-disk", "red-star", "red-ring", "blue-disk", "blue-star", "blue-ring", "green-disk"]


def test_name_token_families():
    families = task_families("name_tokens", _manifest(NAMES), list(range(7)), n_way_min=2)
    # red, blue (3 each), disk (3), star, ring (2 each); green has one class: no family of its own.
    assert families == [[3, 4, 5], [0, 3, 6], [0, 1, 2], [2, 5], [1, 4]]
    assert task_families("none", _manifest(NAMES), list(range(7)), 2) == []
    # Only the given (meta-train) classes count, and a family must hold n_way_min of them.
    assert task_families("name_tokens", _manifest(NAMES), [0, 1, 3, 4], n_way_min=2) == [[3, 4], [0, 3], [0, 1],
                                                                                        [1, 4]]


def test_json_families_and_their_errors(tmp_path):
    path = tmp_path / "families.json"
    path.write_text('{"warm": ["red-disk", "red-star", "green-disk"], "tiny": ["blue-ring"]}')
    assert task_families(str(path), _manifest(NAMES), list(range(7)), n_way_min=2) == [[0, 1, 6]]
    path.write_text('{"warm": ["red-disk", "purple-disk"]}')
    with pytest.raises(StampError, match="purple-disk"):
        task_families(str(path), _manifest(NAMES), list(range(7)), 2)
    with pytest.raises(StampError, match="name_tokens"):
        task_families(str(tmp_path / "missing.json"), _manifest(NAMES), list(range(7)), 2)


def test_family_tasks_stay_inside_one_family():
    families = [[0, 1, 2], [3, 4, 5]]
    rng = np.random.default_rng(0)
    m = MetaConfig(n_way_min=2, n_way_max=3, budget_min=0.1, budget_max=0.5, family_tasks=1.0)
    inside = [sample_task(rng, list(range(7)), m, families).classes for _ in range(50)]
    assert all(set(c) <= {0, 1, 2} or set(c) <= {3, 4, 5} for c in inside)
    m = MetaConfig(n_way_min=3, n_way_max=3, budget_min=0.1, budget_max=0.5, family_tasks=0.5)
    mixed = [sample_task(rng, list(range(7)), m, families).classes for _ in range(200)]
    crossing = sum(not (set(c) <= {0, 1, 2} or set(c) <= {3, 4, 5}) for c in mixed)
    assert 50 < crossing < 150  # about half the tasks are drawn across all classes
    # Without families the draw is unchanged (no extra random number consumed).
    m = MetaConfig(n_way_min=2, n_way_max=3, budget_min=0.1, budget_max=0.5, family_tasks=0.5)
    a = sample_task(np.random.default_rng(1), list(range(7)), m)
    assert a == sample_task(np.random.default_rng(1), list(range(7)), m, [])


def test_task_transforms_are_drawn_per_task_and_applied_to_every_image(dataset):
    m = MetaConfig(n_way_min=2, n_way_max=2, k_shot=1, q_query=1, task_transforms=["invert"], task_transform_prob=0.5)
    sampler = EpisodeSampler(ClassPool(dataset, seed=0), list(range(6)), m, seed=0)
    episodes = [sampler.sample() for _ in range(40)]
    inverted = [ep for ep in episodes if ep.transforms == ("invert",)]
    assert 5 < len(inverted) < 35 and all(ep.transforms in ((), ("invert",)) for ep in episodes)
    for ep in episodes:  # the dataset's pixels are 10·class + index < 60: inverted ones are > 195
        for x in (ep.support_x, ep.query_x):
            assert bool((x > 195).all()) == (ep.transforms == ("invert",)) and bool((x < 60).all()) != bool((x > 195).all())


def test_transforms_gray_and_lowres():
    from stamp_dist.data.transforms import apply_task_transforms

    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gray = apply_task_transforms(x, ["gray"])
    assert gray.dtype == torch.uint8 and torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    expected = (0.299 * x[:, 0].float() + 0.587 * x[:, 1].float() + 0.114 * x[:, 2].float()).round()
    assert (gray[:, 0].float() - expected).abs().max() <= 1
    low = apply_task_transforms(x, ["lowres"])
    assert low.shape == x.shape and low.dtype == torch.uint8
    # a quarter-resolution image carries no more than its 8x8 samples: neighbouring pixels are close
    assert (low[..., 1:].float() - low[..., :-1].float()).abs().mean() < (x[..., 1:].float() - x[..., :-1].float()).abs().mean() / 3
