"""Converters from existing datasets to the per-class shard format, and ``describe`` for ``stamp data info``.

Each source reader checks the layout and returns a ``Source``: the class names (when the source has
them) and a lazy stream of ``Item``s. One loop (``convert``) feeds every source through
``PerClassShardWriter`` inside ``atomic_dir``, so a failure at any image leaves no output behind.
Image-by-image sources (folders, tar shards) stream and never hold the dataset in memory; array
sources (CIFAR, SVHN, npz) are small and are loaded whole, one file at a time.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import scipy.io
from PIL import Image

from ..atomic import atomic_dir, check_writable
from ..errors import StampError
from ..progress import progress
from .manifest import Manifest
from .readers import IMAGE_EXTS, decode_image, iter_tar, parse_label
from .shards import Jpeg, PerClassShardWriter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
JPEG_MAGIC = b"\xff\xd8\xff"  # every JPEG starts with SOI + a marker

# What each --from expects; quoted in errors so the user sees the layout they need.
LAYOUTS = {
    "imagefolder": "an image folder (SRC/<class>/*.jpg|png, or SRC/train/<class>/ with SRC/val|test/<class>/)",
    "cifar10": "a CIFAR-10 python directory (data_batch_1..5, test_batch, batches.meta)",
    "cifar100": "a CIFAR-100 python directory (train, test, meta)",
    "svhn": "SVHN .mat data (a directory with train_32x32.mat [+ test_32x32.mat], or one .mat file)",
    "numpy": "numpy arrays (an .npz with x and y [+ class_names], or a directory with train.npz [+ test.npz])",
    "wds": "class-mixed WebDataset shards (a directory of .tar files with {key}.jpg|png + {key}.cls, or one .tar)",
    "idx": "IDX (MNIST-format) files: a directory with train-images-idx3-ubyte + train-labels-idx1-ubyte "
           "[+ t10k-images-idx3-ubyte + t10k-labels-idx1-ubyte], each optionally .gz, [+ classes.txt]",
}


class Item(NamedTuple):
    split: str
    label: int
    image: object  # PIL image, HWC / HW uint8 array, or a JPEG's bytes (``Jpeg``, stored as they are)
    origin: str  # where the image came from, for error messages


@dataclass
class Source:
    classes: list[str] | None  # None: labels are 0..C-1, named "0".."C-1" once all are seen
    items: Iterable[Item]
    total: int | None = None  # images, for the progress bar (None: unknown without a second pass)


# ---------------------------------------------------------------------------------------------- helpers


def _guess_kind(src: Path) -> str | None:
    """The --from that ``src`` looks like, to point the user at it when the given one does not fit."""
    if src.is_file():
        return {".mat": "svhn", ".npz": "numpy", ".tar": "wds"}.get(src.suffix.lower())
    names = {p.name for p in src.iterdir()}
    train = src / "train"
    if names & {"data_batch_1", "cifar-10-batches-py"}:
        return "cifar10"
    if "cifar-100-python" in names or (train.is_file() and "meta" in names):
        return "cifar100"
    if any("-ubyte" in n for n in names):
        return "idx"
    files = names | ({p.name for p in train.iterdir()} if train.is_dir() else set())
    for suffix, kind in ((".mat", "svhn"), (".npz", "numpy"), (".tar", "wds")):
        if any(n.endswith(suffix) for n in files):
            return kind
    if _subdirs(train if train.is_dir() else src):
        return "imagefolder"
    return None


def _mismatch(kind: str, src: Path, problem: str) -> StampError:
    guess = _guess_kind(src)
    hint = f"; it looks like --from {guess}" if guess not in (None, kind) else ""
    return StampError(f"{src} is not {LAYOUTS[kind]}: {problem}{hint}")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dirs(src: Path) -> dict[str, Path]:
    """``SRC/train`` + ``SRC/test`` (or ``val``) when SRC has a train/ folder, else SRC is the train split."""
    if not (src / "train").is_dir():
        return {"train": src}
    tests = [src / n for n in ("test", "val") if (src / n).is_dir()]
    if len(tests) > 1:
        raise StampError(f"{src} has both test/ and val/; keep one (it becomes the 'test' split)")
    return {"train": src / "train", **({"test": tests[0]} if tests else {})}


def _check_names(names: list[str], origin: Path) -> list[str]:
    if not names or len(set(names)) != len(names) or not all(names):
        raise StampError(f"{origin}: class names must be a non-empty list of distinct, non-empty names")
    return names


def _check_arrays(x, y, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One file's images (N×H×W[×C] uint8) and labels (N integers), checked before anything is written."""
    x, y = np.asarray(x), np.asarray(y).reshape(-1)
    if x.dtype != np.uint8:
        raise StampError(f"{path}: images have dtype {x.dtype}; store them as uint8 (0..255)")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise StampError(f"{path}: images have shape {x.shape}; expected N×H×W×3, N×H×W×1 or N×H×W")
    if not np.issubdtype(y.dtype, np.integer):
        raise StampError(f"{path}: labels have dtype {y.dtype}; expected integers")
    if len(x) != len(y):
        raise StampError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _array_source(classes: list[str] | None, parts: list[tuple[str, np.ndarray, np.ndarray, Path]]) -> Source:
    """A source over in-memory ``(split, images, labels, file)`` parts; labels are checked before any is written."""
    total = sum(len(y) for _, _, y, _ in parts)
    # Without names, labels are 0..C-1 with C <= the number of images (every class has one).
    limit = len(classes) if classes is not None else total
    for _, _, y, path in parts:
        bad = np.flatnonzero((y < 0) | (y >= limit))
        if len(bad):
            i = int(bad[0])
            raise StampError(f"{path} (image {i}): label {y[i]} is outside 0..{limit - 1} "
                             + (f"(the {len(classes)} class names)" if classes is not None else
                                f"(labels are 0..C-1 and the {total} images cannot hold more classes)")
                             + "; fix the labels")
    items = (
        Item(split, int(label), image, f"{path} (image {i})")
        for split, x, y, path in parts
        for i, (image, label) in enumerate(zip(x, y))
    )
    return Source(classes, items, total)


