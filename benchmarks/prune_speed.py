"""Time to produce a pruned model for a new target, and what the pruned model buys (latency vs MACs).

For a backbone (default ResNet-18 at 32×32) this builds a generator artifact (encoder + generator at
their configured sizes; the weights' values do not change the work done, so the generator is not
trained here), then calls `stamp_dist.prune` for a 10-class target with no adaptation steps and
reports, per budget: seconds to produce the pruned model (artifact load → encode → masks → surgery,
as `prune` measures it; the latency measurement after it is excluded), the whole call's wall time,
MACs and params ratios, and measured batch-64 latency of pruned vs dense, median of 20 runs; and the
process's peak RSS. A large target (``--classes``, ``--per-class``) with ``--micro-batch`` shows that
pruning's memory is bounded by what it reads (``--samples-per-class`` per class), in chunks.

    python benchmarks/prune_speed.py [--backbone resnet18] [--budgets 0.5 0.25 0.1] [--threads 2]
    python benchmarks/prune_speed.py --backbone resnet50 --size 224 --classes 100 --per-class 100 \
        --budgets 0.25 --repeats 1 --micro-batch 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import stamp_dist
from stamp_dist.config import MetaConfig, StampConfig
from stamp_dist.data.shards import PerClassShardWriter
from stamp_dist.meta.artifact import save_generator
from stamp_dist.meta.objective import Stamp, StampSettings
from stamp_dist.models.backbones import build_backbone
from stamp_dist.pruning.prunable import PrunableBackbone


def make_artifact(directory: Path, backbone_name: str, size: int) -> None:
    record = {"backbone": backbone_name, "width": 16, "num_classes": 100, "image_size": size,
              "mean": [0.5] * 3, "std": [0.25] * 3}
    net = PrunableBackbone.build(build_backbone(backbone_name, 100).eval(), record)
    meta = MetaConfig()
    stamp = Stamp(net.backbone.feature_dim, net.groups.sizes, StampSettings.of(meta))
    save_generator(directory, stamp, net, dataclasses.asdict(meta), 0, {})


def make_target(directory: Path, size: int, classes: int = 10, per_class: int = 10) -> None:
    rng = np.random.default_rng(0)
    writer = PerClassShardWriter(directory, [str(c) for c in range(classes)], size)
    for c in range(classes):
        for _ in range(per_class):
            writer.add("train", c, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    writer.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="prune calls per budget (median reported)")
    parser.add_argument("--classes", type=int, default=10, help="target classes")
    parser.add_argument("--per-class", type=int, default=10, help="target images per class")
    parser.add_argument("--samples-per-class", type=int, default=10, help="prune.samples_per_class")
    parser.add_argument("--micro-batch", type=int, default=0, help="runtime.micro_batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_artifact(tmp / "generator", args.backbone, args.size)
        make_target(tmp / "target", args.size, args.classes, args.per_class)
        cfg = StampConfig()
        cfg.prune.samples_per_class, cfg.runtime.micro_batch = args.samples_per_class, args.micro_batch
        for budget in args.budgets:
            reports, walls = [], []
            for i in range(args.repeats):
                t = time.perf_counter()
                reports.append(stamp_dist.prune_with("stamp", tmp / "target", budget, tmp / f"out-{budget}-{i}", cfg,
                                                     generator=tmp / "generator", device="cpu"))
                walls.append(time.perf_counter() - t)
            r = reports[-1]
            rows.append({"budget": budget, "seconds_to_prune": float(np.median([x["seconds_to_prune"] for x in reports])),
                         "wall_seconds_with_report": float(np.median(walls)), "macs_ratio": r["macs_ratio"],
                         "params_ratio": r["params_ratio"], "latency_ms_b64": r["latency_ms_b64"],
                         "dense_latency_ms_b64": r["dense_latency_ms_b64"]})
    print(f"{args.backbone} at {args.size}×{args.size}, target {args.classes} classes × {args.per_class} images, "
          f"{args.samples_per_class} read per class, micro-batch {args.micro_batch or 'off'}, no adaptation steps; "
          f"CPU: {platform.processor() or platform.machine()}, torch threads {args.threads}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print("| budget | time to pruned model (s) | prune() wall incl. latency report (s) | MACs ratio | params ratio "
          "| latency b64 pruned (ms) | dense (ms) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']:g} | {r['seconds_to_prune']:.2f} | {r['wall_seconds_with_report']:.2f} | "
              f"{r['macs_ratio']:.3f} | {r['params_ratio']:.3f} | {r['latency_ms_b64']:.1f} | "
              f"{r['dense_latency_ms_b64']:.1f} | {r['dense_latency_ms_b64'] / r['latency_ms_b64']:.2f}× |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
