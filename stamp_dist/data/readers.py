"""Reading per-class shards: an iterator per class, whole splits in memory, and splits streamed image by image.

Images come back as uint8 ``[3, H, W]`` tensors; normalisation (``Manifest.mean/std``) happens on
the consumer's device (``normalize``), so uint8 is what travels between processes.

Random access: each shard ``X.tar`` has an index ``X.tar.idx`` (``write_index``: every sample's image
member, its offset and size), so a reader seeks to the images it needs instead of reading the shard
through. Each read checks the tar header in front of the image against the index, so an index that no
longer fits its shard fails with a clear error rather than returning other bytes. A shard without an
index (datasets written before indexes existed) is indexed in memory from its tar headers (512 bytes
per member, the images are skipped); nothing is written into the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import io
import itertools
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from ..atomic import read_json
from ..errors import StampError
from .manifest import Manifest

IMAGE_EXTS = ("png", "jpg", "jpeg", "npy")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata entries, not samples
INDEX_FORMAT = "stamp_dist/shard-index/v1"
# torchvision's ImageNet evaluation transform, Resize(256) + CenterCrop(224): the crop keeps 0.875 of the
# resized shorter side (what pretrained ImageNet weights were scored with).
CROP_FRACTION = 0.875


def resize_for(image_size: int) -> int:
    """The shorter side an image is resized to before its centre ``image_size`` square is cropped (224 → 256)."""
    return round(image_size / CROP_FRACTION)


def eval_crop(image: Image.Image, size: int, resize: int) -> Image.Image:
    """torchvision's ``Resize(resize)`` (bilinear, antialiased, long side ``int(resize * long / short)``) then
    ``CenterCrop(size)`` on an opened, not yet decoded PIL image, as RGB; an image already ``size``×``size`` is
    returned as it is. JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale still at least the resized
    size (``Image.draft``: the DCT is scaled, several times cheaper than decoding 375×500 in full)."""
    w, h = image.size
    if (w, h) != (size, size):
        long = int(resize * max(w, h) / min(w, h))
        target = (resize, long) if w <= h else (long, resize)
        if image.format == "JPEG":
            image.draft("RGB", target)
        image = image.convert("RGB")
        if image.size != target:
            image = image.resize(target, Image.Resampling.BILINEAR)
        left, top = int(round((target[0] - size) / 2)), int(round((target[1] - size) / 2))
        image = image.crop((left, top, left + size, top + size))
    return image.convert("RGB")


def decode_image(key: str, sample: dict, source: str, size: int | None = None,
                 resize: int | None = None) -> np.ndarray:
    """One sample's image as HWC uint8 RGB; errors name the shard and the sample key. With ``resize`` (a v2
    manifest's), an encoded image not ``size``×``size`` goes through ``eval_crop``."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            data = sample[ext]
            try:
                if ext == "npy":
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                elif resize is not None:
                    arr = np.asarray(eval_crop(Image.open(io.BytesIO(data)), size, resize))
                else:
                    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise StampError(f"{source}: image '{key}.{ext}' cannot be decoded ({e}); re-create the shard") from None
            if arr.dtype != np.uint8:
                raise StampError(f"{source}: image '{key}.{ext}' has dtype {arr.dtype}, expected uint8")
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.shape[2] not in (1, 3):
                raise StampError(f"{source}: image '{key}.{ext}' has shape {arr.shape}, expected H×W×3 or H×W")
            return arr if arr.shape[2] == 3 else np.repeat(arr, 3, axis=2)
    raise StampError(f"{source}: sample '{key}' has no image (.png, .jpg or .npy); keys: {sorted(sample)}")


def parse_label(key: str, sample: dict, source: str) -> int:
    """A sample's integer ``.cls`` label; errors name the shard and the sample key."""
    if "cls" not in sample:
        raise StampError(f"{source}: sample '{key}' has no .cls label; keys: {sorted(sample)}")
    try:
        return int(sample["cls"])
    except ValueError:
        raise StampError(f"{source}: sample '{key}' has .cls {sample['cls'][:20]!r}, not an integer label") from None