# ---------------------------------------------------------------------------------------------- sources


def _read_image(path: Path) -> Image.Image | Jpeg:
    """A JPEG file (by its content, whatever its suffix) as its bytes, which the writer keeps; other images
    decoded (converted to RGB, so truncated files fail here; a broken JPEG fails in the writer's decode)."""
    try:
        data = path.read_bytes()
        if data.startswith(JPEG_MAGIC):
            return Jpeg(data)
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise StampError(f"{path}: cannot read image ({e}); remove or replace the file") from None


def _image_files(folder: Path) -> list[Path]:
    """A class folder's images, nested sub-folders included (as torchvision's ImageFolder reads them, so a
    tree that trains there converts whole); hidden files and folders are skipped."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _imagefolder(src: Path) -> Source:
    if not src.is_dir():
        raise _mismatch("imagefolder", src, "it is a file")
    splits = _split_dirs(src)
    classes = [d.name for d in _subdirs(splits["train"])]
    if not classes:
        raise _mismatch("imagefolder", src, f"{splits['train']} has no class folders")
    folders = []
    for split, root in splits.items():
        for d in _subdirs(root):
            if d.name not in classes:
                raise StampError(f"{d}: class '{d.name}' has no folder in {splits['train']}; "
                                 f"every {split} class must also be a train class")
            folders.append((split, classes.index(d.name), d))
    # Count first (directory listings only) for the progress bar's total; the paths of one class at a
    # time are listed again while converting, so millions of paths are never held at once.
    total = 0
    for split, _, d in folders:
        n = len(_image_files(d))
        if n == 0 and split == "train":
            raise StampError(f"{d}: class folder has no images ({', '.join(IMAGE_SUFFIXES)}); add some or remove it")
        total += n
    items = (Item(split, label, _read_image(p), str(p)) for split, label, d in folders for p in _image_files(d))
    return Source(classes, items, total)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what they contain (dicts, lists, bytes, numpy arrays), never code."""

    # numpy's array reconstructors (numpy.core in 1.x, numpy._core in 2.x); _codecs.encode is how
    # Python 3 writes bytes into protocol-2 pickles.
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module.replace("numpy._core", "numpy.core"), name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}, which CIFAR files do not contain")
        return super().find_class(module, name)


