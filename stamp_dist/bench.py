"""Compare pruning methods on held-out targets at the same budget, fine-tuning and data.

One *cell* = (target, method, budget, seed): draw ``train_per_class`` images per class from the
target's train split (seeded), make the pruned model from the reference-pretrained backbone with
that sample, fine-tune on the same sample, and score on every other image of the target (the
rest of train + test). Each finished cell is cached as JSON and skipped on re-run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import write_json
from .config import StampConfig
from .data.readers import Normalization, load_split
from .finetune import finetune_model
from .meta.artifact import Generator
from .downstream import Target, build_pruned, check_budget, stamp_masks
from .pruning.baselines import dense_masks, random_masks
from .measure import count_macs_params, latency_ms


def split_sample(data: str | Path, per_class: int, seed: int):
    """``per_class`` random train images per class (the sample), and all remaining images (scoring)."""
    x, y, manifest = load_split(data, "train")
    tx, ty, _ = load_split(data, "test")
    gen = torch.Generator().manual_seed(seed)
    picked = torch.zeros(len(y), dtype=torch.bool)
    for c in range(manifest.num_classes):
        idx = (y == c).nonzero().squeeze(1)
        picked[idx[torch.randperm(len(idx), generator=gen)[:per_class]]] = True
    order = torch.argsort(y[picked], stable=True)  # class-grouped, as the set encoder expects
    sample = Target(x[picked][order], y[picked][order], manifest, Path(data))
    return sample, (torch.cat([x[~picked], tx]), torch.cat([y[~picked], ty]))


def method_masks(method: str, gen: Generator, sample: Target, budget: float, seed: int):
    if method == "dense":
        return dense_masks(gen.groups)
    if method == "random":
        return random_masks(gen.groups, gen.cost, budget, seed)
    return stamp_masks(gen, gen.stamp, sample, budget)


def score_masks(cfg: StampConfig, gen: Generator, sample: Target, evaluation: tuple, masks: list[torch.Tensor],
                seed: int, device, seconds_to_masks: float) -> dict:
    """Prune with ``masks``, fine-tune on the sample, score on ``evaluation``: the measured half of a cell."""
    t0 = time.perf_counter()
    model = build_pruned(gen.backbone, gen.backbone_meta, gen.groups, masks, sample)
    seconds_to_prune = seconds_to_masks + time.perf_counter() - t0
    size = gen.backbone_meta["image_size"]
    macs, params = count_macs_params(model, (3, size, size))
    dense_macs, dense_params = count_macs_params(gen.backbone, (3, size, size))
    result = finetune_model(model, (sample.x, sample.y), evaluation, Normalization.of(gen.backbone_meta),
                            cfg.finetune, seed, device)
    return {
        "top1": result["top1"], "top1_before_finetune": result["top1_before"],
        "params": params, "macs": macs, "macs_ratio": macs / dense_macs, "params_ratio": params / dense_params,
        "latency_ms_b64": latency_ms(model, (3, size, size), 64),
        "seconds_to_prune": seconds_to_prune, "seconds_to_finetune": result["seconds"],
        "train_images": len(sample.y), "eval_images": len(evaluation[1]),
    }


def run_cell(cfg: StampConfig, gen: Generator, target: str, method: str, budget: float, seed: int, device) -> dict:
    torch.manual_seed(seed)
    sample, evaluation = split_sample(target, cfg.bench.train_per_class, seed)
    t0 = time.perf_counter()
    masks = method_masks(method, gen, sample, budget, seed)
    result = score_masks(cfg, gen, sample, evaluation, masks, seed, device, time.perf_counter() - t0)
    return {"target": Path(target).name, "method": method, "budget": budget if method != "dense" else 1.0,
            "seed": seed, **result}


def run_bench(cfg: StampConfig, gen: Generator, device) -> list[dict]:
    b = cfg.bench
    out = Path(b.out)
    cells = [(t, m, budget, s) for t in b.targets for budget in b.budgets for m in b.methods for s in b.seeds]
    results, t0, done = [], time.perf_counter(), 0
    for i, (target, method, budget, seed) in enumerate(cells):
        check_budget(budget)
        path = out / Path(target).name / f"{method}_b{budget:g}_s{seed}.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
            continue
        result = run_cell(cfg, gen, target, method, budget, seed, device)
        write_json(path, result)
        results.append(result)
        done += 1
        eta = (time.perf_counter() - t0) / done * (len(cells) - i - 1)
        print(f"[{i + 1}/{len(cells)}] {result['target']} {method} b={budget:g} seed={seed}: "
              f"top-1 {result['top1']:.3f}, MACs {result['macs_ratio']:.3f} (ETA {eta:.0f} s)", flush=True)
    return results


def summarize(results: list[dict]) -> str:
    """A markdown table: mean ± std over seeds per (target, method, budget)."""
    rows: dict[tuple, list[dict]] = {}
    for r in results:
        rows.setdefault((r["target"], r["method"], r["budget"]), []).append(r)
    lines = ["| target | method | budget | top-1 (mean ± std) | seeds | params | MACs ratio | latency b64 (ms) "
             "| time to prune (s) | fine-tune time (s) |", "|" + "---|" * 10]
    for (target, method, budget), rs in rows.items():
        acc = np.array([r["top1"] for r in rs]) * 100
        mean = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
        lines.append(f"| {target} | {method} | {budget:g} | {acc.mean():.1f} ± {acc.std():.1f} | {len(rs)} "
                     f"| {mean('params') / 1e3:.0f}k | {mean('macs_ratio'):.3f} | {mean('latency_ms_b64'):.1f} "
                     f"| {mean('seconds_to_prune'):.2f} | {mean('seconds_to_finetune'):.1f} |")
    return "\n".join(lines)
