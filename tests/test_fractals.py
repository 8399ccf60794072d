import re

import numpy as np

from stamp_dist.config import DataConfig
from stamp_dist.data import demo, fractals
from stamp_dist.data.episodes import task_families
from stamp_dist.data.manifest import Manifest


def test_genera_are_contractive_and_fill_their_box():
    rng = np.random.default_rng(0)
    for ifs in fractals.make_genera(6, rng):
        assert np.linalg.norm(ifs.A, ord=2, axis=(-2, -1)).max() < 1  # the attractor exists
        assert fractals.fill_rate(ifs, rng) >= fractals.MIN_FILL


def test_points_are_normalised_and_splat_is_a_density():
    rng = np.random.default_rng(1)
    stack = fractals.perturb(fractals.make_genera(1, rng)[0], 0.0, rng, 3)
    pts = fractals.attractor_points(stack, rng)
    assert pts.shape == (3, fractals.POINTS * fractals.STEPS, 2)
    assert np.allclose(np.abs(pts).max((1, 2)), 1, atol=1e-3)  # the longer side of the box spans [-1, 1]
    alpha = fractals.splat(pts, np.full(3, 10.0), np.zeros(3), np.full((3, 2), 16.0), 32)
    assert alpha.shape == (3, 32, 32, 1) and alpha.min() == 0 and np.allclose(alpha.max((1, 2, 3)), 1)
    assert (alpha[:, :6] == 0).all() and (alpha[:, 27:] == 0).all()  # radius 10 around the centre: rows 6-26


def test_fractal_classes_are_named_by_genus_and_species_and_deterministic():
    classes = demo.fractal_classes(10, seed=0)
    assert [c.name for c in classes][:3] == ["ifs00-a", "ifs00-b", "ifs00-c"] and classes[8].name == "ifs01-a"
    a = classes[3].render(4, demo._class_rng(0, classes[3].key, "train"))
    again = demo.fractal_classes(10, seed=0)[3].render(4, demo._class_rng(0, classes[3].key, "train"))
    other = classes[4].render(4, demo._class_rng(0, classes[4].key, "train"))
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, again) and not np.array_equal(a, other)
    assert not np.array_equal(demo.fractal_classes(10, seed=1)[3].render(4, demo._class_rng(1, classes[3].key, "train")),
                              a)


def test_species_of_a_genus_are_closer_than_other_genera():
    """A genus is a fine-grained family: its species' maps differ less than two genera's do."""
    g = fractals.make_genera(2, np.random.default_rng([0, 1]))
    rng = np.random.default_rng(2)
    within = [np.abs(fractals.perturb(g[0], fractals.SPECIES_JITTER, rng).A - g[0].A).mean() for _ in range(20)]
    k = min(len(g[0].A), len(g[1].A))
    assert np.mean(within) < np.abs(g[0].A[:k] - g[1].A[:k]).mean()


def test_demo_reference_with_fractals_and_its_families(tmp_path):
    small = dict(demo_classes=6, demo_train_per_class=2, demo_test_per_class=1, fashion_mnist="")
    paths = demo.make_demo_data(tmp_path / "data", DataConfig(seed=0, demo_fractal_classes=12, **small))
    ref = Manifest.load(paths["reference"])
    assert ref.num_classes == 18 and ref.split("train").counts == [2] * 18
    assert all(re.fullmatch(r"ifs0[01]-[a-h]", n) for n in ref.classes[6:])
    families = task_families("name_tokens", ref, list(range(18)), n_way_min=2)
    genus0 = sorted(ref.classes.index(f"ifs00-{s}") for s in "abcdefgh")
    assert genus0 in families  # the genus token makes a family of its 8 species
    # Without fractals the key (demo.json) is the one directories made before fractals existed carry.
    assert "demo_fractal_classes" not in demo._demo_key(DataConfig(**small))