def _unpickle(path: Path, keys: tuple[bytes, ...]) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a damaged pickle can fail with almost any exception type
        raise StampError(f"{path}: cannot read CIFAR file ({type(e).__name__}: {e}); re-extract the archive") from None
    missing = [k.decode() for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise StampError(f"{path}: not a CIFAR python file (no {', '.join(missing)}); re-extract the archive")
    return d


@dataclass(frozen=True)
class _CifarLayout:
    folder: str  # the archive's top folder, accepted as SRC's child
    train: tuple[str, ...]
    test: str
    meta: str
    labels: bytes
    names: bytes


CIFAR = {
    "cifar10": _CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                            "batches.meta", b"labels", b"label_names"),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names"),
}


def _cifar(kind: str, src: Path) -> Source:
    layout = CIFAR[kind]
    if not src.is_dir():
        raise _mismatch(kind, src, "it is a file")
    if (src / layout.folder).is_dir():
        src = src / layout.folder
    files = [*layout.train, layout.test, layout.meta]
    missing = [n for n in files if not (src / n).is_file()]
    if missing:
        raise _mismatch(kind, src, f"missing {', '.join(missing)}")
    names = [n.decode() for n in _unpickle(src / layout.meta, (layout.names,))[layout.names]]
    parts = []
    for split, name in [("train", n) for n in layout.train] + [("test", layout.test)]:
        d = _unpickle(src / name, (b"data", layout.labels))
        data = np.asarray(d[b"data"])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise StampError(f"{src / name}: 'data' has shape {data.shape}, expected N×3072")
        x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are channel-major (RRR…GGG…BBB…)
        parts.append((split, *_check_arrays(x, d[layout.labels], src / name), src / name))
    return _array_source(_check_names(names, src / layout.meta), parts)


def _loadmat(path: Path) -> dict:
    try:
        m = scipy.io.loadmat(path)
    except NotImplementedError:  # MATLAB v7.3 files are HDF5
        raise StampError(f"{path}: MATLAB v7.3 (HDF5) .mat files are not supported; save it in v7 format") from None
    except (ValueError, OSError, TypeError, scipy.io.matlab.MatReadError) as e:
        raise StampError(f"{path}: cannot read .mat file ({e})") from None
    if "X" not in m or "y" not in m:
        raise StampError(f"{path}: no 'X' and 'y' arrays; expected SVHN's layout (X: 32×32×3×N, y: N×1 in 1..10)")
    return m


def _svhn(src: Path) -> Source:
    if src.is_file():
        if src.suffix.lower() != ".mat":
            raise _mismatch("svhn", src, "not a .mat file")
        files = {"test" if src.name.startswith("test") else "train": src}
    else:
        files = {s: src / f"{s}_32x32.mat" for s in ("train", "test") if (src / f"{s}_32x32.mat").is_file()}
        if "train" not in files:
            raise _mismatch("svhn", src, "no train_32x32.mat")
    parts = []
    for split, path in files.items():
        m = _loadmat(path)
        x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1)
        if x.ndim != 4:
            raise StampError(f"{path}: 'X' has shape {x.shape}, expected H×W×3×N")
        if y.size and (not np.array_equal(y, np.round(y)) or y.min() < 1 or y.max() > 10):
            raise StampError(f"{path}: labels 'y' must be integers 1..10 (SVHN's 10 stands for digit 0), "
                             f"found values from {y.min()} to {y.max()}")
        y = y.astype(np.int64) % 10  # SVHN stores digit 0 as label 10
        parts.append((split, *_check_arrays(x.transpose(3, 0, 1, 2), y, path), path))
    return _array_source([str(i) for i in range(10)], parts)


