"""Is the generator's mask really a function of the target? Two measurements on a meta-trained run:

1. Per-group Jaccard overlap of the kept channels the generator prefers (``selection: top``, no sampling
   noise) for every pair of targets, and for two samples of one target (same budget).
2. Ablation: the same generator with everything it reads from the set replaced by a constant — the
   task embedding and the per-channel statistics averaged over reference tasks, so the generator
   sees an "average task" whatever the target — against the set-conditioned generator, with the
   benchmark's protocol (same samples, ``prune.allocation`` and ``prune.selection`` — a sampled mask draws
   the same noise for both generators — fine-tuning and scoring as `stamp demo`; mean ± std over the
   configured seeds, differences paired by seed), and on reference tasks with the meta-validation protocol
   (hard masks, prototype head + inner steps, no fine-tuning; paired over the same tasks): tasks on the
   held-out classes, and tasks drawn inside one class family (``meta.task_families``), where tasks
   need different channels. On reference tasks the set-conditioned mask is also compared with the
   mask generated for another task's set.

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
from stamp_dist.bench.samples import TargetData, pruning_batch, split_sample
from stamp_dist.downstream import build_pruned
from stamp_dist.finetune import finetune_model
from stamp_dist.training import Schedule
from stamp_dist.config import MetaConfig, load_config
from stamp_dist.data.episodes import ClassPool, EpisodeSampler, split_classes, task_families
from stamp_dist.data.manifest import Manifest
from stamp_dist.meta.artifact import load_generator
from stamp_dist.meta.objective import StampSettings, adapted_logits, hard_masks
from stamp_dist.meta.trainer import validation_episodes
from stamp_dist.meta.set_inputs import SetInputs


def read(gen, norm, x, n_way) -> SetInputs:
    return gen.stamp.read(gen.net, norm(x), n_way)


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
    task_cfg = MetaConfig(n_way_min=m.n_way_min, n_way_max=m.n_way_max, k_shot=cfg.bench.train_per_class,
                          q_query=0, budget_min=0.5, budget_max=0.5)
    sampler = EpisodeSampler(ClassPool(cfg.data.reference, seed=123), train, task_cfg, seed=123)
    reads = [read(gen, norm, (ep := sampler.sample()).support_x, ep.n_way) for _ in range(tasks)]
    constant = copy.deepcopy(gen.stamp)
    constant.encoder = ConstantEncoder(torch.stack([embedding(gen, r) for r in reads]).mean(0))
    stats = [torch.stack(s).mean(0) for s in zip(*(r.channel_stats for r in reads))]
    return constant, SetInputs(reads[0].features, stats)


def family_episodes(cfg, tasks: int, budget: float) -> list:
    """``tasks`` tasks drawn inside one family of the meta-training classes (``meta.task_families``: classes
    sharing a colour, texture or shape), on test-split images the generator never saw, at ``budget``.
    Such tasks need different channels from each other; the held-out classes are too few to form them."""
    m = cfg.meta
    manifest = Manifest.load(cfg.data.reference)
    train, _ = split_classes(manifest.num_classes, m.val_classes, m.seed)
    families = task_families(m.task_families, manifest, train, m.n_way_min)
    if not families:
        return []
    task_cfg = MetaConfig(n_way_min=m.n_way_min, n_way_max=m.n_way_max, k_shot=m.k_shot, q_query=m.q_query,
                          budget_min=budget, budget_max=budget, family_tasks=1.0)
    sampler = EpisodeSampler(ClassPool(cfg.data.reference, "test", seed=7), train, task_cfg, seed=7, families=families)
    return [sampler.sample() for _ in range(tasks)]


def paired_on_tasks(cfg, gen, norm, episodes, constant_stamp, constant_inputs) -> dict[str, np.ndarray]:
    """Per task (meta-validation protocol: hard masks at the task's budget, prototype head + inner steps,
    no fine-tuning): query accuracy with the mask generated from the task's own support set, minus that
    with the constant-input mask and minus that with the mask generated from the *next* task's set."""
    inputs = [read(gen, norm, ep.support_x, ep.n_way) for ep in episodes]

    def accuracy(ep, stamp, inp) -> float:
        masks = [k.float() for k in hard_masks(stamp, gen.net.cost, inp, ep.budget, allocation=cfg.prune.allocation)]  # top
        out = adapted_logits(gen.net, masks, norm(ep.support_x), ep.support_y, norm(ep.query_x),
                             ep.n_way, StampSettings.of(cfg.meta)).detach()
        return float((out.argmax(1) == ep.query_y).float().mean())

    own = np.array([accuracy(ep, gen.stamp, inputs[i]) for i, ep in enumerate(episodes)])
    constant = np.array([accuracy(ep, constant_stamp, constant_inputs) for ep in episodes])
    other = np.array([accuracy(ep, gen.stamp, inputs[(i + 1) % len(episodes)]) for i, ep in enumerate(episodes)])
    return {"own": own, "minus constant": own - constant, "minus other task": own - other}