def _has_end_marker(f, offset: int) -> bool:
    # tarfile stops silently when a file is cut at a header boundary; a complete tar ends in a zero block.
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def _members(path: Path, f, mode: str) -> Iterator[tuple[str, str, tarfile.TarInfo, tarfile.TarFile]]:
    """``(key, ext, member, tar)`` of every sample member of the open tar ``f``, each checked to lie inside the
    file, then the end-of-archive marker checked; tar errors become one StampError naming the shard."""
    try:
        size = os.fstat(f.fileno()).st_size
        with tarfile.open(fileobj=f, mode=mode) as tar:
            for member in tar:
                base, ext = base_plus_ext(member.name)
                if not member.isreg() or base is None or _META.match(member.name):
                    continue
                if member.offset_data + member.size > size:  # checked before reading allocates its size
                    raise tarfile.ReadError(f"member {member.name} claims {member.size} bytes, more than the "
                                            "file holds")
                yield base, ext.lower(), member, tar
            end = tar.offset
        if not _has_end_marker(f, end):
            raise tarfile.ReadError("file ends without the end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise StampError(f"shard {path} is truncated or corrupt ({type(e).__name__}: {e}); re-create it") from None


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise StampError(f"shard {path} is missing; the dataset directory is incomplete — re-create it")


def iter_tar(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Raw samples ``(key, {ext: bytes})`` of one uncompressed tar, grouped by key as webdataset does.

    Read with ``tarfile`` directly (not ``webdataset.WebDataset``) so that paths are taken literally
    (no brace expansion or ``pipe:`` URLs) and truncation is always detected.
    """
    path = Path(path)
    _check_exists(path)
    key, sample = None, {}
    with open(path, "rb") as f:
        for base, ext, member, tar in _members(path, f, "r|"):
            if base != key:
                if sample:
                    yield key, sample
                key, sample = base, {}
            try:
                sample[ext] = tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, OSError) as e:
                raise StampError(f"shard {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                                 "re-create it") from None
    if sample:
        yield key, sample


# --- random access: shard indexes ------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """Where one sample's image lies in its shard: the member ``{key}.{ext}``, ``size`` bytes at ``offset``."""

    key: str
    ext: str
    offset: int
    size: int


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".idx")


def scan_shard(path: str | Path) -> list[Member]:
    """Every sample's image member, in order, from the tar headers alone (the images are seeked over)."""
    path = Path(path)
    _check_exists(path)
    found: dict[str, Member | None] = {}  # insertion order is sample order
    with open(path, "rb") as f:
        for key, ext, member, _ in _members(path, f, "r:"):
            if found.get(key) is None:
                found[key] = Member(key, ext, member.offset_data, member.size) if ext in IMAGE_EXTS else None
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise StampError(f"{path}: sample '{missing[0]}' has no image (.png, .jpg or .npy); re-create the shard")
    return list(found.values())


def write_index(shard: Path) -> None:
    """``shard``'s ``.idx``: its size and every sample's image member (written inside the dataset being made)."""
    samples = [[m.key, m.ext, m.offset, m.size] for m in scan_shard(shard)]
    index_path(shard).write_text(json.dumps({"format": INDEX_FORMAT, "shard_bytes": shard.stat().st_size,
                                             "samples": samples}, separators=(",", ":")))


def _index_mismatch(shard: Path, problem: str) -> StampError:
    idx = index_path(shard)
    return StampError(f"{idx} does not fit {shard} ({problem}); delete {idx} to read the shard without its index "
                      "(slower), or re-create the dataset")


def shard_members(shard: str | Path) -> list[Member]:
    """The shard's image members from its index, checked against the shard's size; scanned from the tar
    headers when it has no index."""
    shard = Path(shard)
    _check_exists(shard)
    idx = index_path(shard)
    if not idx.is_file():
        return scan_shard(shard)
    raw = read_json(idx, "shard index")
    if not (isinstance(raw, dict) and raw.get("format") == INDEX_FORMAT and isinstance(raw.get("samples"), list)):
        raise _index_mismatch(shard, f"not a {INDEX_FORMAT} index")
    if raw.get("shard_bytes") != shard.stat().st_size:
        raise _index_mismatch(shard, f"the index is of a {raw.get('shard_bytes')}-byte shard, the shard has "
                                     f"{shard.stat().st_size} bytes")
    try:
        members = [Member(str(k), str(e), int(o), int(n)) for k, e, o, n in raw["samples"]]
    except (TypeError, ValueError):
        raise _index_mismatch(shard, "malformed sample entries") from None
    return members


def read_member(f, shard: Path, m: Member) -> bytes:
    """The bytes of member ``m`` of the open shard ``f``, after checking the tar header in front of them names
    ``m`` with its size (one read of header + data); never reads past the end of the file."""
    end = os.fstat(f.fileno()).st_size
    if m.offset < tarfile.BLOCKSIZE or m.size < 0 or m.offset + m.size > end:
        raise _index_mismatch(shard, f"'{m.key}.{m.ext}' at {m.offset}+{m.size} lies outside the {end}-byte file")
    f.seek(m.offset - tarfile.BLOCKSIZE)
    block = f.read(tarfile.BLOCKSIZE + m.size)
    try:
        header = tarfile.TarInfo.frombuf(block[:tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        header = None
    if header is None or header.name != f"{m.key}.{m.ext}" or header.size != m.size:
        raise _index_mismatch(shard, f"no member '{m.key}.{m.ext}' of {m.size} bytes at offset {m.offset}")
    return block[tarfile.BLOCKSIZE:]


def _check_label(manifest: Manifest, label: int) -> None:
    if not 0 <= label < manifest.num_classes:
        raise StampError(f"class id {label} is outside the dataset's {manifest.num_classes} classes")


def _decoded(manifest: Manifest, key: str, sample: dict, source: str) -> np.ndarray:
    """``decode_image`` at the manifest's size (v2: resized and cropped), checked against it."""
    s = manifest.image_size
    arr = decode_image(key, sample, source, s, manifest.resize)
    if arr.shape != (s, s, 3):
        raise StampError(f"{source}: image '{key}' is {arr.shape[1]}×{arr.shape[0]}, the manifest says {s}×{s}; "
                         "re-create the dataset")
    return arr


def _count_problem(root: Path, manifest: Manifest, split: str, label: int, n: int) -> StampError:
    return StampError(
        f"{root}: class {label} ('{manifest.classes[label]}') has {n} '{split}' images in its shards but "
        f"{manifest.split(split).counts[label]} in manifest.json; the dataset is incomplete — re-create it"
    )


def iter_class(root: str | Path, manifest: Manifest, split: str, label: int,
               only: set[int] | None = None) -> Iterator[np.ndarray]:
    """Every image of one class (or those at the indices ``only``), in shard order, as HWC uint8 arrays
    (checked against the manifest). All: the shards are read through. ``only``: each shard's index says where
    the chosen images lie, and only those are read and decoded."""
    root = Path(root)
    _check_label(manifest, label)
    info = manifest.split(split)
    n = 0
    for rel in info.shards[label]:
        path = root / rel
        if only is not None:
            members = shard_members(path)
            chosen = [m for i, m in enumerate(members, start=n) if i in only]
            n += len(members)
            if chosen:
                with open(path, "rb") as f:
                    for m in chosen:
                        yield _decoded(manifest, m.key, {m.ext: read_member(f, path, m)}, str(path))
            continue
        for key, sample in iter_tar(path):
            if "cls" in sample and (got := parse_label(key, sample, str(path))) != label:
                raise StampError(
                    f"{path}: sample '{key}' has label {got} but the shard holds class {label}; re-create the dataset"
                )
            n += 1
            yield _decoded(manifest, key, sample, str(path))
    if n != info.counts[label]:
        raise _count_problem(root, manifest, split, label, n)


def _check_available(root, manifest: Manifest, split: str, label: int, n: int | None) -> None:
    count = manifest.split(split).counts[label]
    if n is not None and n > count:
        raise StampError(
            f"class '{manifest.classes[label]}' has {count} '{split}' images in {root}, fewer than the {n} asked "
            f"for; ask for at most {count} per class"
        )


def load_class(root: str | Path, manifest: Manifest, split: str, label: int, n: int | None = None) -> torch.Tensor:
    """The first ``n`` images (all if None) of a class as a uint8 ``[n, 3, H, W]`` tensor."""
    _check_label(manifest, label)
    _check_available(root, manifest, split, label, n)
    # A short read cannot pass silently: iter_class checks the manifest's count when it runs dry.
    images = list(itertools.islice(iter_class(root, manifest, split, label), n))
    s = manifest.image_size
    if not images:
        return torch.empty((0, 3, s, s), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def load_split(root: str | Path, split: str, per_class: int | None = None,
               classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, Manifest]:
    """A whole split (or ``per_class`` images of each class) in memory: ``(uint8 images, labels, manifest)``.

    For target datasets and the demo; larger splits stream (``open_split``), and the meta-trainer reads
    ImageNet-scale data per class (``iter_class``).
    """
    manifest = Manifest.load(root)
    labels = range(manifest.num_classes) if classes is None else classes
    xs, ys = [], []
    for label in labels:
        x = load_class(root, manifest, split, label, per_class)
        xs.append(x)
        ys.append(torch.full((len(x),), label, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys), manifest


@dataclass(frozen=True)
class Normalization:
    """Per-channel input statistics in [0, 1] units. A backbone keeps the statistics of the data it
    was pretrained on, and every image it sees later (target sets too) is normalised with them."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` → normalised float, on the images' device."""
        mean = torch.tensor(self.mean, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(3, 1, 1)
        return (images.float() / 255.0 - mean) / std

    @classmethod
    def of(cls, stats) -> "Normalization":
        """From anything with ``mean`` and ``std`` (a Manifest, a PruningSpec, a dict)."""
        get = stats.get if isinstance(stats, dict) else lambda k: getattr(stats, k)
        return cls(tuple(get("mean")), tuple(get("std")))


def normalize(images: torch.Tensor, stats) -> torch.Tensor:
    """uint8 images normalised with the mean/std of ``stats`` (see ``Normalization.of``)."""
    return Normalization.of(stats)(images)


class ShardDataset(torch.utils.data.Dataset):
    """One split (or the first ``per_class`` images of each class), read image by image from the shards for a
    ``DataLoader``: ``dataset[i]`` is ``(uint8 [3, H, W], label)``, in ``load_split``'s order. What it holds
    is the shard indexes (numpy arrays, ~40 bytes per image), so its memory does not grow with the images."""

    def __init__(self, root: str | Path, split: str, per_class: int | None = None):
        self.root = Path(root)
        self.manifest = manifest = Manifest.load(root)
        info = manifest.split(split)
        self.paths: list[Path] = []
        shard, offset, size, name, labels = [], [], [], [], []
        for label in range(manifest.num_classes):
            _check_available(root, manifest, split, label, per_class)
            members = []
            for rel in info.shards[label]:
                found = shard_members(self.root / rel)
                shard += [len(self.paths)] * len(found)
                members += found
                self.paths.append(self.root / rel)
            if len(members) != info.counts[label]:
                raise _count_problem(self.root, manifest, split, label, len(members))
            keep = len(members) if per_class is None else per_class
            del shard[len(shard) - len(members) + keep:]
            offset += [m.offset for m in members[:keep]]
            size += [m.size for m in members[:keep]]
            name += [f"{m.key}.{m.ext}".encode() for m in members[:keep]]
            labels += [label] * keep
        self.shard, self.offset, self.size = np.array(shard, np.int32), np.array(offset, np.int64), np.array(size)
        self.name = np.array(name, dtype=bytes)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[self.shard[i]]
        key, ext = self.name[i].decode().rsplit(".", 1)
        member = Member(key, ext, int(self.offset[i]), int(self.size[i]))
        with open(path, "rb") as f:
            arr = _decoded(self.manifest, key, {ext: read_member(f, path, member)}, str(path))
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), int(self.labels[i])


def open_split(root: str | Path, split: str, per_class: int | None = None,
               memory_mb: int = 0) -> tuple[torch.Tensor | ShardDataset, torch.Tensor, Manifest]:
    """``load_split``'s ``(images, labels, manifest)`` when the decoded images fit in ``memory_mb`` MiB, else the
    images as a ``ShardDataset`` read batch by batch (``runtime.data_memory_mb``): the same images in the same
    order either way."""
    manifest = Manifest.load(root)
    s = manifest.image_size
    images = sum(c if per_class is None else min(c, per_class) for c in manifest.split(split).counts)
    if images * 3 * s * s <= memory_mb * 2**20:
        return load_split(root, split, per_class)
    dataset = ShardDataset(root, split, per_class)
    return dataset, dataset.labels, dataset.manifest
