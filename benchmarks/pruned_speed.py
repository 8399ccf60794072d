"""What a pruned network buys at equal MACs: measured latency and training throughput, method by method.

Prunes the demo's backbone for one target with each method at one MACs budget (`stamp_dist.prune_with`,
the artifact `stamp prune --method` writes), then measures, side by side in one run and interleaved in
rounds (so drift in the machine's speed hits every model alike): eval latency at a batch size (median),
the speed-up over dense divided by the MACs reduction (1.0 = the MACs saving turns fully into time),
and fine-tuning throughput (SGD steps of the fine-tune batch size, images/s). ``magnitude`` is uniform
pruning with Torch-Pruning's magnitude importance; ``stamp`` uses the generator's default allocation
and ``stamp-learned`` the learned one (``prune.allocation=learned``).

    stamp demo -c configs/demo.yaml    # the backbone and generator this reads
    python benchmarks/pruned_speed.py [--budget 0.25] [--target runs/demo/data/targets/digits] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import stamp_dist
from stamp_dist.config import load_config
from stamp_dist.measure import latency_ms

METHODS = {"dense": ("dense", []), "random": ("random", []), "magnitude": ("magnitude", []),
           "stamp": ("stamp", []), "stamp-learned": ("stamp", ["prune.allocation=learned"])}


def train_throughput(model: torch.nn.Module, input_size: tuple[int, int, int], batch: int, steps: int) -> float:
    """Images per second of SGD steps (forward, cross-entropy, backward, update) on random images."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, *input_size)
    y = torch.randint(0, model.fc.out_features, (batch,))
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/demo.yaml")
    ap.add_argument("--target", default="runs/demo/data/targets/digits")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=64, help="latency batch size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models, reports = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (method, overrides) in METHODS.items():
            cfg = load_config(args.config, ["runtime.device=cpu", *overrides])
            out = Path(tmp) / label
            reports[label] = stamp_dist.prune_with(method, args.target, args.budget, out, cfg,
                                                   generator=cfg.meta.out, device="cpu")
            models[label], spec = stamp_dist.load_pruned(out)
        size = tuple(spec.input_size)
        batch = load_config(args.config, []).finetune.batch_size
        latency = {k: [] for k in models}
        throughput = {k: [] for k in models}
        for _ in range(args.rounds):
            for label, model in models.items():
                latency[label].append(latency_ms(model, size, args.batch, repeats=10))
                throughput[label].append(train_throughput(model, size, batch, steps=20))
    dense = float(np.median(latency["dense"]))
    print(f"{args.target}, budget {args.budget}, {size[1]}x{size[2]}, CPU {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}; median of {args.rounds} interleaved rounds")
    print(f"| method | MACs ratio | latency b{args.batch} (ms) | speed-up | speed-up ÷ MACs reduction "
          f"| vs uniform magnitude | fine-tune images/s (batch {batch}) |")
    print("|---|---|---|---|---|---|---|")
    uniform = float(np.median(latency["magnitude"]))
    for label in models:
        lat, macs = float(np.median(latency[label])), reports[label]["macs_ratio"]
        print(f"| {label} | {macs:.3f} | {lat:.1f} | {dense / lat:.2f}× | {dense / lat * macs:.2f} | "
              f"{lat / uniform:.2f}× | {np.median(throughput[label]):.0f} |")


if __name__ == "__main__":
    main()
