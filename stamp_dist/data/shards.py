"""Writing per-class shards: one ``webdataset.TarWriter`` per (split, class), rolled every ``shard_size``."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from .manifest import Manifest, SplitInfo

# Cap on simultaneously open tar files (class-mixed sources at ImageNet scale would exceed ulimit).
MAX_OPEN = 128


def to_rgb_image(image, image_size: int | None) -> Image.Image:
    """Any HWC/HW uint8 array or PIL image → RGB PIL image, resized to ``image_size`` if given."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
        image = Image.fromarray(arr)
    image = image.convert("RGB")
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


class PerClassShardWriter:
    """Streams labelled images into per-class tar shards under ``root`` and writes the manifest.

    Memory stays constant in the dataset size: images are encoded and written one at a time; only
    per-channel pixel sums (for the normalisation statistics) are accumulated.
    """

    def __init__(self, root: str | Path, classes: list[str], image_size: int, shard_size: int = 1000,
                 source: str = ""):
        self.root = Path(root)
        self.classes = list(classes)
        self.image_size = image_size
        self.shard_size = shard_size
        self.source = source
        self._open: OrderedDict[tuple[str, int], wds.TarWriter] = OrderedDict()
        self._in_shard: dict[tuple[str, int], int] = {}
        self._counts: dict[str, list[int]] = {}
        self._shards: dict[str, list[list[str]]] = {}
        self._sum = np.zeros(3)
        self._sumsq = np.zeros(3)
        self._pixels = 0

    def _writer(self, split: str, label: int) -> wds.TarWriter:
        key = (split, label)
        if key in self._open and self._in_shard[key] < self.shard_size:
            self._open.move_to_end(key)
            return self._open[key]
        if key in self._open:
            self._open.pop(key).close()
        if len(self._open) >= MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        shards = self._shards.setdefault(split, [[] for _ in self.classes])[label]
        rel = f"{split}/{label:05d}-{len(shards):04d}.tar"
        (self.root / split).mkdir(parents=True, exist_ok=True)
        shards.append(rel)
        self._open[key] = wds.TarWriter(str(self.root / rel))
        self._in_shard[key] = 0
        return self._open[key]

    def add(self, split: str, label: int, image) -> None:
        if not 0 <= label < len(self.classes):
            raise ValueError(f"label {label} outside the {len(self.classes)} classes")
        img = to_rgb_image(image, self.image_size)
        if split == "train":
            arr = np.asarray(img, dtype=np.float64) / 255.0
            self._sum += arr.sum(axis=(0, 1))
            self._sumsq += (arr**2).sum(axis=(0, 1))
            self._pixels += arr.shape[0] * arr.shape[1]
        counts = self._counts.setdefault(split, [0] * len(self.classes))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        self._writer(split, label).write(
            {"__key__": f"{label:05d}_{counts[label]:08d}", "png": buf.getvalue(), "cls": str(label).encode()}
        )
        counts[label] += 1
        self._in_shard[(split, label)] += 1

    def finish(self) -> Manifest:
        for w in self._open.values():
            w.close()
        self._open.clear()
        if self._pixels:
            mean = self._sum / self._pixels
            std = np.sqrt(np.maximum(self._sumsq / self._pixels - mean**2, 1e-12))
        else:
            mean, std = np.full(3, 0.5), np.full(3, 0.25)
        splits = {
            s: SplitInfo(counts=self._counts[s], shards=self._shards.get(s, [[] for _ in self.classes]))
            for s in self._counts
        }
        manifest = Manifest(
            classes=self.classes, image_size=self.image_size, splits=splits,
            mean=[round(float(x), 6) for x in mean], std=[round(float(x), 6) for x in std], source=self.source,
        )
        manifest.save(self.root)
        return manifest