# Deflate cannot expand data more than ~1032-fold: an array claiming more bytes than that is a lie.
_DEFLATE_MAX_RATIO = 1032


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_npz_member(z, key: str, path: Path) -> None:
    """The size an array of the archive claims in its header, checked against what the file can hold
    and the memory available — before numpy allocates it."""
    info = z.zip.getinfo(f"{key}.npy" if f"{key}.npy" in z.zip.namelist() else key)
    with z.zip.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    claimed = math.prod(shape) * dtype.itemsize
    stored = info.compress_size * (_DEFLATE_MAX_RATIO if info.compress_type else 1)
    if claimed > min(info.file_size, stored):
        raise StampError(f"{path}: array '{key}' claims shape {shape} ({claimed / 2**30:.1f} GiB) but the file holds "
                         f"{info.compress_size} bytes for it: the file is corrupt or crafted; re-create it")
    free = _available_memory()
    if free is not None and claimed > free:
        raise StampError(f"{path}: array '{key}' needs {claimed / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB of memory available; split the data into several files")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    fix = "save it with np.savez(path, x=uint8 images, y=int labels[, class_names=str array])"
    try:
        with open(path, "rb") as f:  # our own handle: np.load leaks its file when the zip is corrupt
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise StampError(f"{path}: holds a single array, not an .npz archive; {fix}")
            if "x" not in z or "y" not in z:
                raise StampError(f"{path}: needs arrays 'x' (images) and 'y' (labels), it has {z.files}; {fix}")
            keys = [k for k in ("x", "y", "class_names") if k in z]
            for k in keys:
                _check_npz_member(z, k, path)
            return {k: z[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # ValueError also covers object arrays (e.g. class_names of Python objects), which need pickle.
        raise StampError(f"{path}: cannot read as .npz ({type(e).__name__}: {e}); {fix}") from None


def _numpy(src: Path) -> Source:
    if src.is_file():
        if src.suffix.lower() != ".npz":
            raise _mismatch("numpy", src, "not an .npz file")
        files = {"train": src}
    else:
        files = {s: src / f"{s}.npz" for s in ("train", "test") if (src / f"{s}.npz").is_file()}
        if "train" not in files:
            raise _mismatch("numpy", src, "no train.npz")
    parts, names = [], None
    for split, path in files.items():
        z = _load_npz(path)
        if split == "train" and "class_names" in z:
            names = _check_names([str(n) for n in z["class_names"].reshape(-1)], path)
        parts.append((split, *_check_arrays(z["x"], z["y"], path), path))
    return _array_source(names, parts)


def _wds(src: Path) -> Source:
    if src.is_file():
        if src.suffix.lower() != ".tar":
            raise _mismatch("wds", src, "not a .tar file")
        tars = {"train": [src]}
    else:
        tars = {split: sorted(d.glob("*.tar")) for split, d in _split_dirs(src).items()}
        if not tars["train"]:
            raise _mismatch("wds", src, "no .tar files")
        empty = [s for s, paths in tars.items() if not paths]
        if empty:
            raise StampError(f"{src / empty[0]} has no .tar files; add its shards or remove the folder")
    classes = None
    names_file = src / "classes.txt"
    if names_file.is_file():
        lines = names_file.read_text().splitlines()
        classes = _check_names([line.strip() for line in lines if line.strip()], names_file)

    def items() -> Iterator[Item]:
        for split, paths in tars.items():
            for path in paths:
                for key, sample in iter_tar(path):
                    label = parse_label(key, sample, str(path))
                    if classes is not None and not 0 <= label < len(classes):
                        raise StampError(f"{path}: sample '{key}' has label {label}, but {names_file} lists "
                                         f"{len(classes)} classes (labels 0..{len(classes) - 1}); fix the label "
                                         "or add the missing class names")
                    ext = next((e for e in IMAGE_EXTS if e in sample), None)
                    image = (Jpeg(sample[ext]) if ext in ("jpg", "jpeg") and sample[ext].startswith(JPEG_MAGIC)
                             else decode_image(key, sample, str(path)))
                    yield Item(split, label, image, f"{path}: sample '{key}'")

    return Source(classes, items())


# IDX element types (the third magic byte) → numpy dtype; multi-byte values are big-endian.
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# File names of the train/test pairs: MNIST's own (train-images-idx3-ubyte) and the dotted variant
# some mirrors use (train-images.idx3-ubyte); split → (images, labels) name stems.
IDX_FILES = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (raw or gzip) as an array, its header checked against its length before the data
    is read, so a damaged or foreign file fails with its name instead of a huge allocation."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_TYPES or not 1 <= head[3] <= 4:
                raise StampError(f"{path}: not an IDX file (magic number {head.hex() or 'missing'}; expected "
                                 "00 00 <type 08-0E> <1-4 dimensions>, e.g. 00000803 for MNIST images)")
            dtype, ndim = IDX_TYPES[head[2]], head[3]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise StampError(f"{path}: truncated IDX header; re-download or re-extract the file")
            dims = struct.unpack(f">{ndim}I", dims_raw)
            size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            data = f.read(size + 1)  # one byte more than the header promises: detects trailing data
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise StampError(f"{path}: cannot read ({type(e).__name__}: {e}); re-download or re-extract the file") from None
    if len(data) != size:
        what = "truncated" if len(data) < size else "longer than its header says"
        raise StampError(f"{path}: {what} (header {'×'.join(map(str, dims))} = {size} bytes of data, file has "
                         f"{len(data) if len(data) <= size else 'more'}); re-download or re-extract the file")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


def _idx_file(src: Path, stem: str, kind: str) -> Path | None:
    """``stem-idxN-ubyte`` or ``stem.idxN-ubyte``, raw or .gz (N = 3 for images, 1 for labels)."""
    n = 3 if kind == "images" else 1
    names = [f"{stem}{sep}idx{n}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    found = [src / name for name in names if (src / name).is_file()]
    if len(found) > 1:
        raise StampError(f"{src}: both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def idx_split(src: Path, split: str) -> tuple[np.ndarray, np.ndarray, Path] | None:
    """One split of an IDX directory (``IDX_FILES``): images ``[N, H, W]``, labels ``[N]`` and the images
    file, checked against each other; None when the test split has neither file."""
    images_stem, labels_stem = IDX_FILES[split]
    images, labels = _idx_file(src, images_stem, "images"), _idx_file(src, labels_stem, "labels")
    if images is None and labels is None and split == "test":
        return None
    if images is None or labels is None:
        missing = f"{images_stem}-idx3-ubyte" if images is None else f"{labels_stem}-idx1-ubyte"
        raise _mismatch("idx", src, f"no {missing}[.gz] beside the {split} "
                                    f"{'labels' if images is None else 'images'}")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        hint = " (it looks like a labels file)" if x.ndim == 1 else ""
        raise StampError(f"{images}: holds a {x.ndim}-dimensional array {x.shape}{hint}; an images file has "
                         "3 dimensions (N×H×W); check which file is which")
    if y.ndim != 1:
        raise StampError(f"{labels}: holds a {y.ndim}-dimensional array {y.shape}; a labels file has 1 "
                         "dimension (N); check which file is which")
    if len(x) != len(y):
        raise StampError(f"{images} has {len(x)} images but {labels} has {len(y)} labels; they must come "
                         "from the same release")
    return x, y, images


def has_idx(src: str | Path) -> bool:
    """Whether ``src`` holds an IDX training-images file (raw or .gz, either naming)."""
    return bool(str(src)) and Path(src).is_dir() and _idx_file(Path(src), IDX_FILES["train"][0], "images") is not None


def _idx(src: Path) -> Source:
    if not src.is_dir():
        raise _mismatch("idx", src, "it is a file; give the directory holding the -images- and -labels- files")
    parts = []
    for split in IDX_FILES:
        found = idx_split(src, split)
        if found is not None:
            x, y, images = found
            parts.append((split, *_check_arrays(x, y, images), images))
    classes = None
    names_file = src / "classes.txt"
    if names_file.is_file():
        classes = _check_names([line.strip() for line in names_file.read_text().splitlines() if line.strip()],
                               names_file)
    return _array_source(classes, parts)


READERS: dict[str, Callable[[Path], Source]] = {
    "imagefolder": _imagefolder,
    "cifar10": lambda src: _cifar("cifar10", src),
    "cifar100": lambda src: _cifar("cifar100", src),
    "svhn": _svhn,
    "numpy": _numpy,
    "wds": _wds,
    "idx": _idx,
}


# ---------------------------------------------------------------------------------------------- public


def convert(kind: str, src: str | Path, out: str | Path, image_size: int | None = None,
            shard_size: int = 1000) -> Manifest:
    """Convert the dataset at ``src`` (format ``kind``, one of ``READERS``) to per-class shards in ``out``.

    ``image_size=None`` keeps the source size (all images must share one square size). Train/test
    splits are kept where the source has them. ``out`` appears only when the conversion succeeded.
    """
    if kind not in READERS:
        raise StampError(f"unknown source format '{kind}'; choose one of: {', '.join(READERS)}")
    if (image_size is not None and image_size < 1) or shard_size < 1:
        raise StampError(f"--image-size and --shard-size must be positive (got {image_size}, {shard_size})")
    src = Path(src)
    if not src.exists():
        raise StampError(f"source {src} not found; expected {LAYOUTS[kind]}")
    check_writable(out)
    with atomic_dir(out) as tmp:
        source = READERS[kind](src)
        writer = PerClassShardWriter(tmp, source.classes, image_size, shard_size, source=f"{kind}:{src.resolve()}")
        with contextlib.closing(writer), progress(total=source.total, desc=f"converting {src.name}",
                                                  unit="img") as bar:
            for item in source.items:
                try:
                    writer.add(item.split, item.label, item.image)
                except ValueError as e:  # the writer does not know where the image came from
                    raise StampError(f"{item.origin}: {e}") from None
                bar.update()
            try:
                return writer.finish()
            except ValueError as e:
                raise StampError(f"{src}: {e}") from None


def describe(root: str | Path) -> str:
    """A summary of a dataset for ``stamp data info``: classes, splits, counts, shards, size, statistics."""
    manifest = Manifest.load(root)
    root = Path(root)
    missing = [rel for s in manifest.splits.values() for shards in s.shards for rel in shards
               if not (root / rel).is_file()]
    if missing:
        raise StampError(f"{root / missing[0]} is missing ({len(missing)} of the shards listed in manifest.json "
                         "are absent); the dataset is incomplete — re-create it")
    names = ", ".join(manifest.classes[:5])
    if manifest.num_classes > 5:
        names += f", … (+{manifest.num_classes - 5} more)"
    lines = [
        f"dataset     {root}",
        f"source      {manifest.source or 'unknown'}",
        f"classes     {manifest.num_classes}: {names}",
        f"image size  {manifest.image_size}×{manifest.image_size}, {manifest.channels} channels"
        + (f" (JPEGs kept as they came: shorter side to {manifest.resize}, centre crop, when read)"
           if manifest.resize else ""),
        f"mean        {', '.join(f'{v:.4f}' for v in manifest.mean)}",
        f"std         {', '.join(f'{v:.4f}' for v in manifest.std)}",
        "",
        f"{'split':<10}{'images':>10}{'min/class':>11}{'max/class':>11}{'shards':>8}",
    ]
    for name, s in manifest.splits.items():
        lines.append(f"{name:<10}{sum(s.counts):>10}{min(s.counts):>11}{max(s.counts):>11}"
                     f"{sum(map(len, s.shards)):>8}")
    return "\n".join(lines)
