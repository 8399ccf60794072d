"""The ImageNet data path on a generated ImageNet-like set: conversion, what one sampler delivers, pretraining.

1. Writes an ImageFolder of JPEGs at ImageNet's typical sizes (sides 250-500 px, any aspect ratio;
   smooth random content, so files have realistic JPEG sizes): ``--classes`` × ``--per-class`` images
   (+ ``--test-per-class`` in val/).
2. Converts it as the ImageNet recipe does: ``stamp data convert --from imagefolder SRC OUT --image-size
   224``. Since issue 13 the JPEGs are stored as they came (readers resize the shorter side to 256 and crop
   the centre 224, torchvision's eval transform); before, they were resized + cropped and re-encoded as PNG.
3. Samples meta-training episodes from the shards with one ``ClassPool`` + ``EpisodeSampler`` — what one
   Ray sampler actor runs — at the ImageNet config's buffer (64 images per class, reuse 8) and task
   shape (5-20-way, 10+10), counting image decodes and the bytes read (``/proc/self/io``).
4. With ``--pretrain-epochs N``: ``stamp pretrain`` (ConvNet width 8) on the converted set twice, in memory
   (``runtime.data_memory_mb`` large) and streamed from the shards (``runtime.data_memory_mb=0``), each in
   its own process: peak RSS, wall time, and whether the weights are identical.

Reports conversion images/s, shard bytes on disk against the source JPEGs, episodes/s and images/s of the
sampler, decodes and KiB read per delivered image (each image in an episode is "delivered"; a class
buffer refill decodes only the images it keeps, and since the shard indexes it also reads only those).

    python benchmarks/imagenet_like_data.py [--classes 100] [--per-class 80] [--episodes 100]
    python benchmarks/imagenet_like_data.py --classes 20 --per-class 100 --test-per-class 10 --episodes 0 --pretrain-epochs 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stamp_dist.config import MetaConfig
from stamp_dist.data import readers
from stamp_dist.data.convert import convert
from stamp_dist.data.episodes import ClassPool, EpisodeSampler
from stamp_dist.data.shards import to_rgb_image


def write_imagefolder(root: Path, classes: int, per_class: int, seed: int = 0, test_per_class: int = 0) -> int:
    """``classes`` folders of ``per_class`` JPEGs (+ ``test_per_class`` in val/) of random size and smooth random
    content; returns bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    for split, c in [(s, c) for s in ("train", "val")[:1 + bool(test_per_class)] for c in range(classes)]:
        folder = root / split / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class if split == "train" else test_per_class):
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


