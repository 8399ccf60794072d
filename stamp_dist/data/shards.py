"""Writing per-class shards: one tar per (split, class) at a time, rolled every ``shard_size`` images.

The tars are plain WebDataset shards (members ``{key}.png`` or ``{key}.jpg``, + ``{key}.cls``), written with
``tarfile`` because a shard closed early must later be reopened for appending (see ``MAX_OPEN``); each
gets its index ``{shard}.idx`` (``readers.write_index``) once the dataset is complete.
"""

from __future__ import annotations

import io
import itertools
import tarfile
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .manifest import Manifest, SplitInfo
from .readers import eval_crop, resize_for, write_index

# Cap on simultaneously open tar files: a class-mixed source at ImageNet scale would exceed the
# open-file limit. The least recently used shard is closed and appended to when its class returns,
# so a random class order still gives full shards rather than one tiny shard per image.
MAX_OPEN = 128


class _OpenShard:
    """A tar being written; ``close`` returns where its end-of-archive marker starts, to append there."""

    def __init__(self, path: Path, append_at: int | None = None):
        self.file = open(path, "wb" if append_at is None else "r+b")
        if append_at is not None:
            self.file.seek(append_at)
            self.file.truncate()  # drop the old end-of-archive blocks; tarfile writes new ones
        self.tar = tarfile.open(fileobj=self.file, mode="w")

    def write(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), 0o444  # mtime stays 0: identical input, identical shards
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> int:
        end = self.tar.offset
        self.tar.close()
        self.file.close()
        return end


@dataclass(frozen=True)
class Jpeg:
    """A JPEG file's bytes, stored in its shard as they are (``{key}.jpg``): no re-encoding, no resizing at
    convert time; readers resize and crop it to the manifest's size (``readers.eval_crop``)."""

    data: bytes


