"""The ImageNet data path on a generated ImageNet-like set: conversion, and what one sampler delivers.

1. Writes an ImageFolder of JPEGs at ImageNet's typical sizes (sides 250-500 px, any aspect ratio;
   smooth random content, so files have realistic JPEG sizes): ``--classes`` × ``--per-class`` images.
2. Converts it as the ImageNet recipe does: ``stamp data convert --from imagefolder SRC OUT --image-size
   224`` (shorter side to 224, centre crop).
3. Samples meta-training episodes from the shards with one ``ClassPool`` + ``EpisodeSampler`` — what one
   Ray sampler actor runs — at the ImageNet config's buffer (64 images per class, reuse 8) and task
   shape (5-20-way, 10+10), counting image decodes.

Reports conversion images/s, episodes/s and images/s of the sampler, and decodes per delivered image
(each image in an episode is "delivered"; a class buffer refill decodes only the images it keeps, so this
stays ≤ 1, against ``class size / (buffer × reuse)`` ≈ 2.5 at ImageNet's 1,300 images per class had every
refill decoded its whole class, as before).

    python benchmarks/imagenet_like_data.py [--classes 100] [--per-class 80] [--episodes 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stamp_dist.config import MetaConfig
from stamp_dist.data import readers
from stamp_dist.data.convert import convert
from stamp_dist.data.episodes import ClassPool, EpisodeSampler


def write_imagefolder(root: Path, classes: int, per_class: int, seed: int = 0) -> int:
    """``classes`` folders of ``per_class`` JPEGs of random size and smooth random content; returns bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(250, 501, 2))
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)  # upsampled: smooth
            img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
            path = folder / f"{i:05d}.jpg"
            img.save(path, quality=90)
            total += path.stat().st_size
    return total


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux ``/proc/self/io`` rchar, page cache
    hits included: what the reader asks the file system for, whether or not the disk is touched)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=80)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--buffer", type=int, default=64, help="runtime.sampler_buffer (ImageNet config: 64)")
    ap.add_argument("--reuse", type=int, default=8, help="runtime.sampler_reuse (ImageNet config: 8)")
    args = ap.parse_args()
    m = MetaConfig(n_way_min=5, n_way_max=20, k_shot=10, q_query=10)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        size = write_imagefolder(tmp / "src", args.classes, args.per_class)
        n = args.classes * args.per_class
        print(f"wrote {n} JPEGs ({size / n / 1024:.0f} KiB on average) in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        convert("imagefolder", tmp / "src", tmp / "shards", image_size=224)
        seconds = time.perf_counter() - t
        print(f"convert --image-size 224: {n / seconds:.0f} images/s ({seconds:.0f} s)")

        decoded = [0]
        real = readers.decode_image

        def counting(*a):
            decoded[0] += 1
            return real(*a)

        readers.decode_image = counting
        try:
            pool = ClassPool(tmp / "shards", "train", args.buffer, args.reuse, seed=0)
            sampler = EpisodeSampler(pool, list(range(args.classes)), m, seed=0)
            t, read0 = time.perf_counter(), bytes_read()
            delivered = sum(len(ep.support_x) + len(ep.query_x) for ep in (sampler.sample() for _ in range(args.episodes)))
            seconds, read = time.perf_counter() - t, bytes_read() - read0
        finally:
            readers.decode_image = real
        on_disk = sum(f.stat().st_size for f in (tmp / "shards").rglob("*") if f.is_file())
    print(f"shards on disk: {on_disk / 2**20:.0f} MiB ({on_disk / size:.2f}x the source JPEGs' {size / 2**20:.0f} MiB)")
    print(f"one sampler ({args.classes} classes of {args.per_class}, buffer {args.buffer}, reuse {args.reuse}, "
          f"{m.n_way_min}-{m.n_way_max}-way {m.k_shot}+{m.q_query}): {args.episodes / seconds:.2f} episodes/s, "
          f"{delivered / seconds:.0f} images/s, {decoded[0] / delivered:.2f} decodes per delivered image "
          f"({decoded[0]} decodes, {delivered} images delivered), {read / delivered / 1024:.1f} KiB read per delivered "
          "image")


if __name__ == "__main__":
    main()
