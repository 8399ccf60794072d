"""What a pruned network buys at equal MACs: measured latency and training throughput, method by method.

Prunes the demo's backbone for one target with each method at one MACs budget (`stamp_dist.prune_with`,
the artifact `stamp prune --method` writes), then measures, side by side in one run and interleaved in
rounds (so drift in the machine's speed hits every model alike): eval latency at a batch size (median),
the speed-up over dense divided by the MACs reduction (1.0 = the MACs saving turns fully into time),
and fine-tuning throughput (SGD steps of the fine-tune batch size, images/s). ``magnitude`` is uniform
pruning with Torch-Pruning's magnitude importance; ``stamp`` uses the generator's default allocation
and ``stamp-learned`` the learned one (``prune.allocation=learned``), both at a MACs budget;
``stamp-latency`` prunes at the same fraction of the dense network's *measured latency*
(``prune.budget_kind=latency`` at ``--batch`` images: pruning/latency.py; the table is measured once
and cached next to the generator's backbone). ``--stat min`` (default) times every model as the latency
table does: the fastest pass of each round, the fastest round.

    stamp demo -c configs/demo.yaml    # the backbone and generator this reads
    python benchmarks/pruned_speed.py [--budget 0.25] [--target runs/demo/data/targets/digits] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import stamp_dist
from stamp_dist.config import load_config
from stamp_dist.measure import CLOCKS, latency_ms
from stamp_dist.pruning.latency import timing_clock

METHODS = {"dense": ("dense", []), "random": ("random", []), "magnitude": ("magnitude", []),
           "stamp": ("stamp", []), "stamp-learned": ("stamp", ["prune.allocation=learned"]),
           "stamp-latency": ("stamp", ["prune.budget_kind=latency"])}


def train_throughput(model: torch.nn.Module, input_size: tuple[int, int, int], batch: int, steps: int,
                     clock: str = "wall") -> float:
    """Images per second of SGD steps (forward, cross-entropy, backward, update) on random images (``clock``: see
    ``stamp_dist.measure.time_ms``)."""
    now = CLOCKS[clock]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, *input_size)
    y = torch.randint(0, model.fc.out_features, (batch,))
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            t = now()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return batch * steps / (now() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="configs/demo.yaml")
    ap.add_argument("--target", default="runs/demo/data/targets/digits")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=64, help="latency batch size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stat", choices=("min", "median"), default="min",
                    help="per round: the fastest or the median of 10 passes; over rounds likewise")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="auto: as latency tables time (process CPU time at 1 thread, else wall time)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = timing_clock(torch.device("cpu")) if args.clock == "auto" else args.clock
    models, reports = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ["dense", *(m for m in args.methods if m != "dense")]:  # dense: the reference
            method, overrides = METHODS[label]
            cfg = load_config(args.config, ["runtime.device=cpu", f"prune.latency_batch={args.batch}", *overrides])
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
                latency[label].append(latency_ms(model, size, args.batch, repeats=10, stat=args.stat, clock=clock))
                throughput[label].append(train_throughput(model, size, batch, steps=20, clock=clock))
    pick = np.min if args.stat == "min" else np.median
    dense = float(pick(latency["dense"]))
    print(f"{args.target}, budget {args.budget}, {size[1]}x{size[2]}, CPU {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}; {args.stat} of {args.rounds} interleaved rounds, "
          f"{clock} clock")
    print(f"| method | budget kind | MACs ratio | latency b{args.batch} (ms) | latency ratio | predicted latency ratio "
          f"| speed-up | speed-up ÷ MACs reduction | vs uniform magnitude | fine-tune images/s (batch {batch}) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    uniform = float(pick(latency["magnitude"])) if "magnitude" in latency else float("nan")
    for label in models:
        lat, r = float(pick(latency[label])), reports[label]
        predicted = f"{r['latency_ratio_predicted']:.3f}" if "latency_ratio_predicted" in r else "–"
        print(f"| {label} | {r.get('budget_kind', 'macs')} | {r['macs_ratio']:.3f} | {lat:.1f} | {lat / dense:.3f} | "
              f"{predicted} | {dense / lat:.2f}× | {dense / lat * r['macs_ratio']:.2f} | {lat / uniform:.2f}× | "
              f"{np.median(throughput[label]):.0f} |")


if __name__ == "__main__":
    main()
