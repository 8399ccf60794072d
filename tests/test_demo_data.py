import collections

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from stamp_dist.config import DataConfig
from stamp_dist.data import demo
from stamp_dist.data.manifest import Manifest
from stamp_dist.data.readers import load_split
from stamp_dist.errors import StampError

SMALL = dict(demo_classes=6, demo_train_per_class=3, demo_test_per_class=2, fashion_mnist="")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, demo.make_demo_data(out, DataConfig(seed=0, **SMALL))


def _arrays(root):
    return {split: load_split(root, split)[:2] for split in ("train", "test")}


def test_layout_and_counts(made):
    out, paths = made
    assert {k: v.relative_to(out).as_posix() for k, v in paths.items()} == demo.LAYOUT
    ref, held, digits = (Manifest.load(paths[k]) for k in ("reference", "synthetic_heldout", "digits"))
    assert ref.num_classes == 6 and held.num_classes == demo.HELDOUT_CLASSES and digits.classes == list("0123456789")
    assert ref.split("train").counts == [3] * 6 and held.split("test").counts == [2] * 16
    assert sum(digits.split("train").counts) == 1500 and sum(digits.split("test").counts) == 297
    assert ref.image_size == held.image_size == digits.image_size == 32
    images, _ = _arrays(paths["reference"])["train"]
    assert images.dtype == torch.uint8 and images.shape == (18, 3, 32, 32)


def test_same_seed_same_data_other_seed_other_data(made, tmp_path):
    _, paths = made
    again = demo.make_demo_data(tmp_path / "again", DataConfig(seed=0, **SMALL))
    for name in paths:
        a, b = _arrays(paths[name]), _arrays(again[name])
        for split in a:
            assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])
    other = demo.make_demo_data(tmp_path / "other", DataConfig(seed=1, **SMALL))
    assert not torch.equal(_arrays(paths["reference"])["train"][0], _arrays(other["reference"])["train"][0])


def test_class_images_do_not_depend_on_the_class_count():
    combo = demo.REFERENCE_COMBOS[2]
    a = demo.render_class(combo, 4, demo._class_rng(0, combo, "train"))
    b = demo.render_class(combo, 4, demo._class_rng(0, combo, "train"))
    c = demo.render_class(combo, 4, demo._class_rng(0, combo, "test"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_classes_are_distinct_and_heldout_is_disjoint():
    ref = [demo.class_name(c) for c in demo.REFERENCE_COMBOS]
    held = [demo.class_name(c) for c in demo.HELDOUT_COMBOS]
    assert len(set(ref)) == len(ref) >= 64 and len(set(held)) == len(held) == 16
    assert not set(ref) & set(held)
    assert not {s for _, _, s in demo.HELDOUT_COMBOS} & {s for _, _, s in demo.REFERENCE_COMBOS}
    # The default 64 classes use every attribute value equally often.
    first = demo.REFERENCE_COMBOS[:64]
    for i, n in ((0, 16), (1, 16), (2, 8)):
        assert set(collections.Counter(c[i] for c in first).values()) == {n}


def test_every_shape_and_texture_is_drawn():
    rng = np.random.default_rng(0)
    for shape in demo.SHAPES:
        for texture in demo.TEXTURES:
            img = demo.render_class(("blue", texture, shape), 2, rng)
            assert img.shape == (2, 32, 32, 3) and img.std() > 10


def test_digits_are_sklearns_real_digits(made):
    _, paths = made
    digits = load_digits()
    train, _ = train_test_split(np.arange(1797), test_size=297, stratify=digits.target, random_state=0)
    images, labels = _arrays(paths["digits"])["train"]
    for d in (0, 3, 9):
        first = int(np.sort(train[digits.target[train] == d])[0])  # shards keep the original order
        small = Image.fromarray(np.rint(digits.images[first] * 255 / 16).astype(np.uint8))
        expected = np.asarray(small.resize((32, 32), Image.Resampling.BILINEAR))
        got = images[labels == d][0]
        assert all(np.array_equal(got[ch].numpy(), expected) for ch in range(3))
    assert collections.Counter(labels.tolist()) == collections.Counter(digits.target[train].tolist())


def test_rerun_reuses_and_conflicts_are_errors(made, tmp_path, capsys):
    out, _ = made
    before = (out / "reference" / "manifest.json").stat().st_mtime_ns
    demo.make_demo_data(out, DataConfig(seed=0, **SMALL))
    assert (out / "reference" / "manifest.json").stat().st_mtime_ns == before
    assert "reusing" in capsys.readouterr().out
    with pytest.raises(StampError, match="different data config"):
        demo.make_demo_data(out, DataConfig(seed=1, **SMALL))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    with pytest.raises(StampError, match="not a demo data directory"):
        demo.make_demo_data(tmp_path / "x", DataConfig(**SMALL))
    with pytest.raises(StampError, match="demo_classes"):
        demo.make_demo_data(tmp_path / "y", DataConfig(demo_classes=len(demo.REFERENCE_COMBOS) + 1))
    assert not (tmp_path / "y").exists()


def test_fashion_mnist_target_from_its_idx_files(tmp_path, capsys):
    """Written beside the other targets when its IDX files exist (a class-balanced seeded subset, 28×28
    grayscale → 32×32 RGB, named classes); absent files leave it out with a note naming the package."""
    from conftest import write_fake_fashion_mnist

    source = write_fake_fashion_mnist(tmp_path / "idx", per_class=6)
    paths = demo.make_demo_data(tmp_path / "data", DataConfig(seed=0, **{**SMALL, "fashion_mnist": str(source)}))
    m = Manifest.load(paths["fashion_mnist"])
    assert m.classes == demo.FASHION_CLASSES and m.image_size == 32
    assert m.split("train").counts == [6] * 10 and m.split("test").counts == [3] * 10
    x, y = _arrays(paths["fashion_mnist"])["train"]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grayscale in three channels
    assert y.tolist() == sorted(y.tolist())
    # a re-run reuses it; a data directory made without it gains it once the files are there
    assert demo.make_demo_data(tmp_path / "data", DataConfig(seed=0, **{**SMALL, "fashion_mnist": str(source)}))
    without = demo.make_demo_data(tmp_path / "other", DataConfig(seed=0, **{**SMALL, "fashion_mnist": str(tmp_path / "none")}))
    assert "fashion_mnist" not in without and "dataset-fashion-mnist" in capsys.readouterr().out
    added = demo.make_demo_data(tmp_path / "other", DataConfig(seed=0, **{**SMALL, "fashion_mnist": str(source)}))
    assert Manifest.load(added["fashion_mnist"]).num_classes == 10
