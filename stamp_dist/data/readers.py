"""Reading per-class shards: an iterator per class, and whole splits as in-memory datasets.

Images come back as uint8 ``[3, H, W]`` tensors; normalisation (``Manifest.mean/std``) happens on
the consumer's device (``normalize``), so uint8 is what travels between processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import io
import itertools
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from ..errors import StampError
from .manifest import Manifest

IMAGE_EXTS = ("png", "jpg", "jpeg", "npy")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata entries, not samples


def decode_image(key: str, sample: dict, source: str) -> np.ndarray:
    """One sample's image as HWC uint8 RGB; errors name the shard and the sample key."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            data = sample[ext]
            try:
                if ext == "npy":
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
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


def iter_tar(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Raw samples ``(key, {ext: bytes})`` of one uncompressed tar, grouped by key as webdataset does.

    Read with ``tarfile`` directly (not ``webdataset.WebDataset``) so that paths are taken literally
    (no brace expansion or ``pipe:`` URLs) and truncation is always detected.
    """
    path = Path(path)
    if not path.is_file():
        raise StampError(f"shard {path} is missing; the dataset directory is incomplete — re-create it")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            with tarfile.open(fileobj=f, mode="r|") as tar:
                key, sample = None, {}
                for member in tar:
                    base, ext = base_plus_ext(member.name)
                    if not member.isreg() or base is None or _META.match(member.name):
                        continue
                    if member.offset_data + member.size > size:  # checked before reading allocates its size
                        raise tarfile.ReadError(f"member {member.name} claims {member.size} bytes, more than the "
                                                "file holds")
                    if base != key:
                        if sample:
                            yield key, sample
                        key, sample = base, {}
                    sample[ext.lower()] = tar.extractfile(member).read()
                end = tar.offset
            if not _has_end_marker(f, end):
                raise tarfile.ReadError("file ends without the end-of-archive marker")
        if sample:
            yield key, sample
    except (tarfile.TarError, EOFError, OSError) as e:
        raise StampError(f"shard {path} is truncated or corrupt ({type(e).__name__}: {e}); re-create it") from None


def _check_label(manifest: Manifest, label: int) -> None:
    if not 0 <= label < manifest.num_classes:
        raise StampError(f"class id {label} is outside the dataset's {manifest.num_classes} classes")


def iter_class(root: str | Path, manifest: Manifest, split: str, label: int,
               only: set[int] | None = None) -> Iterator[np.ndarray]:
    """Every image of one class (or those at the indices ``only``), in shard order, as HWC uint8 arrays
    (checked against the manifest). Images outside ``only`` are read but not decoded: decoding is the cost."""
    root = Path(root)
    _check_label(manifest, label)
    info = manifest.split(split)
    size = (manifest.image_size, manifest.image_size, 3)
    n = 0
    for rel in info.shards[label]:
        for key, sample in iter_tar(root / rel):
            if "cls" in sample and (got := parse_label(key, sample, str(root / rel))) != label:
                raise StampError(
                    f"{root / rel}: sample '{key}' has label {got} but the shard holds class {label}; "
                    "re-create the dataset"
                )
            n += 1
            if only is not None and n - 1 not in only:
                continue
            arr = decode_image(key, sample, str(root / rel))
            if arr.shape != size:
                raise StampError(f"{root / rel}: image '{key}' is {arr.shape[1]}×{arr.shape[0]}, the manifest says "
                                 f"{manifest.image_size}×{manifest.image_size}; re-create the dataset")
            yield arr
    if n != info.counts[label]:
        raise StampError(
            f"{root}: class {label} ('{manifest.classes[label]}') has {n} '{split}' images in its shards but "
            f"{info.counts[label]} in manifest.json; the dataset is incomplete — re-create it"
        )


def load_class(root: str | Path, manifest: Manifest, split: str, label: int, n: int | None = None) -> torch.Tensor:
    """The first ``n`` images (all if None) of a class as a uint8 ``[n, 3, H, W]`` tensor."""
    _check_label(manifest, label)
    count = manifest.split(split).counts[label]
    if n is not None and n > count:
        raise StampError(
            f"class '{manifest.classes[label]}' has {count} '{split}' images in {root}, fewer than the {n} asked "
            f"for; ask for at most {count} per class"
        )
    # A short read cannot pass silently: iter_class checks the manifest's count when it runs dry.
    images = list(itertools.islice(iter_class(root, manifest, split, label), n))
    s = manifest.image_size
    if not images:
        return torch.empty((0, 3, s, s), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def load_split(root: str | Path, split: str, per_class: int | None = None,
               classes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, Manifest]:
    """A whole split (or ``per_class`` images of each class) in memory: ``(uint8 images, labels, manifest)``.

    For target datasets and the demo; ImageNet-scale data is read per class by the meta-trainer.
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
    """Map-style dataset over an in-memory split: yields ``(uint8 [3,H,W], label)``."""

    def __init__(self, root: str | Path, split: str, per_class: int | None = None):
        self.images, self.labels, self.manifest = load_split(root, split, per_class)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
