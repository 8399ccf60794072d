"""Per-class shard writer and readers: round trip, subsets, and damaged datasets caught with clear errors."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from stamp_dist.data import shards
from stamp_dist.data.manifest import Manifest
from stamp_dist.data.readers import ShardDataset, iter_class, iter_tar, load_class, load_split, normalize
from stamp_dist.data.shards import PerClassShardWriter
from stamp_dist.errors import StampError


def images(n, size=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def dataset(tmp_path):
    """3 classes × 5 train images (shards of 2), class 2 has no test images; returns (root, train images)."""
    x = images(15)
    w = PerClassShardWriter(tmp_path / "ds", ["a", "b", "c"], image_size=4, shard_size=2, source="test")
    for i, image in enumerate(x):
        w.add("train", i % 3, image)
    w.add("test", 0, x[0])
    w.add("test", 1, x[1])
    w.finish()
    return tmp_path / "ds", x


def test_load_split_round_trip(dataset):
    root, x = dataset
    got, labels, manifest = load_split(root, "train")
    assert manifest.classes == ["a", "b", "c"] and manifest.splits["train"].counts == [5, 5, 5]
    assert manifest.splits["train"].shards[0] == [f"train/00000-000{i}.tar" for i in range(3)]
    expect = np.concatenate([x[c::3] for c in range(3)])
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), expect)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 and got.dtype == torch.uint8
    pixels = x.reshape(-1, 3) / 255
    np.testing.assert_allclose(manifest.mean, pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(manifest.std, pixels.std(0), atol=1e-5)


def test_subsets_and_empty_class(dataset):
    root, x = dataset
    got, labels, _ = load_split(root, "train", per_class=2, classes=[2, 0])
    assert labels.tolist() == [2, 2, 0, 0]
    np.testing.assert_array_equal(got[0].permute(1, 2, 0).numpy(), x[2])
    got, labels, manifest = load_split(root, "test")
    assert labels.tolist() == [0, 1] and manifest.splits["test"].counts == [1, 1, 0]
    assert load_class(root, manifest, "test", 2).shape == (0, 3, 4, 4)
    assert load_class(root, manifest, "train", 1, n=0).shape == (0, 3, 4, 4)


def test_shard_dataset_and_normalize(dataset):
    root, _ = dataset
    ds = ShardDataset(root, "train", per_class=3)
    image, label = ds[4]
    assert len(ds) == 9 and label == 1 and image.shape == (3, 4, 4)
    images, labels, _ = load_split(root, "train", per_class=3)  # the same images, in the same order
    assert torch.equal(torch.stack([ds[i][0] for i in range(len(ds))]), images) and torch.equal(ds.labels, labels)
    z = normalize(images, ds.manifest)
    assert z.dtype == torch.float32 and abs(float(z.mean())) < 0.5


def test_writer_appends_to_shards_closed_early(tmp_path, monkeypatch):
    """More interleaved classes than MAX_OPEN still fill shards up to shard_size, in order."""
    monkeypatch.setattr(shards, "MAX_OPEN", 2)
    x = images(20)
    w = PerClassShardWriter(tmp_path / "ds", list("abcd"), image_size=4, shard_size=3)
    for i, image in enumerate(x):
        w.add("train", i % 4, image)
    manifest = w.finish()
    assert [len(s) for s in manifest.splits["train"].shards] == [2, 2, 2, 2]  # 5 images → 3 + 2
    got, labels, _ = load_split(tmp_path / "ds", "train")
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), np.concatenate([x[c::4] for c in range(4)]))
    # still a WebDataset shard, as webdataset itself parses it (own file handle: no ResourceWarning)
    first = tmp_path / "ds" / manifest.splits["train"].shards[1][0]
    with open(first, "rb") as f:
        files = [dict(m, __url__=str(first)) for m in wds.tariterators.tar_file_iterator(f)]
    samples = list(wds.tariterators.group_by_keys(files))
    assert [s["__key__"] for s in samples] == ["00001_00000000", "00001_00000001", "00001_00000002"]
    assert samples[0]["cls"] == b"1" and samples[0]["png"].startswith(b"\x89PNG")


def test_writer_infers_classes_and_checks_sizes(tmp_path):
    w = PerClassShardWriter(tmp_path / "ds", None, image_size=None)
    w.add("train", 1, images(1, 6)[0])
    w.add("train", 0, images(1, 6)[0][..., :1])  # one channel → RGB
    with pytest.raises(ValueError, match="earlier images are 6×6"):
        w.add("train", 0, images(1, 5)[0])
    manifest = w.finish()
    assert manifest.classes == ["0", "1"] and manifest.image_size == 6
    assert Manifest.load(tmp_path / "ds").splits["train"].counts == [1, 1]


def test_per_class_more_than_available(dataset):
    root, _ = dataset
    with pytest.raises(StampError, match=r"class 'a' has 1 'test' images .* fewer than the 3 asked for"):
        load_split(root, "test", per_class=3)
    with pytest.raises(StampError, match="no 'val' split"):
        load_split(root, "val")
    with pytest.raises(StampError, match="class id 5 is outside"):
        load_split(root, "train", classes=[5])


@pytest.mark.parametrize("cut", [2048, 3000])  # at a member boundary (tarfile itself is silent) / inside one
def test_truncated_shard(dataset, cut):
    root, _ = dataset
    shard = root / "train" / "00001-0000.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(StampError, match="00001-0000.tar is truncated or corrupt"):
        load_split(root, "train")
    with pytest.raises(StampError, match="truncated or corrupt"):
        list(iter_tar(shard))


def test_missing_shard(dataset):
    root, _ = dataset
    (root / "train" / "00002-0001.tar").unlink()
    with pytest.raises(StampError, match="00002-0001.tar is missing"):
        load_split(root, "train")


def rewrite_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_undecodable_image_in_shard(dataset):
    root, x = dataset
    rewrite_shard(root / "train" / "00000-0001.tar", [{"__key__": "bad", "png": b"garbage", "cls": b"0"}])
    with pytest.raises(StampError, match=r"00000-0001.tar: image 'bad.png' cannot be decoded"):
        load_split(root, "train")


def test_label_disagrees_with_shard(dataset):
    root, x = dataset
    rewrite_shard(root / "train" / "00001-0000.tar", [{"__key__": "k", "png": x[0], "cls": b"2"}])
    with pytest.raises(StampError, match="00001-0000.tar: sample 'k' has label 2 but the shard holds class 1"):
        load_split(root, "train")


def test_fewer_samples_than_manifest(dataset):
    root, x = dataset
    rewrite_shard(root / "train" / "00001-0002.tar", [])  # class 1's last shard loses its image
    manifest = Manifest.load(root)
    with pytest.raises(StampError, match=r"class 1 \('b'\) has 4 'train' images in its shards but 5"):
        list(iter_class(root, manifest, "train", 1))
    with pytest.raises(StampError, match="incomplete"):
        load_class(root, manifest, "train", 1, n=5)
    assert len(load_class(root, manifest, "train", 1, n=4)) == 4  # what is there still reads


def test_wrong_image_size_in_shard(dataset):
    root, x = dataset
    rewrite_shard(root / "train" / "00002-0002.tar", [{"__key__": "k", "png": images(1, 3)[0], "cls": b"2"}])
    with pytest.raises(StampError, match="image 'k' is 3×3, the manifest says 4×4"):
        load_split(root, "train")


@pytest.mark.parametrize("edit,problem", [
    (lambda m: m.update(classes="abc"), "'classes'"),
    (lambda m: m.update(std=[0.2, 0.2]), "'std'"),
    (lambda m: m["splits"]["train"].update(counts=[5, -1, 5]), "counts"),
    (lambda m: m["splits"]["train"].update(shards=["x.tar", [], []]), "shard lists"),
    (lambda m: m.update(extra=1), "extra"),
    (lambda m: m.pop("image_size"), "image_size"),
    (lambda m: m.update(resize=256), "'resize' is 256 in a 'stamp_dist/per-class-shards/v1' manifest"),
    (lambda m: m.update(resize=3, format="stamp_dist/per-class-shards/v2"), "'resize' is 3, expected an integer in"),
])
def test_malformed_manifest(dataset, edit, problem):
    root, _ = dataset
    raw = json.loads((root / "manifest.json").read_text())
    edit(raw)
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(StampError, match="manifest.json is malformed") as e:
        load_split(root, "train")
    assert problem in str(e.value)


def test_statistics_without_a_train_split(tmp_path):
    x = images(3)
    w = PerClassShardWriter(tmp_path / "ds", ["a"], image_size=4)
    for image in x:
        w.add("test", 0, image)
    np.testing.assert_allclose(w.finish().mean, (x.reshape(-1, 3) / 255).mean(0), atol=1e-5)


def test_a_tar_member_claiming_more_than_the_file_holds_is_refused_before_reading(tmp_path):
    """Defect 5 of issue 15: sizes are checked before allocating. A 1.5 kB shard whose member header claims
    8 GiB must fail as a corrupt shard, not try to read (allocate) 8 GiB."""
    import io
    import tarfile

    from stamp_dist.data.readers import iter_tar
    from stamp_dist.errors import StampError

    path = tmp_path / "lie.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("s0.png")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x89PNG"))
    data = bytearray(path.read_bytes())
    header = tarfile.TarInfo("s0.png")
    header.size = 8 * 2**30
    data[:512] = header.tobuf(format=tarfile.GNU_FORMAT)[:512]
    path.write_bytes(bytes(data))
    with pytest.raises(StampError, match="lie.tar is truncated or corrupt.*claims 8589934592 bytes"):
        list(iter_tar(path))


def test_chosen_images_are_read_through_the_shard_index(dataset, monkeypatch):
    """Issue 13: a class buffer refill seeks to the images it keeps; the shards are never read through."""
    from stamp_dist.data import readers

    root, x = dataset
    manifest = Manifest.load(root)
    assert all((root / f"{rel}.idx").is_file() for shards in manifest.splits["train"].shards for rel in shards)
    monkeypatch.setattr(readers, "iter_tar", lambda *a: pytest.fail("a shard was read through"))
    got = np.stack(list(iter_class(root, manifest, "train", 1, only={0, 3, 4})))
    np.testing.assert_array_equal(got, x[1::3][[0, 3, 4]])


def test_shards_without_an_index_are_indexed_from_their_tar_headers(dataset):
    """Datasets written before indexes existed: the same images, and nothing is written into the dataset."""
    root, x = dataset
    for idx in root.rglob("*.idx"):
        idx.unlink()
    got = np.stack(list(iter_class(root, Manifest.load(root), "train", 2, only={1, 4})))
    np.testing.assert_array_equal(got, x[2::3][[1, 4]])
    assert not list(root.rglob("*.idx"))


@pytest.mark.parametrize("damage,problem", [
    # the shard was replaced after its index was written
    ("rewrite", "the index is of a 10240-byte shard, the shard has 51200 bytes"),
    ("shift", "no member '00000_00000000.png'"),  # same size, the entry points elsewhere
    ("beyond", "'00000_00000000.png' at 1001536\\+120 lies outside the 10240-byte file"),  # never past the end
])
def test_an_index_that_does_not_fit_its_shard_is_a_clear_error(dataset, damage, problem):
    root, x = dataset
    shard = root / "train" / "00000-0000.tar"
    idx = root / "train" / "00000-0000.tar.idx"
    raw = json.loads(idx.read_text())
    if damage == "rewrite":
        rewrite_shard(shard, [{"__key__": f"k{i}", "png": x[i], "cls": b"0"} for i in range(10)])  # > 10 KiB
    else:
        raw["samples"][0][2] += 2048 if damage == "shift" else 10**6  # 2048: the next sample's image
        idx.write_text(json.dumps(raw))
    with pytest.raises(StampError, match=f"{idx} does not fit {shard} \\({problem}.*delete {idx}"):
        list(iter_class(root, Manifest.load(root), "train", 0, only={0}))
