"""How well the measured latency model predicts a pruned network's latency: error over random masks.

Builds (or reads) the latency table of a backbone (``stamp_dist.pruning.latency``; measuring it is timed
and reported), then draws ``--masks`` random masks (per-group keep fractions uniform in [0.1, 1], from a
seed the table's calibration masks do not use), prunes each physically (the project's surgery), times
it end to end (the fastest of 7 eval forward passes at ``--batch`` in ``--rounds`` interleaved rounds, as the
table's calibration networks are timed)
and compares with the model's prediction. Counts are rounded to the table's grid (what a latency budget's hard
masks keep) unless ``--off-grid``. Prints each mask's numbers and the max / mean |error|.

    python benchmarks/latency_model.py --backbone runs/demo/pretrain --batch 64        # ResNet-20 demo, 32 px
    python benchmarks/latency_model.py --backbone resnet18 --size 224 --batch 8         # random init
    python benchmarks/latency_model.py --backbone resnet50 --size 224 --batch 8 --threads 1
    python benchmarks/latency_model.py --backbone resnet50 --size 224 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning import latency
from stamp_dist.pruning.latency import device_name, latency_model, networks_ms, random_masks
from stamp_dist.pruning.prunable import PrunableBackbone
from stamp_dist.pruning.surgery import prune_model


def backbone(spec: str, size: int, device: str) -> PrunableBackbone:
    if Path(spec).is_dir():
        return PrunableBackbone.load(spec, device)
    model = build_backbone(spec, 1000, 64, size).to(device).eval().requires_grad_(False)
    return PrunableBackbone.build(model, {"image_size": size, "backbone": spec})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="runs/demo/pretrain", help="a pretrain directory or a built-in name")
    ap.add_argument("--size", type=int, default=224, help="image size of a built-in backbone")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--masks", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the fastest counts)")
    ap.add_argument("--repeats", type=int, default=latency.REPEATS,
                    help="timed passes per layer point and per network and round (the fastest counts)")
    ap.add_argument("--off-grid", action="store_true", help="counts anywhere (not only on the table's grid)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: the device the table and the networks are timed on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-dir", help="where the table is cached (default: the pretrain directory; none for a "
                    "built-in backbone)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    latency.REPEATS = args.repeats
    net = backbone(args.backbone, args.size, args.device)
    directory = args.table_dir or (args.backbone if Path(args.backbone).is_dir() else None)
    t = time.perf_counter()
    model = latency_model(net.backbone, net.groups, net.input_size, args.batch, directory)
    made = time.perf_counter() - t
    print(f"{args.backbone} at {net.input_size[1]}x{net.input_size[2]}, batch {args.batch}, {args.threads} thread(s), "
          f"{device_name(net.device)}, torch {torch.__version__}, {model.table['environment']['clock']} clock; "
          f"table {model.path or '(not cached)'} {'measured' if made > 1 else 'read'} in {made:.0f} s; calibration "
          f"scales (compute, memory) {model.scales[0]:.3f}, {model.scales[1]:.3f}, offset {model.offset:.2f} ms; "
          f"predicted dense {model.dense:.1f} ms")
    rng = np.random.default_rng(args.seed)
    masks = [random_masks(net.groups, rng, on_grid=not args.off_grid) for _ in range(args.masks)]
    counts = [torch.tensor([float(m.sum()) for m in keep], dtype=torch.float64) for keep in masks]
    predicted = [float(model(c)) for c in counts]
    nets = [net.backbone] + [prune_model(net.backbone, net.groups, keep) for keep in masks]
    dense, *measured = networks_ms(nets, net.input_size, args.batch, args.rounds)
    print(f"measured dense {dense:.1f} ms (fastest of {args.rounds} rounds of {args.repeats} passes, interleaved with "
          f"the pruned networks; load average {os.getloadavg()[0]:.1f})")
    print("| mask | kept channels | predicted (ms) | measured (ms) | error |")
    print("|---|---|---|---|---|")
    errors = []
    for k, (c, p, m) in enumerate(zip(counts, predicted, measured)):
        errors.append(p / m - 1)
        print(f"| {k} | {int(c.sum())}/{sum(net.groups.sizes)} | {p:.2f} | {m:.2f} | {100 * errors[-1]:+.1f}% |")
    e = np.abs(errors)
    print(f"{args.masks} masks: max |error| {100 * e.max():.1f}%, mean |error| {100 * e.mean():.1f}% "
          f"({platform.machine()}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
