"""Reading per-class shards: an iterator per class, and whole splits as in-memory datasets.

Images come back as uint8 ``[3, H, W]`` tensors; normalisation (``Manifest.mean/std``) happens on
the consumer's device (``normalize``), so uint8 is what travels between processes.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from ..errors import StampError
from .manifest import Manifest

IMAGE_EXTS = ("png", "jpg", "jpeg", "npy")


def decode_image(key: str, sample: dict, source: str) -> np.ndarray:
    """One sample's image as HWC uint8; errors name the shard and the sample key."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            data = sample[ext]
            try:
                if ext == "npy":
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                else:
                    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise StampError(f"{source}: image '{key}.{ext}' cannot be decoded ({e}); re-create the shard") from None
            if arr.dtype != np.uint8:
                raise StampError(f"{source}: image '{key}.{ext}' has dtype {arr.dtype}, expected uint8")
            return arr if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=2)
    raise StampError(f"{source}: sample '{key}' has no image (.png, .jpg or .npy); keys: {sorted(sample)}")


def iter_tar(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Raw samples ``(key, {ext: bytes})`` of one tar shard, with clear errors for corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise StampError(f"shard {path} is missing; the dataset directory is incomplete — re-create it")
    try:
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            key = sample.pop("__key__")
            sample.pop("__url__", None)
            sample.pop("__local_path__", None)
            yield key, sample
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise StampError(f"shard {path} is truncated or corrupt ({type(e).__name__}: {e}); re-create it") from None


def iter_class(root: str | Path, manifest: Manifest, split: str, label: int) -> Iterator[np.ndarray]:
    """Every image of one class, in shard order, as HWC uint8 arrays."""
    root = Path(root)
    for rel in manifest.split(split).shards[label]:
        for key, sample in iter_tar(root / rel):
            cls = sample.get("cls")
            if cls is not None and int(cls) != label:
                raise StampError(
                    f"{root / rel}: sample '{key}' has label {int(cls)} but the shard holds class {label}"
                )
            yield decode_image(key, sample, str(root / rel))


def load_class(root: str | Path, manifest: Manifest, split: str, label: int, n: int | None = None) -> torch.Tensor:
    """The first ``n`` images (all if None) of a class as a uint8 ``[n, 3, H, W]`` tensor."""
    count = manifest.split(split).counts[label]
    if n is not None and n > count:
        raise StampError(
            f"class '{manifest.classes[label]}' has {count} '{split}' images in {root}, fewer than the {n} asked for"
        )
    images = []
    for arr in iter_class(root, manifest, split, label):
        images.append(arr)
        if n is not None and len(images) == n:
            break
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


def normalize(images: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` → float normalised with the dataset's mean/std (on images' device)."""
    mean = torch.tensor(manifest.mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(manifest.std, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class ShardDataset(torch.utils.data.Dataset):
    """Map-style dataset over an in-memory split: yields ``(uint8 [3,H,W], label)``."""

    def __init__(self, root: str | Path, split: str, per_class: int | None = None):
        self.images, self.labels, self.manifest = load_split(root, split, per_class)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