def pretrain_peak_rss(data: Path, out: Path, epochs: int, memory_mb: int) -> tuple[float, float]:
    """``stamp pretrain`` in a child process; returns (its peak RSS in MiB, wall seconds)."""
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    args = ["pretrain", "-c", str(config), f"data.reference={data}", f"pretrain.out={out}", "model.backbone=convnet",
            "model.width=8", f"pretrain.epochs={epochs}", "pretrain.batch_size=64", "runtime.device=cpu",
            f"runtime.data_memory_mb={memory_mb}"]
    t = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", "import sys; from stamp_dist.cli import main; sys.exit(main())",
                              *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise RuntimeError(f"stamp pretrain failed (status {status})")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=80)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--buffer", type=int, default=64, help="runtime.sampler_buffer (ImageNet config: 64)")
    ap.add_argument("--reuse", type=int, default=8, help="runtime.sampler_reuse (ImageNet config: 8)")
    ap.add_argument("--test-per-class", type=int, default=0, help="JPEGs per class in val/ (pretraining needs some)")
    ap.add_argument("--pretrain-epochs", type=int, default=0, help="also pretrain in memory and streamed (0: skip)")
    args = ap.parse_args()
    m = MetaConfig(n_way_min=5, n_way_max=20, k_shot=10, q_query=10)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        size = write_imagefolder(tmp / "src", args.classes, args.per_class, test_per_class=args.test_per_class)
        n = args.classes * (args.per_class + args.test_per_class)
        print(f"wrote {n} JPEGs ({size / n / 1024:.0f} KiB on average) in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        convert("imagefolder", tmp / "src", tmp / "shards", image_size=224)
        seconds = time.perf_counter() - t
        print(f"convert --image-size 224: {n / seconds:.0f} images/s ({seconds:.0f} s)")

        on_disk = sum(f.stat().st_size for f in (tmp / "shards").rglob("*") if f.is_file())
        print(f"shards on disk: {on_disk / 2**20:.0f} MiB ({on_disk / size:.2f}x the source JPEGs' "
              f"{size / 2**20:.0f} MiB)")
        decode_costs(sorted((tmp / "src" / "train").rglob("*.jpg"))[:200])
        if args.episodes:
            sample_episodes(tmp / "shards", args, m)
        if args.pretrain_epochs:
            runs = {}
            for name, memory_mb in (("in memory", 1 << 20), ("streamed", 0)):
                runs[name] = tmp / name.replace(" ", "_")
                rss, seconds = pretrain_peak_rss(tmp / "shards", runs[name], args.pretrain_epochs, memory_mb)
                print(f"pretrain {name} (runtime.data_memory_mb={memory_mb}): peak RSS {rss:.0f} MiB, {seconds:.0f} s")
            same = len({(d / "backbone.safetensors").read_bytes() for d in runs.values()}) == 1
            print(f"weights identical in memory and streamed: {same}")


def decode_costs(jpegs: list[Path], size: int = 224) -> None:
    """Per image: decoding what a shard holds now (the original JPEG, resized and cropped when read) against
    what it held before (a PNG written at ``size``), interleaved so both see the same machine load; and how far
    ``Image.draft`` moves the pixels from a full decode (torchvision's exact result)."""
    import io

    pngs = []
    for path in jpegs:
        buf = io.BytesIO()
        to_rgb_image(Image.open(path), size).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    jpeg_s = png_s = 0.0
    diffs = []
    for path, png in zip(jpegs, pngs):
        data = path.read_bytes()
        t = time.perf_counter()
        got = np.asarray(readers.eval_crop(Image.open(io.BytesIO(data)), size, readers.resize_for(size)))
        jpeg_s += time.perf_counter() - t
        t = time.perf_counter()
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        png_s += time.perf_counter() - t
        full = Image.open(io.BytesIO(data))
        full.format = None  # eval_crop drafts JPEGs only: this one is decoded in full
        diffs.append(np.abs(got.astype(int) - np.asarray(readers.eval_crop(full, size, readers.resize_for(size)))))
    n = len(jpegs)
    print(f"decode per image ({n} images): original JPEG + resize 256 + crop {size}: {1e3 * jpeg_s / n:.1f} ms; "
          f"the {size} px PNG shards held before: {1e3 * png_s / n:.1f} ms; Image.draft vs a full decode: mean "
          f"|difference| {np.mean([d.mean() for d in diffs]):.2f} of 255 (drafted: "
          f"{sum(d.any() for d in diffs)} of {n})")


def sample_episodes(shards: Path, args, m: MetaConfig) -> None:
    decoded = [0]
    real = readers.decode_image

    def counting(*a):
        decoded[0] += 1
        return real(*a)

    readers.decode_image = counting
    try:
        pool = ClassPool(shards, "train", args.buffer, args.reuse, seed=0)
        sampler = EpisodeSampler(pool, list(range(args.classes)), m, seed=0)
        t, read0 = time.perf_counter(), bytes_read()
        delivered = sum(len(ep.support_x) + len(ep.query_x) for ep in (sampler.sample() for _ in range(args.episodes)))
        seconds, read = time.perf_counter() - t, bytes_read() - read0
    finally:
        readers.decode_image = real
    print(f"one sampler ({args.classes} classes of {args.per_class}, buffer {args.buffer}, reuse {args.reuse}, "
          f"{m.n_way_min}-{m.n_way_max}-way {m.k_shot}+{m.q_query}): {args.episodes / seconds:.2f} episodes/s, "
          f"{delivered / seconds:.0f} images/s, {decoded[0] / delivered:.2f} decodes per delivered image "
          f"({decoded[0]} decodes, {delivered} images delivered), {read / delivered / 1024:.1f} KiB read per "
          "delivered image")


if __name__ == "__main__":
    main()