def sem(d: np.ndarray) -> float:
    """Standard error of the mean of paired differences."""
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml")
    parser.add_argument("--reference-tasks", type=int, default=60,
                        help="held-out reference tasks for the paired comparison (more → smaller s.e.m.)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    gen = load_generator(cfg.meta.out)
    norm = gen.net.norm
    budget = cfg.bench.budgets[0]
    constant_stamp, constant_inputs = average_task(cfg, gen, norm)

    per_class = cfg.bench.train_per_class if isinstance(cfg.bench.train_per_class, int) else cfg.bench.train_per_class[0]
    samples = {(t, s): split_sample(TargetData.load(t), per_class, s, cfg.bench.eval_per_class)
               for t in cfg.bench.targets for s in cfg.bench.seeds}
    # As in `stamp bench`: the generator reads a pruning batch of the sample; the fine-tune uses all of it.
    batches = {k: pruning_batch(sample, cfg.prune.samples_per_class, k[1], torch.device("cpu"))
               for k, (sample, _) in samples.items()}
    inputs = {k: read(gen, norm, batch.x, batch.num_classes) for k, batch in batches.items()}
    allocation = gen.stamp.allocation_for(cfg.prune.allocation)
    p = cfg.prune
    # What the generator prefers (no sampling noise): for the overlap measurements.
    top = {k: hard_masks(gen.stamp, gen.net.cost, i, budget, allocation=allocation) for k, i in inputs.items()}
    const_top = hard_masks(constant_stamp, gen.net.cost, constant_inputs, budget, allocation=allocation)
    # What a user gets (the configured selection; a sampled mask draws the seed's noise for both inputs).
    masks = {k: hard_masks(gen.stamp, gen.net.cost, i, budget, allocation=allocation, selection=p.selection, seed=k[1])
             for k, i in inputs.items()}
    const_masks = {k: hard_masks(constant_stamp, gen.net.cost, constant_inputs, budget, allocation=allocation,
                                 selection=p.selection, seed=k[1]) for k in inputs}

    names = [Path(t).name for t in cfg.bench.targets]
    s0 = cfg.bench.seeds[0]
    pairs = {f"{Path(a).name} vs {Path(b).name}": [jaccard(x, y) for x, y in zip(top[(a, s0)], top[(b, s0)])]
             for i, a in enumerate(cfg.bench.targets) for b in cfg.bench.targets[i + 1:]}
    t_a = cfg.bench.targets[0]
    same_target = [jaccard(a, b) for a, b in zip(top[(t_a, s0)], top[(t_a, cfg.bench.seeds[-1])])]
    to_constant = {Path(t).name: float(np.mean([jaccard(a, b) for a, b in zip(top[(t, s0)], const_top)]))
                   for t in cfg.bench.targets}

    rows = []
    t0 = time.perf_counter()
    for (target, seed), (sample, evaluation) in samples.items():
        for variant, m in (("set-conditioned", masks[(target, seed)]), ("constant input", const_masks[(target, seed)])):
            torch.manual_seed(seed)
            model = build_pruned(gen.net, m, batches[(target, seed)])
            result = finetune_model(model, (sample.x, sample.y), evaluation, norm,
                                    Schedule.finetuning(cfg.finetune, seed), "cpu")
            rows.append({"target": Path(target).name, "variant": variant, "seed": seed, "top1": result["top1"],
                         "top1_before_finetune": result["top1_before"],
                         "macs_ratio": float(gen.net.cost.macs([k.float() for k in m]) / gen.net.cost.dense_macs)})
            print(f"{Path(target).name} {variant} seed {seed}: top-1 {result['top1']:.4f} "
                  f"(prototype head before fine-tuning {result['top1_before']:.4f}; "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)

    _, val = split_classes(Manifest.load(cfg.data.reference).num_classes, cfg.meta.val_classes, cfg.meta.seed)
    m = copy.deepcopy(cfg)
    m.meta.val_tasks = args.reference_tasks
    task_sets = {"held-out reference classes (random budgets)": validation_episodes(m, val),
                 f"reference family tasks (budget {budget})": family_episodes(cfg, args.reference_tasks, budget)}
    paired = {name: paired_on_tasks(cfg, gen, norm, eps, constant_stamp, constant_inputs)
              for name, eps in task_sets.items() if eps}
    print(f"\nbudget {budget}, prune.allocation {allocation}, prune.selection {p.selection}; per-group Jaccard of "
          f"the channels the generator prefers (top, seed {s0} samples):")
    for pair, per_group in pairs.items():
        print(f"  {pair}: " + ", ".join(f"{j:.2f}" for j in per_group) + f"  (mean {np.mean(per_group):.3f})")
    print(f"same target ({names[0]}), two different samples (seeds {s0} and {cfg.bench.seeds[-1]}): mean Jaccard "
          f"{np.mean(same_target):.3f}")
    print("mean Jaccard with the constant-input masks: " + ", ".join(f"{k} {v:.3f}" for k, v in to_constant.items()))
    emb = {Path(t).name: embedding(gen, inputs[(t, s0)]) for t in cfg.bench.targets}
    print("task embedding distances: " + ", ".join(f"{a}↔{b} {float((emb[a] - emb[b]).norm()):.3f}"
                                                  for i, a in enumerate(names) for b in names[i + 1:]))
    for name, d in paired.items():
        print(f"{name}, {len(d['own'])} tasks (hard masks, no fine-tuning): query accuracy {100 * d['own'].mean():.1f}; "
              + "; ".join(f"{k} {100 * d[k].mean():+.1f} ± {100 * sem(d[k]):.1f}" for k in ("minus constant",
                                                                                     "minus other task"))
              + " points (s.e.m.)")
    def column(target: str, variant: str, key: str) -> np.ndarray:  # one value per seed, in seed order
        return np.array([r[key] for r in rows if r["target"] == target and r["variant"] == variant])

    print("\n| target | generator input | top-1 after fine-tuning | top-1 before (prototype head) | seeds |\n"
          "|---|---|---|---|---|")
    summary = []
    for target in (Path(t).name for t in cfg.bench.targets):
        for variant in ("set-conditioned", "constant input"):
            acc, before = column(target, variant, "top1"), column(target, variant, "top1_before_finetune")
            summary.append({"target": target, "variant": variant, "mean": acc.mean(), "std": acc.std(),
                            "before_mean": before.mean(), "before_std": before.std()})
            print(f"| {target} | {variant} | {100 * acc.mean():.1f} ± {100 * acc.std():.1f} "
                  f"| {100 * before.mean():.1f} ± {100 * before.std():.1f} | {len(acc)} |")
        # Both variants share each seed's sample and fine-tuning run order, so compare them per seed.
        diff = {k: column(target, "set-conditioned", k) - column(target, "constant input", k)
                for k in ("top1", "top1_before_finetune")}
        summary.append({"target": target, "variant": "set minus constant (paired by seed)",
                        "mean": diff["top1"].mean(), "sem": sem(diff["top1"]),
                        "before_mean": diff["top1_before_finetune"].mean(), "before_sem": sem(diff["top1_before_finetune"])})
        print(f"| {target} | set − constant, paired by seed | {100 * diff['top1'].mean():+.1f} ± "
              f"{100 * sem(diff['top1']):.1f} (s.e.m.) | {100 * diff['top1_before_finetune'].mean():+.1f} ± "
              f"{100 * sem(diff['top1_before_finetune']):.1f} (s.e.m.) | {len(diff['top1'])} |")
    write_json(Path(cfg.bench.out) / "ablation.json",
               {"budget": budget, "allocation": allocation, "selection": p.selection, "jaccard_per_group": pairs,
                "jaccard_same_target": same_target,
                "jaccard_to_constant": to_constant, "reference_tasks": {name: {k: v.tolist() for k, v in d.items()} for name, d in paired.items()},
                "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
