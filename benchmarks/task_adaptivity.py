"""Is the generator's mask really a function of the target? Two measurements on a meta-trained run:

1. Per-group Jaccard overlap of the kept channels chosen for two different targets (same budget).
2. Ablation: the same generator with everything it reads from the set replaced by a constant — the
   task embedding and the per-channel statistics averaged over reference tasks, so the generator
   sees an "average task" whatever the target — against the set-conditioned generator, with the
   benchmark's protocol (same samples, fine-tuning and scoring as `stamp demo`; mean ± std over the
   configured seeds).

    python benchmarks/task_adaptivity.py -c configs/demo.yaml [key=value ...]

Needs a finished `stamp demo` (or meta-train) run for the config. Writes ``ablation.json`` beside
the demo results.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from stamp_dist.atomic import write_json
from stamp_dist.bench import score_masks, split_sample
from stamp_dist.config import load_config
from stamp_dist.data.episodes import ClassPool, EpisodeSampler, split_classes
from stamp_dist.data.manifest import Manifest
from stamp_dist.data.readers import Normalization
from stamp_dist.meta.artifact import load_generator
from stamp_dist.meta.objective import hard_masks
from stamp_dist.meta.set_inputs import SetInputs, read_set


def read(gen, norm, x, n_way) -> SetInputs:
    return read_set(gen.backbone, gen.groups, norm(x), n_way)


def embedding(gen, inputs: SetInputs) -> torch.Tensor:
    with torch.no_grad():
        return gen.stamp.encoder(inputs.features)


class ConstantEncoder(torch.nn.Module):
    """Stands in for the set encoder: returns the same embedding whatever the set."""

    def __init__(self, r: torch.Tensor):
        super().__init__()
        self.register_buffer("r", r)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.r


def average_task(cfg, gen, norm, tasks: int = 50):
    """The ablated generator and its input: the mean task embedding and the mean per-channel
    statistics over ``tasks`` reference tasks, fed to the same generator whatever the target."""
    m = cfg.meta
    train, _ = split_classes(Manifest.load(cfg.data.reference).num_classes, m.val_classes, m.seed)
    sampler = EpisodeSampler(ClassPool(cfg.data.reference, seed=123), train, m.n_way_min, m.n_way_max,
                             cfg.bench.train_per_class, 0, 0.5, 0.5, seed=123)
    reads = [read(gen, norm, (ep := sampler.sample()).support_x, ep.n_way) for _ in range(tasks)]
    constant = copy.deepcopy(gen.stamp)
    constant.encoder = ConstantEncoder(torch.stack([embedding(gen, r) for r in reads]).mean(0))
    stats = [torch.stack(s).mean(0) for s in zip(*(r.channel_stats for r in reads))]
    return constant, SetInputs(reads[0].features, stats)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    gen = load_generator(cfg.meta.out)
    norm = Normalization.of(gen.backbone_meta)
    budget = cfg.bench.budgets[0]
    constant_stamp, constant_inputs = average_task(cfg, gen, norm)

    samples = {(t, s): split_sample(t, cfg.bench.train_per_class, s) for t in cfg.bench.targets for s in cfg.bench.seeds}
    inputs = {k: read(gen, norm, sample.x, sample.num_classes) for k, (sample, _) in samples.items()}
    masks = {k: hard_masks(gen.stamp, gen.cost, i, budget) for k, i in inputs.items()}
    const_masks = hard_masks(constant_stamp, gen.cost, constant_inputs, budget)

    t_a, t_b = cfg.bench.targets[:2]
    s0 = cfg.bench.seeds[0]
    per_group = [jaccard(a, b) for a, b in zip(masks[(t_a, s0)], masks[(t_b, s0)])]
    same_target = [jaccard(a, b) for a, b in zip(masks[(t_a, s0)], masks[(t_a, cfg.bench.seeds[-1])])]
    to_constant = {Path(t).name: float(np.mean([jaccard(a, b) for a, b in zip(masks[(t, s0)], const_masks)]))
                   for t in (t_a, t_b)}

    rows = []
    t0 = time.perf_counter()
    for (target, seed), (sample, evaluation) in samples.items():
        for variant, m in (("set-conditioned", masks[(target, seed)]), ("constant input", const_masks)):
            torch.manual_seed(seed)
            result = score_masks(cfg, gen, sample, evaluation, m, seed, "cpu", 0.0)
            rows.append({"target": Path(target).name, "variant": variant, "seed": seed, "top1": result["top1"],
                         "top1_before_finetune": result["top1_before_finetune"], "macs_ratio": result["macs_ratio"]})
            print(f"{Path(target).name} {variant} seed {seed}: top-1 {result['top1']:.4f} "
                  f"(prototype head before fine-tuning {result['top1_before_finetune']:.4f}; "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)

    r_a, r_b = embedding(gen, inputs[(t_a, s0)]), embedding(gen, inputs[(t_b, s0)])
    print(f"\nbudget {budget}; per-group Jaccard of kept channels, {Path(t_a).name} vs {Path(t_b).name} "
          f"(seed {s0} samples): " + ", ".join(f"{j:.2f}" for j in per_group) + f"  (mean {np.mean(per_group):.3f})")
    print(f"same target, two different samples (seeds {s0} and {cfg.bench.seeds[-1]}): mean Jaccard "
          f"{np.mean(same_target):.3f}")
    print("mean Jaccard with the constant-input masks: " + ", ".join(f"{k} {v:.3f}" for k, v in to_constant.items()))
    print(f"task embedding distance {Path(t_a).name}↔{Path(t_b).name}: {float((r_a - r_b).norm()):.3f}")
    print("\n| target | generator input | top-1 after fine-tuning | top-1 before (prototype head) | seeds |\n"
          "|---|---|---|---|---|")
    summary = []
    for target in cfg.bench.targets:
        for variant in ("set-conditioned", "constant input"):
            mine = [r for r in rows if r["target"] == Path(target).name and r["variant"] == variant]
            acc = np.array([r["top1"] for r in mine])
            before = np.array([r["top1_before_finetune"] for r in mine])
            summary.append({"target": Path(target).name, "variant": variant, "mean": acc.mean(), "std": acc.std(),
                            "before_mean": before.mean(), "before_std": before.std()})
            print(f"| {Path(target).name} | {variant} | {100 * acc.mean():.1f} ± {100 * acc.std():.1f} "
                  f"| {100 * before.mean():.1f} ± {100 * before.std():.1f} | {len(acc)} |")
    write_json(Path(cfg.bench.out) / "ablation.json",
               {"budget": budget, "jaccard_per_group": per_group, "jaccard_same_target": same_target,
                "jaccard_to_constant": to_constant, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
