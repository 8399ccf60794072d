"""The valid range of every numeric config key, checked when a config is loaded.

Every int and float field of ``StampConfig`` (lists element by element, ``None`` skipped) has an entry
here; ``tests/test_ranges.py`` fails when a numeric key has none. Floats must be finite. Upper bounds
exist only where a value sizes an allocation made before anything else could fail (network widths,
encoder sizes): a typo there would otherwise exhaust memory instead of raising an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from .errors import StampError

SEED_MAX = 2**63 - 1  # numpy and torch both accept seeds in [0, 2^63)


@dataclass(frozen=True)
class Range:
    lo: float | None = None  # None: unbounded
    hi: float | None = None
    lo_open: bool = False  # True: lo itself is outside the range
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"{'<' if self.hi_open else '<='} {self.hi}" if self.hi is not None else "any number"


def at_least(lo: float) -> Range:
    return Range(lo)


def above(lo: float) -> Range:
    return Range(lo, lo_open=True)


FRACTION = Range(0.0, 1.0, lo_open=True)  # MACs budgets: (0, 1]
PROBABILITY = Range(0, 1)
MOMENTUM = Range(0, 1, hi_open=True)
SEED = Range(0, SEED_MAX)
COUNT = at_least(1)
NON_NEGATIVE = at_least(0)
POSITIVE = above(0)

RANGES: dict[str, Range] = {
    "seed": SEED,
    "data.seed": SEED,
    "data.demo_classes": at_least(2),
    "data.demo_fractal_classes": at_least(0),
    "runtime.micro_batch": at_least(0),
    "data.demo_train_per_class": COUNT,
    "data.demo_test_per_class": COUNT,
    "model.width": Range(1, 1024),
    "pretrain.epochs": COUNT,
    "pretrain.batch_size": at_least(2),  # BatchNorm cannot train on one image
    "pretrain.lr": POSITIVE,
    "pretrain.momentum": MOMENTUM,
    "pretrain.weight_decay": NON_NEGATIVE,
    "pretrain.seed": SEED,
    "pretrain.num_threads": NON_NEGATIVE,
    "meta.steps": COUNT,
    "meta.meta_batch": COUNT,
    "meta.n_way_min": at_least(2),
    "meta.n_way_max": at_least(2),
    "meta.k_shot": COUNT,
    "meta.q_query": COUNT,
    "meta.inner_steps": NON_NEGATIVE,
    "meta.inner_lr": NON_NEGATIVE,
    "meta.budget_min": FRACTION,
    "meta.budget_max": FRACTION,
    "meta.lr": POSITIVE,
    "meta.weight_decay": NON_NEGATIVE,
    "meta.grad_clip": POSITIVE,
    "meta.tau": POSITIVE,
    "meta.prior_weight": NON_NEGATIVE,
    "meta.budget_weight": NON_NEGATIVE,
    "meta.encoder_dim": Range(1, 8192),
    "meta.encoder_heads": Range(1, 256),
    "meta.encoder_inducing": Range(1, 4096),
    "meta.generator_hidden": Range(1, 8192),
    "meta.family_tasks": PROBABILITY,
    "meta.task_transform_prob": PROBABILITY,
    "meta.prior_keep": Range(0, 1, lo_open=True, hi_open=True),  # a Bernoulli rate strictly inside (0, 1)
    "meta.val_every": COUNT,
    "meta.val_tasks": COUNT,
    "meta.val_classes": at_least(2),  # a validation task needs two classes
    "meta.checkpoint_every": COUNT,
    "meta.keep_last": COUNT,
    "meta.seed": SEED,
    "prune.budget": FRACTION,
    "prune.adapt_steps": NON_NEGATIVE,
    "prune.adapt_lr": POSITIVE,
    "prune.samples_per_class": COUNT,
    "prune.round_to": COUNT,
    "prune.latency_batch": COUNT,
    "meta.latency_batch": COUNT,
    "prune.seed": SEED,
    "prune.warmup_epochs": COUNT,
    "finetune.epochs": COUNT,
    "finetune.batch_size": at_least(2),
    "finetune.lr": POSITIVE,
    "finetune.backbone_lr": NON_NEGATIVE,  # 0 trains only the head, 1 every parameter at finetune.lr
    "finetune.momentum": MOMENTUM,
    "finetune.weight_decay": NON_NEGATIVE,
    "finetune.train_per_class": NON_NEGATIVE,  # 0 = every training image
    "finetune.seed": SEED,
    "runtime.num_workers": COUNT,
    "runtime.cpus_per_worker": COUNT,
    "runtime.sampler_actors": COUNT,
    "runtime.prefetch": NON_NEGATIVE,
    "runtime.zero_stage": Range(0, 3),
    "runtime.max_failures": NON_NEGATIVE,
    "runtime.num_cpus": COUNT,
    "runtime.sampler_cpus": NON_NEGATIVE,
    "runtime.sampler_buffer": COUNT,
    "runtime.sampler_reuse": COUNT,
    "runtime.sampler_max_restarts": NON_NEGATIVE,
    "runtime.data_memory_mb": NON_NEGATIVE,
    "runtime.data_workers": NON_NEGATIVE,
    "runtime.checkpoints_kept": COUNT,
    "bench.budgets": FRACTION,
    "bench.seeds": SEED,
    "bench.train_per_class": NON_NEGATIVE,  # 0 = the whole train split
    "bench.epochs": COUNT,
    "bench.seed_counts": COUNT,
    "bench.eval_per_class": NON_NEGATIVE,
    "bench.gate_steps": COUNT,
    "bench.gate_lr": POSITIVE,
    "bench.gate_batch": at_least(2),
    "bench.num_threads": NON_NEGATIVE,
    "slurm.nodes": COUNT,
    "slurm.cpus_per_task": NON_NEGATIVE,  # 0 = the cluster's default
    "slurm.gpus_per_node": NON_NEGATIVE,
    "slurm.signal_seconds": NON_NEGATIVE,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_numbers(cfg: Any) -> None:
    """Raise a ``StampError`` naming the key for the first number outside its range (or not finite)."""
    for key, valid in RANGES.items():
        value = OmegaConf.select(cfg, key)
        values = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]
        for v in values:
            if v is None or not _is_number(v):
                continue  # None: an optional key left unset; other types are OmegaConf's to refuse
            finite = not isinstance(v, float) or math.isfinite(v)
            if finite and v in valid:
                continue
            what = f"has {v}; every value" if len(values) > 1 or OmegaConf.is_list(value) else f"is {v}; it"
            kind = "a finite number" if isinstance(v, float) else "an integer"
            raise StampError(f"config key '{key}' {what} must be {kind} {valid}")
