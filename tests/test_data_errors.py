"""Bad input to `stamp data convert` / `stamp data info`: a non-zero exit, an error naming the file and
the problem, and nothing partial left behind (no output directory, no temporary sibling)."""

import io
import json
import os
import pickle

import numpy as np
import pytest
import scipy.io
import webdataset as wds
from PIL import Image
from test_data_convert import pixels, write_cifar10, write_image_folder, write_svhn, write_tar

from stamp_dist.cli import main
from stamp_dist.data.convert import convert
from stamp_dist.errors import StampError


def fails(capsys, *argv):
    """Run the CLI, expect exit 2 and return the error text (after any progress bar output)."""
    capsys.readouterr()
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert "\nerror: " in "\n" + err
    return err.rsplit("error: ", 1)[1]


def convert_fails(tmp_path, capsys, kind, src, *extra):
    """Convert into tmp_path/out, expect failure, and check that only the source remains."""
    before = sorted(p.name for p in tmp_path.iterdir())
    err = fails(capsys, "data", "convert", "--from", kind, src, tmp_path / "out", *extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no .out.tmp-*
    return err


def png_folder(root, n=4):
    write_image_folder(root, pixels(n), np.arange(n) % 2, ["a", "b"])


def test_source_missing(tmp_path, capsys):
    err = convert_fails(tmp_path, capsys, "imagefolder", tmp_path / "nope")
    assert "nope" in err and "not found" in err


def test_output_exists_is_left_alone(tmp_path, capsys):
    png_folder(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = fails(capsys, "data", "convert", "--from", "imagefolder", tmp_path / "src", tmp_path / "out")
    assert "already exists" in err and (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name,data", [("bad.png", b"not a png at all"), ("cut.jpg", None)])
def test_unreadable_image_in_folder(tmp_path, capsys, name, data):
    png_folder(tmp_path / "src")
    if data is None:  # a JPEG cut in half
        buf = io.BytesIO()
        Image.fromarray(pixels(1, 64)[0]).save(buf, format="JPEG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    (tmp_path / "src" / "b" / name).write_bytes(data)
    err = convert_fails(tmp_path, capsys, "imagefolder", tmp_path / "src")
    assert name in err and "cannot read image" in err


def test_truncated_source_tar(tmp_path, capsys):
    write_tar(tmp_path / "src" / "a.tar", zip(pixels(6), [0, 1] * 3))
    tar = tmp_path / "src" / "a.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    err = convert_fails(tmp_path, capsys, "wds", tmp_path / "src")
    assert "a.tar" in err and "truncated or corrupt" in err


def test_wds_label_outside_classes_txt(tmp_path, capsys):
    write_tar(tmp_path / "src" / "a.tar", zip(pixels(3), [0, 7, 1]))
    (tmp_path / "src" / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    err = convert_fails(tmp_path, capsys, "wds", tmp_path / "src")
    assert "a.tar" in err and "s00001" in err and "label 7" in err and "classes.txt lists 5 classes" in err


def test_wds_labels_with_a_gap_and_no_names(tmp_path, capsys):
    write_tar(tmp_path / "src" / "a.tar", zip(pixels(3), [0, 2, 2]))
    err = convert_fails(tmp_path, capsys, "wds", tmp_path / "src")
    assert "0..C-1" in err and "[1]" in err


def test_empty_source(tmp_path, capsys):
    write_tar(tmp_path / "src" / "a.tar", [])
    err = convert_fails(tmp_path, capsys, "wds", tmp_path / "src")
    assert "src" in err and "no images" in err


def test_wds_sample_without_label(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    with wds.TarWriter(str(tmp_path / "src" / "a.tar")) as sink:
        sink.write({"__key__": "k", "png": pixels(1)[0]})
    err = convert_fails(tmp_path, capsys, "wds", tmp_path / "src")
    assert "a.tar" in err and "'k'" in err and ".cls" in err


@pytest.mark.parametrize("kind,make,guess", [
    ("cifar10", lambda p: png_folder(p), "imagefolder"),
    ("imagefolder", lambda p: write_cifar10(p, pixels(5, 32), np.zeros(5, int), pixels(1, 32), np.zeros(1, int),
                                            ["x"]), "cifar10"),
    ("svhn", lambda p: (p.mkdir(), np.savez(p / "train.npz", x=pixels(2), y=[0, 1])), "numpy"),
    ("numpy", lambda p: (p.mkdir(), write_svhn(p / "train_32x32.mat", pixels(2, 32), np.array([1, 2]))), "svhn"),
    ("wds", lambda p: png_folder(p), "imagefolder"),
])
def test_wrong_from(tmp_path, capsys, kind, make, guess):
    make(tmp_path / "src")
    err = convert_fails(tmp_path, capsys, kind, tmp_path / "src")
    assert "src" in err and f"looks like --from {guess}" in err


def test_wrong_from_file(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=pixels(2), y=[0, 1])
    err = convert_fails(tmp_path, capsys, "svhn", tmp_path / "d.npz")
    assert "d.npz" in err and "not a .mat file" in err and "--from numpy" in err


def test_mixed_sizes_need_image_size(tmp_path, capsys):
    for name, size in (("a", 8), ("b", 10)):
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.fromarray(pixels(1, size)[0]).save(tmp_path / "src" / name / "x.png")
    err = convert_fails(tmp_path, capsys, "imagefolder", tmp_path / "src")
    assert "x.png" in err and "10×10" in err and "--image-size" in err


def test_non_square_needs_image_size(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4, 6, 3), np.uint8), y=[0, 1])
    err = convert_fails(tmp_path, capsys, "numpy", tmp_path / "d.npz")
    assert "d.npz" in err and "not square" in err and "--image-size" in err


def test_corrupt_cifar_pickle(tmp_path, capsys):
    write_cifar10(tmp_path / "src", pixels(5, 32), np.zeros(5, int), pixels(1, 32), np.zeros(1, int), ["x"])
    (tmp_path / "src" / "data_batch_3").write_bytes(b"\x80\x02}q\x00(garbage")
    err = convert_fails(tmp_path, capsys, "cifar10", tmp_path / "src")
    assert "data_batch_3" in err and "re-extract" in err


def test_cifar_pickle_with_code_is_refused(tmp_path, capsys):
    write_cifar10(tmp_path / "src", pixels(5, 32), np.zeros(5, int), pixels(1, 32), np.zeros(1, int), ["x"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "src" / "batches.meta").write_bytes(pickle.dumps({b"label_names": Evil()}))
    err = convert_fails(tmp_path, capsys, "cifar10", tmp_path / "src")
    assert "batches.meta" in err and "refusing" in err and not (tmp_path / "pwned").exists()


def test_svhn_bad_labels(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    scipy.io.savemat(tmp_path / "src" / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[0], [11]]})
    err = convert_fails(tmp_path, capsys, "svhn", tmp_path / "src")
    assert "train_32x32.mat" in err and "1..10" in err


def test_npz_problems(tmp_path, capsys):
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4, 3), np.float32), y=[0, 1])
    assert "uint8" in convert_fails(tmp_path, capsys, "numpy", tmp_path / "float.npz")
    np.savez(tmp_path / "nox.npz", images=pixels(2), y=[0, 1])
    assert "nox.npz" in convert_fails(tmp_path, capsys, "numpy", tmp_path / "nox.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    assert "junk.npz" in convert_fails(tmp_path, capsys, "numpy", tmp_path / "junk.npz")
    np.savez(tmp_path / "lab.npz", x=pixels(2), y=[0, 4], class_names=np.array(["a", "b"]))
    err = convert_fails(tmp_path, capsys, "numpy", tmp_path / "lab.npz")
    assert "lab.npz (image 1)" in err and "label 4" in err


def test_image_folder_val_class_not_in_train(tmp_path, capsys):
    png_folder(tmp_path / "src" / "train")
    png_folder(tmp_path / "src" / "val")
    (tmp_path / "src" / "val" / "zebra").mkdir()
    err = convert_fails(tmp_path, capsys, "imagefolder", tmp_path / "src")
    assert "zebra" in err


def test_library_error_is_stamp_error(tmp_path):
    with pytest.raises(StampError, match="not found"):
        convert("numpy", tmp_path / "missing.npz", tmp_path / "out")
    with pytest.raises(StampError, match="unknown source format"):
        convert("tiff", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------- stamp data info


def test_info_missing_manifest(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    err = fails(capsys, "data", "info", tmp_path / "ds")
    assert "manifest.json" in err and "stamp data convert" in err
    assert "not found" in fails(capsys, "data", "info", tmp_path / "absent")


@pytest.mark.parametrize("content,problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"format": "other"}), "'format'"),
    (json.dumps({"format": "stamp_dist/per-class-shards/v1", "classes": ["a"]}), "malformed"),
    (json.dumps({"format": "stamp_dist/per-class-shards/v1", "classes": ["a"], "image_size": "big",
                 "splits": {"train": {"counts": [1], "shards": [["train/00000-0000.tar"]]}}}), "image_size"),
    (json.dumps({"format": "stamp_dist/per-class-shards/v1", "classes": ["a", "b"], "image_size": 8,
                 "splits": {"train": {"counts": [1], "shards": [["x.tar"]]}}}), "split 'train'"),
])
def test_info_malformed_manifest(tmp_path, capsys, content, problem):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text(content)
    err = fails(capsys, "data", "info", tmp_path / "ds")
    assert "manifest.json" in err and problem in err


def test_info_missing_shard(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=pixels(4), y=[0, 1, 0, 1])
    assert main(["data", "convert", "--from", "numpy", str(tmp_path / "d.npz"), str(tmp_path / "out")]) == 0
    (tmp_path / "out" / "train" / "00001-0000.tar").unlink()
    err = fails(capsys, "data", "info", tmp_path / "out")
    assert "00001-0000.tar" in err and "missing" in err


def _idx_source(tmp_path, n=6, labels=None):
    from test_data_convert import write_mnist_layout

    write_mnist_layout(tmp_path / "src", pixels(n)[..., 0], np.arange(n) % 2 if labels is None else labels)
    return tmp_path / "src"


def test_idx_wrong_magic_number(tmp_path, capsys):
    src = _idx_source(tmp_path)
    import gzip

    gzip.open(src / "train-images-idx3-ubyte.gz", "wb").write(b"\x89PNG\r\n\x1a\n" + bytes(64))
    err = convert_fails(tmp_path, capsys, "idx", src)
    assert "train-images-idx3-ubyte.gz" in err and "not an IDX file" in err and "magic" in err


def test_idx_truncated_file(tmp_path, capsys):
    src = _idx_source(tmp_path)
    import gzip

    data = gzip.open(src / "train-images-idx3-ubyte.gz").read()
    gzip.open(src / "train-images-idx3-ubyte.gz", "wb").write(data[:-10])
    err = convert_fails(tmp_path, capsys, "idx", src)
    assert "train-images-idx3-ubyte.gz" in err and "truncated" in err


def test_idx_truncated_header_claiming_a_huge_array(tmp_path, capsys):
    """A 16-byte header that claims 4 × 10⁹ bytes: refused from the file's length, nothing allocated."""
    import gzip
    import struct

    src = _idx_source(tmp_path)
    gzip.open(src / "train-images-idx3-ubyte.gz", "wb").write(b"\0\0\x08\x03" + struct.pack(">3I", 1000000, 64, 64))
    err = convert_fails(tmp_path, capsys, "idx", src)
    assert "truncated" in err and "1000000×64×64" in err


def test_idx_image_label_count_mismatch(tmp_path, capsys):
    from test_data_convert import write_idx

    src = _idx_source(tmp_path)
    write_idx(src / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    err = convert_fails(tmp_path, capsys, "idx", src)
    assert "6 images" in err and "5 labels" in err


def test_idx_labels_file_given_as_images(tmp_path, capsys):
    import shutil

    src = _idx_source(tmp_path)
    shutil.copy(src / "train-labels-idx1-ubyte.gz", src / "train-images-idx3-ubyte.gz")
    err = convert_fails(tmp_path, capsys, "idx", src)
    assert "train-images-idx3-ubyte.gz" in err and "labels file" in err


def test_idx_missing_labels(tmp_path, capsys):
    src = _idx_source(tmp_path)
    (src / "train-labels-idx1-ubyte.gz").unlink()
    err = convert_fails(tmp_path, capsys, "idx", src)
    assert "train-labels-idx1-ubyte" in err
