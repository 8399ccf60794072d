"""Peak memory of one meta-training step against the episode's size, with and without ``runtime.micro_batch``.

One step = what ``MetaTrainer.meta_step`` does per episode: read the support set (the generator's
statistics, ``taylor`` included), sample masks, score the query set through the masked backbone, backward.
Each configuration runs in a fresh process (peak RSS is per process), on a randomly initialised backbone
(the weights' values do not change the memory) with random images.

    python benchmarks/episode_memory.py [--backbone resnet50] [--size 224] [--ways 2 3 5 20] \\
        [--micro-batch 10] [--threads 2] [--default-allocator]

Without micro-batching every image's activations are kept for the backward pass, so the peak grows with
the episode; with it only one chunk's are (the others are recomputed), plus ~image-sized inputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch


def build_step(backbone_name: str, size: int, n_way: int, shots: int, micro_batch: int,
               device: str | torch.device = "cpu"):
    """A random backbone as a ``PrunableBackbone`` (on ``device``), a default STAMP module and a random
    ``n_way``-way episode of ``shots`` + ``shots`` images per class: what one meta-step works on."""
    from stamp_dist.config import MetaConfig
    from stamp_dist.data.episodes import Task, build_episode
    from stamp_dist.meta.objective import Stamp, StampSettings
    from stamp_dist.models.backbones import build_backbone
    from stamp_dist.pruning.prunable import PrunableBackbone

    record = {"backbone": backbone_name, "width": 16, "num_classes": 1000, "image_size": size,
              "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.manual_seed(0)  # the same weights and generator for every configuration: their losses are comparable
    backbone = build_backbone(backbone_name, 1000).to(device).eval().requires_grad_(False)
    net = PrunableBackbone.build(backbone, record)
    net.micro_batch = micro_batch
    stamp = Stamp(net.backbone.feature_dim, net.groups.sizes, StampSettings.of(MetaConfig())).to(device)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (2 * shots, 3, size, size), dtype=torch.uint8, generator=gen)
              for _ in range(n_way)]
    return net, stamp, build_episode(images, Task(list(range(n_way)), 0.3), k_shot=shots)


def one_step(backbone_name: str, size: int, n_way: int, shots: int, micro_batch: int, bounded: bool) -> dict:
    from stamp_dist.devices import bound_host_allocator
    from stamp_dist.meta.objective import episode_loss

    if bounded:  # what PrunableBackbone.load does for a micro-batched run
        bound_host_allocator()
    net, stamp, episode = build_step(backbone_name, size, n_way, shots, micro_batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    t0 = time.perf_counter()
    episode_loss(net, stamp, episode, torch.Generator().manual_seed(1)).loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"n_way": n_way, "images": 2 * shots * n_way, "micro_batch": micro_batch, "bounded": bounded, "peak_gib": peak,
            "before_step_gib": before, "step_gib": peak - before, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ways", type=int, nargs="+", default=[2, 3, 5, 20])
    ap.add_argument("--shots", type=int, default=10, help="support (= query) images per class")
    ap.add_argument("--micro-batch", type=int, default=10)
    ap.add_argument("--unbatched-max-images", type=int, default=60,
                    help="skip runs without micro-batching above this many images (they need ~0.2 GiB per "
                         "image at ResNet-50 224x224: 20-way would need ~80 GiB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--default-allocator", action="store_true",
                    help="also run micro-batched steps with glibc's default (adaptive) mmap threshold, which "
                         "stamp_dist fixes for micro-batched runs (devices.bound_host_allocator)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        n_way, micro_batch, bounded = map(int, args.one.split(","))
        print(json.dumps(one_step(args.backbone, args.size, n_way, args.shots, micro_batch, bool(bounded))))
        return

    print(f"{args.backbone} at {args.size}x{args.size}, {args.shots}+{args.shots} images per class, "
          f"{args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'way':>4} {'images':>7} {'micro_batch':>12} {'allocator':>10} {'peak GiB':>9} {'step GiB':>9} "
          f"{'seconds':>8}")
    runs = [(0, False), (args.micro_batch, True)] + ([(args.micro_batch, False)] if args.default_allocator else [])
    for micro_batch, bounded in runs:
        allocator = "bounded" if bounded else "default"
        for n_way in args.ways:
            if not micro_batch and 2 * args.shots * n_way > args.unbatched_max_images:
                print(f"{n_way:>4} {2 * args.shots * n_way:>7} {'off':>12} {allocator:>10}   skipped "
                      "(over --unbatched-max-images)")
                continue
            cmd = [sys.executable, __file__, "--backbone", args.backbone, "--size", str(args.size),
                   "--shots", str(args.shots), "--threads", str(args.threads),
                   "--one", f"{n_way},{micro_batch},{int(bounded)}"]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"{n_way:>4} {r['images']:>7} {micro_batch or 'off':>12} {allocator:>10} {r['peak_gib']:>9.2f} "
                  f"{r['step_gib']:>9.2f} {r['seconds']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
