"""Is the generator's mask really a function of the target? Two measurements on a meta-trained run:

1. Per-group Jaccard overlap of the kept channels chosen for two different targets (same budget).
2. Ablation: the same generator with its set embedding replaced by a constant — the mean task
   embedding over reference tasks, so the generator sees an "average task" whatever the target —
   against the set-conditioned generator, with the benchmark's protocol (same samples, fine-tuning
   and scoring as `stamp demo`; mean ± std over the configured seeds).

    python benchmarks/task_adaptivity.py -c configs/demo.yaml [key=value ...]

Needs a finished `stamp demo` (or meta-train) run for the config. Writes ``ablation.json`` beside
the demo results.
"""

from __future__ import annotations

import argparse
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
from stamp_dist.meta.objective import class_features
from stamp_dist.models.generator import keep_probability
from stamp_dist.pruning.hardmask import budget_mask


def embedding(gen, norm, x, n_way) -> torch.Tensor:
    with torch.no_grad():
        return gen.stamp.encoder(class_features(gen.backbone, norm(x), n_way))


def masks_from(gen, r, budget):
    with torch.no_grad():
        return budget_mask([keep_probability(a) for a in gen.stamp.generator(r, budget)], gen.cost, budget)


def mean_reference_embedding(cfg, gen, norm, tasks: int = 50) -> torch.Tensor:
    m = cfg.meta
    train, _ = split_classes(Manifest.load(cfg.data.reference).num_classes, m.val_classes, m.seed)
    sampler = EpisodeSampler(ClassPool(cfg.data.reference, seed=123), train, m.n_way_min, m.n_way_max,
                             cfg.bench.train_per_class, 0, 0.5, 0.5, seed=123)
    return torch.stack([embedding(gen, norm, (ep := sampler.sample()).support_x, ep.n_way)
                        for _ in range(tasks)]).mean(0)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(2)
    gen = load_generator(cfg.meta.out)
    norm = Normalization.of(gen.backbone_meta)
    budget = cfg.bench.budgets[0]
    r_const = mean_reference_embedding(cfg, gen, norm)

    samples = {(t, s): split_sample(t, cfg.bench.train_per_class, s) for t in cfg.bench.targets for s in cfg.bench.seeds}
    embeddings = {k: embedding(gen, norm, sample.x, sample.num_classes) for k, (sample, _) in samples.items()}
    masks = {k: masks_from(gen, r, budget) for k, r in embeddings.items()}

    t_a, t_b = cfg.bench.targets[:2]
    s0 = cfg.bench.seeds[0]
    per_group = [jaccard(a, b) for a, b in zip(masks[(t_a, s0)], masks[(t_b, s0)])]
    same_target = [jaccard(a, b) for a, b in zip(masks[(t_a, s0)], masks[(t_a, cfg.bench.seeds[-1])])]
    const_masks = masks_from(gen, r_const, budget)

    rows = []
    t0 = time.perf_counter()
    for (target, seed), (sample, evaluation) in samples.items():
        for variant, m in (("set-conditioned", masks[(target, seed)]), ("constant embedding", const_masks)):
            torch.manual_seed(seed)
            result = score_masks(cfg, gen, sample, evaluation, m, seed, "cpu", 0.0)
            rows.append({"target": Path(target).name, "variant": variant, "seed": seed, "top1": result["top1"],
                         "macs_ratio": result["macs_ratio"]})
            print(f"{Path(target).name} {variant} seed {seed}: top-1 {result['top1']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\nbudget {budget}; per-group Jaccard of kept channels, {Path(t_a).name} vs {Path(t_b).name} "
          f"(seed {s0} samples): " + ", ".join(f"{j:.2f}" for j in per_group) + f"  (mean {np.mean(per_group):.3f})")
    print(f"same target, two different samples (seeds {s0} and {cfg.bench.seeds[-1]}): mean Jaccard "
          f"{np.mean(same_target):.3f}")
    print(f"embedding distance digits↔shapes {float((embeddings[(t_a, s0)] - embeddings[(t_b, s0)]).norm()):.3f}, "
          f"target↔constant {float((embeddings[(t_a, s0)] - r_const).norm()):.3f}")
    print("\n| target | generator input | top-1 (mean ± std) | seeds |\n|---|---|---|---|")
    summary = []
    for target in cfg.bench.targets:
        for variant in ("set-conditioned", "constant embedding"):
            acc = np.array([r["top1"] for r in rows if r["target"] == Path(target).name and r["variant"] == variant])
            summary.append({"target": Path(target).name, "variant": variant, "mean": acc.mean(), "std": acc.std()})
            print(f"| {Path(target).name} | {variant} | {100 * acc.mean():.1f} ± {100 * acc.std():.1f} | {len(acc)} |")
    write_json(Path(cfg.bench.out) / "ablation.json",
               {"budget": budget, "jaccard_per_group": per_group, "jaccard_same_target": same_target,
                "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