def to_rgb_image(image, image_size: int | None) -> Image.Image:
    """Any HWC/HW uint8 array or PIL image → RGB PIL image; with ``image_size``, its shorter side resized to
    ``image_size`` and the centre cropped square (torchvision's ``Resize`` + ``CenterCrop``: shapes keep their
    aspect ratio, as pretrained ImageNet weights saw them)."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]  # PIL has no HxWx1 mode
        image = Image.fromarray(arr)
    image = image.convert("RGB")
    if image_size is not None and image.size != (image_size, image_size):
        w, h = image.size
        scale = image_size / min(w, h)
        size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return image


class PerClassShardWriter:
    """Streams labelled images into per-class tar shards under ``root`` and writes the manifest.

    Memory stays constant in the dataset size: images are encoded and written one at a time; only
    per-channel pixel sums (for the normalisation statistics) are accumulated.

    ``classes=None``: the class list is not known up front (a class-mixed stream without names);
    labels must then cover 0..C-1 and the classes are named "0".."C-1" at ``finish``.
    ``image_size=None``: keep the source size; every image must be square and of the first one's size.
    A ``Jpeg`` is stored as it is, and with ``image_size`` the manifest becomes v2 (``resize`` set: readers
    resize and crop it); other images are resized and cropped here (``to_rgb_image``) and stored as PNG.
    Problems with an image raise ``ValueError``; the caller adds where the image came from.
    """

    def __init__(self, root: str | Path, classes: list[str] | None, image_size: int | None,
                 shard_size: int = 1000, source: str = ""):
        self.root = Path(root)
        self.classes = None if classes is None else list(classes)
        self.resize_to = image_size
        self.image_size = image_size  # with None: set by the first image
        self.shard_size = shard_size
        self.source = source
        self._kept_jpeg = False  # some JPEG stored at its own size: readers must resize it (manifest v2)
        self._open: OrderedDict[tuple[str, int], _OpenShard] = OrderedDict()
        self._in_shard: dict[tuple[str, int], int] = {}  # images in each (split, class)'s last shard
        self._append_at: dict[tuple[str, int], int] = {}  # last shards closed early, not yet full
        self._counts: Counter[tuple[str, int]] = Counter()  # insertion order gives the split order
        self._shards: defaultdict[tuple[str, int], list[str]] = defaultdict(list)
        # Per split, for the normalisation statistics: per-channel pixel sums, sums of squares, pixel count.
        self._stats: dict[str, list] = {}

    def _shard(self, split: str, label: int) -> _OpenShard:
        key = (split, label)
        if key in self._open and self._in_shard[key] < self.shard_size:
            self._open.move_to_end(key)
            return self._open[key]
        if key in self._open:  # full: roll over to a new shard
            self._open.pop(key).close()
        if len(self._open) >= MAX_OPEN:
            old, shard = self._open.popitem(last=False)
            end = shard.close()
            if self._in_shard[old] < self.shard_size:
                self._append_at[old] = end
        shards = self._shards[key]
        if key in self._append_at:
            self._open[key] = _OpenShard(self.root / shards[-1], append_at=self._append_at.pop(key))
        else:
            rel = f"{split}/{label:05d}-{len(shards):04d}.tar"
            (self.root / split).mkdir(parents=True, exist_ok=True)
            shards.append(rel)
            self._open[key] = _OpenShard(self.root / rel)
            self._in_shard[key] = 0
        return self._open[key]

    def _check_label(self, label: int) -> None:
        if self.classes is None:
            if label < 0:
                raise ValueError(f"label {label} is negative; labels must be 0..C-1")
        elif not 0 <= label < len(self.classes):
            raise ValueError(
                f"label {label} is outside the {len(self.classes)} classes (labels 0..{len(self.classes) - 1})"
            )

    def _fix_size(self, img: Image.Image) -> None:
        """With ``image_size=None`` the first image sets the size; a manifest has one square size."""
        w, h = img.size
        if self.image_size is None:
            if w != h:
                raise ValueError(f"image is {w}×{h}, not square; pass --image-size N to resize and centre-crop all images to N×N")
            self.image_size = w
        elif (w, h) != (self.image_size, self.image_size):
            raise ValueError(
                f"image is {w}×{h} but earlier images are {self.image_size}×{self.image_size}; "
                "pass --image-size N to resize and centre-crop all images to N×N"
            )

    def _open_jpeg(self, data: bytes) -> Image.Image:
        """The JPEG as readers will see it (for the statistics; also proves it decodes)."""
        try:
            img = Image.open(io.BytesIO(data))
            if self.resize_to is None:
                return img.convert("RGB")
            return eval_crop(img, self.resize_to, resize_for(self.resize_to))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image ({e}); remove or replace the file") from None

    def add(self, split: str, label: int, image) -> None:
        self._check_label(label)
        jpeg = image.data if isinstance(image, Jpeg) else None
        img = to_rgb_image(image, self.resize_to) if jpeg is None else self._open_jpeg(jpeg)
        self._fix_size(img)
        if jpeg is None:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            files = {"cls": str(label).encode(), "png": buf.getvalue()}
        else:
            files = {"cls": str(label).encode(), "jpg": jpeg}
            self._kept_jpeg |= self.resize_to is not None
        arr = np.asarray(img, dtype=np.float64) / 255.0
        stats = self._stats.setdefault(split, [np.zeros(3), np.zeros(3), 0])
        stats[0] += arr.sum(axis=(0, 1))
        stats[1] += (arr**2).sum(axis=(0, 1))
        stats[2] += arr.shape[0] * arr.shape[1]
        n = self._counts[(split, label)]
        self._shard(split, label).write(f"{label:05d}_{n:08d}", files)
        self._counts[(split, label)] = n + 1
        self._in_shard[(split, label)] += 1

    def close(self) -> None:
        """Close open shard files (also on failure, before the caller removes the directory)."""
        for w in self._open.values():
            w.close()
        self._open.clear()

    def _final_classes(self) -> list[str]:
        if self.classes is not None:
            return self.classes
        seen = {label for _, label in self._counts}
        num = max(seen) + 1 if seen else 0
        if len(seen) < num:  # a gap; list the first few without building range(num) (labels can be huge)
            missing = list(itertools.islice((i for i in range(num) if i not in seen), 10))
            raise ValueError(
                f"labels must be 0..C-1 when no class names are given, but labels {missing} have no images "
                f"(highest label {num - 1}, {len(seen)} labels used); supply the class names or fix the labels"
            )
        return [str(i) for i in range(num)]

    def finish(self) -> Manifest:
        self.close()
        if not self._counts:
            raise ValueError("no images were added")
        classes = self._final_classes()
        # Normalise with the train split's statistics; a dataset without one uses all its images.
        parts = [self._stats["train"]] if "train" in self._stats else list(self._stats.values())
        total, total_sq, pixels = (sum(p[i] for p in parts) for i in range(3))
        mean = total / pixels
        std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 1e-12))
        splits = {
            s: SplitInfo(
                counts=[self._counts[(s, c)] for c in range(len(classes))],
                shards=[list(self._shards[(s, c)]) for c in range(len(classes))],
            )
            for s in dict.fromkeys(s for s, _ in self._counts)
        }
        manifest = Manifest(
            classes=classes, image_size=self.image_size, splits=splits,
            mean=[round(float(x), 6) for x in mean], std=[round(float(x), 6) for x in std], source=self.source,
            resize=resize_for(self.image_size) if self._kept_jpeg else None,
        )
        for shards in self._shards.values():
            for rel in shards:
                write_index(self.root / rel)
        manifest.save(self.root)
        return manifest
