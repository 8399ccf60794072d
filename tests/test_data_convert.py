"""`stamp data convert` round trips: each source is written by the test in its real on-disk format,
converted through the CLI and read back with ``load_split``. The writers here are reused by
test_data_errors.py."""

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import webdataset as wds
from PIL import Image

from stamp_dist.cli import main
from stamp_dist.data.readers import load_split


def pixels(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def smooth(n, size=16, seed=0):
    """Images that JPEG keeps almost intact (a colour gradient each), for approximate comparisons."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 60, size)[None, :, None, None]
    base = rng.integers(20, 130, (n, 1, 1, 3))  # + ramps stays within 0..255
    return (base + ramp + ramp.transpose(0, 2, 1, 3)).astype(np.uint8)


def by_class(x, y, num_classes):
    """What load_split returns: the images grouped by class, in source order within a class."""
    y = np.asarray(y)
    return np.concatenate([x[y == c] for c in range(num_classes)]), np.sort(y, kind="stable")


def convert(kind, src, out, *extra):
    assert main(["data", "convert", "--from", kind, str(src), str(out), *extra]) == 0


def read(out, split):
    x, y, manifest = load_split(out, split)
    return x.permute(0, 2, 3, 1).numpy(), y.numpy(), manifest


def write_image_folder(root, x, y, classes, suffix=".png"):
    for i, (image, label) in enumerate(zip(x, y)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i:03d}{suffix}")


def write_cifar10(src, x_train, y_train, x_test, y_test, names):
    """The python-pickle layout of cifar-10-batches-py: 5 train batches, test_batch, batches.meta."""
    src.mkdir()

    def dump(name, d):
        with open(src / name, "wb") as f:
            pickle.dump(d, f, protocol=2)

    flat = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # rows are RRR…GGG…BBB…
    for b, idx in enumerate(np.array_split(np.arange(len(x_train)), 5), start=1):
        dump(f"data_batch_{b}", {b"batch_label": b"training batch", b"labels": y_train[idx].tolist(),
                                 b"data": flat(x_train[idx]), b"filenames": [b"f.png"] * len(idx)})
    dump("test_batch", {b"labels": y_test.tolist(), b"data": flat(x_test)})
    dump("batches.meta", {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10})


def write_cifar100(src, x_train, y_train, x_test, y_test, names):
    src.mkdir()
    flat = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        with open(src / name, "wb") as f:
            pickle.dump({b"fine_labels": y.tolist(), b"coarse_labels": [0] * len(y), b"data": flat(x)}, f)
    with open(src / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"all"]}, f)


def write_svhn(path, x, digits):
    """SVHN's .mat layout: X is 32×32×3×N, y is N×1 with 10 standing for digit 0."""
    y = np.where(digits == 0, 10, digits)[:, None].astype(np.uint8)
    scipy.io.savemat(path, {"X": x.transpose(1, 2, 3, 0), "y": y})


def write_tar(path, samples, fmt="png"):
    """Class-mixed WebDataset shard: samples are (image, label) pairs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i, (image, label) in enumerate(samples):
            sink.write({"__key__": f"s{i:05d}", fmt: image, "cls": label})


def test_imagefolder_png_round_trip(tmp_path, capsys):
    x, y, classes = pixels(9), np.array([2, 0, 1, 0, 2, 1, 1, 0, 2]), ["cat", "dog", "eel"]
    write_image_folder(tmp_path / "src", x, y, classes)
    convert("imagefolder", tmp_path / "src", tmp_path / "out")
    assert "3 classes" in capsys.readouterr().out
    got_x, got_y, manifest = read(tmp_path / "out", "train")
    exp_x, exp_y = by_class(x, y, 3)
    assert manifest.classes == classes and list(manifest.splits) == ["train"]
    assert manifest.image_size == 8 and manifest.source.startswith("imagefolder:")
    np.testing.assert_array_equal(got_y, exp_y)
    np.testing.assert_array_equal(got_x, exp_x)


def test_imagefolder_jpeg_splits(tmp_path):
    x, y, classes = smooth(8), np.array([0, 1] * 4), ["a", "b"]
    write_image_folder(tmp_path / "src" / "train", x[:6], y[:6], classes, ".jpg")
    write_image_folder(tmp_path / "src" / "val", x[6:], y[6:], classes, ".JPEG")
    convert("imagefolder", tmp_path / "src", tmp_path / "out")
    for split, sl in (("train", slice(0, 6)), ("test", slice(6, 8))):
        got_x, got_y, manifest = read(tmp_path / "out", split)
        exp_x, exp_y = by_class(x[sl], y[sl], 2)
        assert got_x.shape == exp_x.shape == (len(exp_y), 16, 16, 3)
        np.testing.assert_array_equal(got_y, exp_y)
        assert np.abs(got_x.astype(int) - exp_x).mean() < 4  # JPEG is lossy
    assert list(manifest.splits) == ["train", "test"]


def test_cifar10_round_trip(tmp_path):
    names = [f"c{i}" for i in range(10)]
    x_tr, y_tr = pixels(20, 32, seed=1), np.arange(20) % 10
    x_te, y_te = pixels(7, 32, seed=2), np.array([3, 3, 1, 0, 9, 9, 9])
    write_cifar10(tmp_path / "cifar-10-batches-py", x_tr, y_tr, x_te, y_te, names)
    convert("cifar10", tmp_path, tmp_path / "out")  # the archive's parent folder is accepted too
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        got_x, got_y, manifest = read(tmp_path / "out", split)
        exp_x, exp_y = by_class(x, y, 10)
        np.testing.assert_array_equal(got_y, exp_y)
        np.testing.assert_array_equal(got_x, exp_x)
    assert manifest.classes == names and manifest.image_size == 32
    assert manifest.splits["test"].counts == [1, 1, 0, 2, 0, 0, 0, 0, 0, 3]


def test_cifar100_round_trip(tmp_path):
    names = ["apple", "bee", "cloud", "dolphin"]
    x_tr, y_tr, x_te, y_te = pixels(8, 32, 3), np.array([3, 2, 1, 0] * 2), pixels(4, 32, 4), np.array([0, 1, 2, 3])
    write_cifar100(tmp_path / "src", x_tr, y_tr, x_te, y_te, names)
    convert("cifar100", tmp_path / "src", tmp_path / "out")
    got_x, got_y, manifest = read(tmp_path / "out", "test")
    np.testing.assert_array_equal(got_x, by_class(x_te, y_te, 4)[0])
    got_x, got_y, manifest = read(tmp_path / "out", "train")
    exp_x, exp_y = by_class(x_tr, y_tr, 4)
    np.testing.assert_array_equal(got_x, exp_x)
    np.testing.assert_array_equal(got_y, exp_y)
    assert manifest.classes == names


def test_svhn_round_trip(tmp_path):
    x_tr, d_tr = pixels(12, 32, 5), np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0])
    x_te, d_te = pixels(3, 32, 6), np.array([0, 5, 9])
    (tmp_path / "src").mkdir()
    write_svhn(tmp_path / "src" / "train_32x32.mat", x_tr, d_tr)
    write_svhn(tmp_path / "src" / "test_32x32.mat", x_te, d_te)
    convert("svhn", tmp_path / "src", tmp_path / "out")
    got_x, got_y, manifest = read(tmp_path / "out", "train")
    exp_x, exp_y = by_class(x_tr, d_tr, 10)
    np.testing.assert_array_equal(got_x, exp_x)
    np.testing.assert_array_equal(got_y, exp_y)  # digit 0 (stored as 10) is class "0"
    assert manifest.classes == [str(i) for i in range(10)] and manifest.splits["train"].counts[0] == 3
    assert manifest.splits["test"].counts == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    convert("svhn", tmp_path / "src" / "test_32x32.mat", tmp_path / "one")  # a single .mat file
    assert list(read(tmp_path / "one", "test")[2].splits) == ["test"]


def test_numpy_round_trip_grayscale_and_split_dir(tmp_path):
    x = np.random.default_rng(7).integers(0, 256, (10, 6, 6), dtype=np.uint8)  # N×H×W: grayscale
    y = np.array([1, 0] * 5)
    (tmp_path / "src").mkdir()
    np.savez(tmp_path / "src" / "train.npz", x=x[:8], y=y[:8], class_names=np.array(["zero", "one"]))
    np.savez(tmp_path / "src" / "test.npz", x=x[8:], y=y[8:])
    convert("numpy", tmp_path / "src", tmp_path / "out")
    got_x, got_y, manifest = read(tmp_path / "out", "train")
    exp_x, exp_y = by_class(x[:8], y[:8], 2)
    np.testing.assert_array_equal(got_x, np.repeat(exp_x[..., None], 3, axis=3))
    np.testing.assert_array_equal(got_y, exp_y)
    assert manifest.classes == ["zero", "one"] and manifest.splits["test"].counts == [1, 1]


def test_numpy_single_file_without_names(tmp_path):
    x, y = pixels(6, 5), np.array([2, 1, 0, 2, 1, 0])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    convert("numpy", tmp_path / "d.npz", tmp_path / "out", "--shard-size", "1")
    got_x, got_y, manifest = read(tmp_path / "out", "train")
    np.testing.assert_array_equal(got_x, by_class(x, y, 3)[0])
    assert manifest.classes == ["0", "1", "2"] and manifest.splits["train"].shards[0] == [
        "train/00000-0000.tar", "train/00000-0001.tar"]


def test_wds_round_trip_with_classes_txt_and_splits(tmp_path):
    x, y = pixels(10, seed=8), np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 0])
    src = tmp_path / "src"
    write_tar(src / "train" / "mixed-000.tar", zip(x[:4], y[:4]))
    write_tar(src / "train" / "mixed-001.tar", zip(x[4:8], y[4:8]))
    write_tar(src / "test" / "mixed-000.tar", zip(x[8:], y[8:]))
    (src / "classes.txt").write_text("ant\nbat\ncow\n")
    convert("wds", src, tmp_path / "out")
    got_x, got_y, manifest = read(tmp_path / "out", "train")
    exp_x, exp_y = by_class(x[:8], y[:8], 3)
    np.testing.assert_array_equal(got_x, exp_x)
    np.testing.assert_array_equal(got_y, exp_y)
    assert manifest.classes == ["ant", "bat", "cow"] and manifest.splits["test"].counts == [2, 0, 0]


def test_wds_jpeg_single_tar_names_from_labels(tmp_path):
    x, y = smooth(4, seed=9), [1, 0, 1, 0]
    write_tar(tmp_path / "all.tar", zip(x, y), fmt="jpg")
    convert("wds", tmp_path / "all.tar", tmp_path / "out")
    got_x, got_y, manifest = read(tmp_path / "out", "train")
    exp_x, exp_y = by_class(x, y, 2)
    assert manifest.classes == ["0", "1"] and got_x.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(got_y, exp_y)
    assert np.abs(got_x.astype(int) - exp_x).mean() < 4


def test_image_size_resizes(tmp_path):
    x, y = pixels(4, 8), np.array([0, 1, 0, 1])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    convert("numpy", tmp_path / "d.npz", tmp_path / "out", "--image-size", "4")
    got_x, _, manifest = read(tmp_path / "out", "train")
    assert manifest.image_size == 4 and got_x.shape == (4, 4, 4, 3)
    expect = np.asarray(Image.fromarray(x[0]).resize((4, 4), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got_x[0], expect)


def test_image_size_unifies_mixed_sizes(tmp_path):
    src = tmp_path / "src"
    for name, size in (("a", 8), ("b", 12)):
        (src / name).mkdir(parents=True)
        Image.fromarray(pixels(1, size)[0]).save(src / name / "x.png")
    convert("imagefolder", src, tmp_path / "out", "--image-size", "6")
    x, y, manifest = read(tmp_path / "out", "train")
    assert x.shape == (2, 6, 6, 3) and manifest.image_size == 6


def test_image_size_keeps_the_aspect_ratio_and_crops_the_centre(tmp_path):
    """Resize + centre crop (torchvision's ImageNet preprocessing), not a squash: a 64×32 image whose centre
    square is red and whose sides are blue converts to an all-red 16×16 one."""
    img = np.zeros((32, 64, 3), dtype=np.uint8)
    img[:, :, 2] = 255
    img[:, 16:48] = (255, 0, 0)
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "src" / "a" / "wide.png")
    convert("imagefolder", tmp_path / "src", tmp_path / "out", "--image-size", "16")
    x, _, _ = read(tmp_path / "out", "train")
    assert x.shape == (1, 16, 16, 3)
    assert (x[0, :, :, 0] >= 200).all() and (x[0, :, :, 2] <= 60).all()  # bicubic rings a little at the crop edge


def test_data_info_fields(tmp_path, capsys):
    x, y = pixels(14, 4), np.arange(14) % 7
    np.savez(tmp_path / "d.npz", x=x, y=y, class_names=np.array([f"class{i}" for i in range(7)]))
    convert("numpy", tmp_path / "d.npz", tmp_path / "out", "--shard-size", "1")
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "7: class0, class1, class2, class3, class4, … (+2 more)" in out
    assert "4×4" in out and "numpy:" in out and "mean" in out and "std" in out
    row = next(line for line in out.splitlines() if line.startswith("train")).split()
    assert row == ["train", "14", "2", "2", "14"]  # images, min/class, max/class, shards
    mean = x.reshape(-1, 3).mean(0) / 255
    assert f"{mean[0]:.4f}" in out


def write_idx(path, array, gz=True):
    """An IDX file as MNIST ships it: magic 00 00 08 <ndim>, big-endian uint32 dims, then the bytes."""
    import gzip
    import struct

    data = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def write_mnist_layout(src, x_train, y_train, x_test=None, y_test=None, gz=True):
    src.mkdir()
    suffix = ".gz" if gz else ""
    write_idx(src / f"train-images-idx3-ubyte{suffix}", x_train, gz)
    write_idx(src / f"train-labels-idx1-ubyte{suffix}", y_train.astype(np.uint8), gz)
    if x_test is not None:
        write_idx(src / f"t10k-images-idx3-ubyte{suffix}", x_test, gz)
        write_idx(src / f"t10k-labels-idx1-ubyte{suffix}", y_test.astype(np.uint8), gz)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    x, tx = rng.integers(0, 256, (12, 6, 6), dtype=np.uint8), rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
    y, ty = np.arange(12) % 3, np.array([2, 0, 1, 1])
    write_mnist_layout(tmp_path / "src", x, y, tx, ty, gz=gz)
    (tmp_path / "src" / "classes.txt").write_text("a\nb\nc\n")
    convert("idx", tmp_path / "src", tmp_path / "out")
    for split, (xs, ys) in {"train": (x, y), "test": (tx, ty)}.items():
        got, labels, manifest = read(tmp_path / "out", split)
        want, want_labels = by_class(np.repeat(xs[..., None], 3, axis=3), ys, 3)  # grayscale → RGB
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(labels, want_labels)
    assert manifest.classes == ["a", "b", "c"]


def test_fashion_mnist_package_converts(tmp_path):
    """Debian's dataset-fashion-mnist (where installed): 60,000 + 10,000 images, 10 classes."""
    from stamp_dist.config import DataConfig
    from stamp_dist.data.convert import has_idx, read_idx

    FASHION_MNIST = Path(DataConfig.fashion_mnist)
    if not has_idx(FASHION_MNIST):
        pytest.skip(f"{FASHION_MNIST} not installed (apt-get install dataset-fashion-mnist)")
    labels = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    assert read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz").shape == (60000, 28, 28)


def test_imagefolder_includes_images_in_nested_folders(tmp_path):
    """Defect 12 of issue 15: images in sub-folders of a class folder were silently skipped (2 of 4 in the
    probe). They are included, as torchvision's ImageFolder reads them; hidden files and folders are not."""
    x = pixels(5)
    for i, rel in enumerate(["a/0.png", "a/sub/1.png", "a/sub/deeper/2.png", "b/3.png", "b/more/4.png"]):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(tmp_path / "src" / rel)
    (tmp_path / "src" / "a" / ".cache").mkdir()
    Image.fromarray(x[0]).save(tmp_path / "src" / "a" / ".cache" / "thumb.png")
    convert("imagefolder", tmp_path / "src", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == ["a", "b"] and manifest["splits"]["train"]["counts"] == [3, 2]


def torchvision_eval(path, size, resize):
    """torchvision's Resize(resize) + CenterCrop(size) on a PIL image, from its documented arithmetic."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    long = int(resize * max(w, h) / min(w, h))
    tw, th = (resize, long) if w <= h else (long, resize)
    img = img.resize((tw, th), Image.Resampling.BILINEAR)
    left, top = int(round((tw - size) / 2)), int(round((th - size) / 2))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def test_jpegs_are_kept_as_they_came_and_cropped_when_read(tmp_path):
    """Issue 13: a JPEG's own bytes go into the shard (no re-encode, no resize); reading resizes the shorter side
    to round(16 / 0.875) = 18 and crops the centre 16×16 (torchvision's ImageNet eval transform)."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 24), (20, 30), (16, 16)]):
        folder = tmp_path / "src" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    convert("imagefolder", tmp_path / "src", tmp_path / "out", "--image-size", "16")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"].endswith("/v2") and manifest["resize"] == 18 and manifest["image_size"] == 16
    with tarfile.open(tmp_path / "out" / "train" / "00000-0000.tar") as tar:
        stored = tar.extractfile("00000_00000000.jpg").read()
    assert stored == (tmp_path / "src" / "c0" / "0.jpg").read_bytes()
    got, _, _ = read(tmp_path / "out", "train")
    sources = [tmp_path / "src" / "c0" / "0.jpg", tmp_path / "src" / "c0" / "2.jpg", tmp_path / "src" / "c1" / "1.jpg"]
    for image, path in zip(got, sources):
        expect = torchvision_eval(path, 16, 18) if path.name != "2.jpg" else np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(image, expect)  # a 16×16 image is taken as it is


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    """Image.draft: a 400×320 JPEG read at 16 px decodes at 1/8 scale (50×40 ≥ the resized 22×18), close to
    the full decode's pixels."""
    from PIL import JpegImagePlugin

    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(smooth(1, 400)[0][:320]).save(tmp_path / "src" / "a" / "big.jpg", quality=95)
    convert("imagefolder", tmp_path / "src", tmp_path / "out", "--image-size", "16")
    decoded, real = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda im, mode, size: decoded.append(real(im, mode, size)) or decoded[-1])
    got, _, _ = read(tmp_path / "out", "train")
    assert decoded and decoded[0][1] == (0, 0, 50, 40)  # the scale PIL chose: 1/8
    assert np.abs(got[0].astype(int) - torchvision_eval(tmp_path / "src" / "a" / "big.jpg", 16, 18)).mean() < 3


def test_non_jpeg_datasets_keep_format_v1(tmp_path):
    """PNG and array sources are resized at convert time as before and stay v1, byte for byte the manifest an
    earlier version wrote (no 'resize' key): the demo's data, and the pretraining run keys hashing it, are unchanged."""
    write_image_folder(tmp_path / "src", pixels(4, 8), np.array([0, 1, 0, 1]), ["a", "b"])
    convert("imagefolder", tmp_path / "src", tmp_path / "out", "--image-size", "4")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "stamp_dist/per-class-shards/v1" and "resize" not in manifest
