"""The registry of pruning methods: ``METHODS``, one ``PruningMethod`` per ``choices.Method``, which
`stamp prune --method` (``prune_with``) and `stamp bench` both read.

A method, as in Torch-Pruning's ``Importance`` protocol, is a small stateless object: its ``name``, its
``family`` (what it needs: nothing but the backbone, the target's loss, training on the target first,
STAMP's generator), what its result depends on besides budget, sample and seed (``cache_key``: part of
a bench cell's key), and ``prune(source, job)`` → the pruned network with a head for the target. Most
methods only choose channels (``MaskMethod.masks``); the shared surgery path then removes them and
initialises the head from the class prototypes of the pruning batch. The score-based baselines
register in ``pruning/baselines.py`` (``SCORES``); the methods that need stage code (fine-tuning,
STAMP's generator) are defined here, where that code may be imported.
"""

from __future__ import annotations

import copy
import hashlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from .atomic import check_writable
from .choices import Method
from .config import PruneConfig, StampConfig, validate
from .devices import pick_device
from .downstream import Target, adapt_generator, build_pruned, load_target, stamp_masks
from .errors import StampError
from .finetune import finetune_model
from .measure import count_macs_params, latency_ms
from .meta.artifact import Generator, load_generator
from .pruning.baselines import SCORES, Score, baseline_masks, dense_masks, l1_scores
from .pruning.budget import BudgetCost, kept_counts
from .pruning.gates import GateSettings, gate_masks
from .pruning.hardmask import check_budget, uniform_ratio_masks
from .pruning.latency import networks_ms
from .pruning.prunable import PrunableBackbone
from .pruning.spec import PruningSpec, save_pruned
from .pruning.surgery import prune_model
from .training import Schedule


class Family(Enum):
    """What a method needs, and how the bench report groups it."""

    REFERENCE = "no pruning: the unpruned reference"
    CHANCE = "random channels: the floor an informed method must beat"
    SCORE = "one-shot scores of the pretrained backbone"
    TRAINED = "trains on the target sample before pruning"
    META = "STAMP's meta-trained generator reads the target sample"


@dataclass
class Source:
    """What every method prunes: the reference-pretrained backbone (eval mode, frozen, on its device; its
    channel groups, MACs model and normalisation), and STAMP's generator when a method uses it."""

    net: PrunableBackbone  # read from a pretrain run, or from the generator artifact holding it
    generator: Generator | None = None

    @classmethod
    def load(cls, directory: str | Path, device: torch.device, micro_batch: int = 0) -> "Source":
        return cls(PrunableBackbone.load(directory, device, micro_batch=micro_batch))

    @classmethod
    def of_generator(cls, gen: Generator) -> "Source":
        return cls(gen.net, gen)

    @cached_property
    def fingerprint(self) -> str:
        return self.net.fingerprint()  # once: every bench cell's key holds it, and the backbone stays frozen

    @cached_property
    def generator_id(self) -> str:
        """A short hash of the generator's weights (read once: every STAMP cell's key holds it)."""
        return hashlib.sha256((self.generator.path / "generator.safetensors").read_bytes()).hexdigest()[:16]


@dataclass
class Pruned:
    """A method's result: the pruned network with its head, its keep masks (original numbering, for the
    spec) and the seconds of each stage."""

    model: torch.nn.Module
    masks: list[torch.Tensor]
    seconds: dict[str, float]  # "masks", "surgery"; train_prune also "dense_finetune" (first)


@dataclass
class Finetuned:
    """The dense network with a prototype head (``pruned``) after a fine-tune on the sample (``result``:
    ``finetune_model``'s). The dense reference of the bench and train_prune's first stage."""

    pruned: Pruned
    result: dict

    @property
    def seconds(self) -> float:
        return sum(self.pruned.seconds.values()) + self.result["seconds"]


@dataclass
class Job:
    """One pruning problem: the target sample, the budget, the seed and the settings of the methods."""

    sample: Target  # what the methods that train read (the bench: the regime's whole sample)
    batch: Target  # what the one-shot methods and every prototype head read, on the source's device
    budget: float
    seed: int
    cfg: StampConfig  # prune (STAMP; budget_kind for all), meta + bench.gate_* (learn_gates), finetune (train_prune)
    # train_prune's first stage for an epoch count (None: the fine-tune's own; the bench shares that one with dense)
    dense_finetuned: Callable[[int | None], Finetuned]

    def cost(self, source: Source) -> BudgetCost:
        """What ``budget`` is a fraction of (``prune.budget_kind``): the source backbone's MACs or measured latency."""
        p = self.cfg.prune
        return source.net.budget(p.budget_kind, p.latency_batch)


class PruningMethod(ABC):
    """One entry of ``METHODS``."""

    name: Method
    family: Family
    fine_tunes = 1  # fine-tunes a bench cell runs (its share of the ETA)

    @property
    def prunes(self) -> bool:
        return self.family is not Family.REFERENCE

    @property
    def uses_generator(self) -> bool:
        return self.family is Family.META

    def cache_key(self, cfg: StampConfig, source: Source) -> dict:
        """The settings the result depends on besides the cell (target, regime, seed, budget, fine-tuning)."""
        return {}

    def record(self, cfg: StampConfig, source: Source) -> dict:
        """What a pruned model's report records of the method's inputs and settings."""
        return {"backbone": str(source.net.path), **self.cache_key(cfg, source)}

    @abstractmethod
    def prune(self, source: Source, job: Job) -> Pruned:
        ...


class MaskMethod(PruningMethod):
    """A method that only chooses the channels; surgery and the prototype head are shared."""

    @abstractmethod
    def masks(self, source: Source, job: Job) -> list[torch.Tensor]:
        """Hard keep masks (bool ``[C_g]`` per group) at ``job.budget``."""

    def prune(self, source: Source, job: Job) -> Pruned:
        t = time.perf_counter()
        masks = self.masks(source, job)
        t_masks = time.perf_counter() - t
        t = time.perf_counter()
        model = build_pruned(source.net, masks, job.batch)
        return Pruned(model, masks, {"masks": t_masks, "surgery": time.perf_counter() - t})


class Dense(MaskMethod):
    name, family = Method.DENSE, Family.REFERENCE

    def masks(self, source: Source, job: Job) -> list[torch.Tensor]:
        return dense_masks(source.net.groups)


class ScoreMethod(MaskMethod):
    """A score of ``pruning/baselines.py``: the same fraction of channels kept in every group."""

    def __init__(self, name: Method, score: Score):
        self.name, self.score = name, score
        self.family = Family.CHANCE if score.chance else Family.SCORE

    def masks(self, source: Source, job: Job) -> list[torch.Tensor]:
        net = source.net
        model = net.backbone
        if self.score.reads_loss:  # the target's loss needs a head for the target
            model = build_pruned(net, dense_masks(net.groups), job.batch)
        return baseline_masks(self.name, model, net.groups, job.cost(source), job.budget, net.norm(job.batch.x),
                              job.batch.y, job.seed)


class TrainPrune(PruningMethod):
    """Fine-tune the dense network on the sample, prune it by L1, keep its fine-tuned weights and head."""

    name, family, fine_tunes = Method.TRAIN_PRUNE, Family.TRAINED, 2

    def choose(self, fine_tuned: torch.nn.Module, source: Source, job: Job) -> list[torch.Tensor]:
        """The channels to keep of the dense network fine-tuned on the sample."""
        return uniform_ratio_masks(l1_scores(fine_tuned, source.net.groups), job.cost(source), job.budget)

    def cache_key(self, cfg: StampConfig, source: Source) -> dict:
        warmup = cfg.prune.warmup_epochs
        return {} if warmup is None else {"warmup_epochs": warmup}

    def prune(self, source: Source, job: Job) -> Pruned:
        dense = job.dense_finetuned(job.cfg.prune.warmup_epochs)
        t = time.perf_counter()
        masks = self.choose(dense.pruned.model, source, job)
        t_masks = time.perf_counter() - t
        t = time.perf_counter()
        model = prune_model(dense.pruned.model, source.net.groups, masks)  # keeps the fine-tuned head
        return Pruned(model, masks, {"dense_finetune": dense.seconds, "masks": t_masks,
                                     "surgery": time.perf_counter() - t})


class LearnGates(MaskMethod):
    """Gates learned on the whole sample from scratch (``pruning/gates.py``)."""

    name, family = Method.LEARN_GATES, Family.TRAINED

    def cache_key(self, cfg: StampConfig, source: Source) -> dict:
        m, b = cfg.meta, cfg.bench
        return {"gates": {"steps": b.gate_steps, "lr": b.gate_lr, "batch": b.gate_batch, "tau": m.tau,
                          "straight_through": m.straight_through, "prior": m.prior,
                          "prior_weight": m.prior_weight, "budget_weight": m.budget_weight}}

    def masks(self, source: Source, job: Job) -> list[torch.Tensor]:
        m, b, net = job.cfg.meta, job.cfg.bench, source.net
        gates = GateSettings(m.tau, m.straight_through, m.prior, m.prior_keep, m.prior_weight, m.budget_weight,
                             b.gate_steps, b.gate_lr, b.gate_batch)
        return gate_masks(net, net.norm(job.sample.x.to(net.device)), job.sample.y.to(net.device),
                          job.sample.num_classes, job.budget, gates, job.seed, job.cost(source))


class Stamp(MaskMethod):
    """The meta-trained generator reads the pruning batch (optionally adapted on it first)."""

    name, family = Method.STAMP, Family.META

    def cache_key(self, cfg: StampConfig, source: Source) -> dict:
        p = cfg.prune
        key = {"generator": source.generator_id, "allocation": source.generator.stamp.allocation_for(p.allocation),
               "selection": p.selection}
        if p.adapt_steps:
            key["adapt"] = {"steps": p.adapt_steps, "lr": p.adapt_lr}
        return key

    def record(self, cfg: StampConfig, source: Source) -> dict:
        p = cfg.prune
        return {"generator": str(source.generator.path), "adapt_steps": p.adapt_steps,
                "allocation": source.generator.stamp.allocation_for(p.allocation), "selection": p.selection}

    def masks(self, source: Source, job: Job) -> list[torch.Tensor]:
        gen, p = source.generator, job.cfg.prune
        stamp = adapt_generator(gen, job.batch, job.budget, p.adapt_steps, p.adapt_lr, job.seed) if p.adapt_steps \
            else gen.stamp
        seeded = copy.deepcopy(p)
        seeded.seed = job.seed  # a sampled mask is drawn from the job's seed, like every other random choice
        return stamp_masks(gen, stamp, job.batch, job.budget, seeded, job.cost(source))


class TrainStamp(TrainPrune):
    """train_prune with STAMP choosing: the generator reads the pruning batch through the reference backbone, as
    ``stamp`` does, and its channels are cut from the dense network fine-tuned on the sample, at train_prune's
    cost. Its lead over ``stamp`` at equal final fine-tune epochs is mostly the extra training (docs/BENCHMARKS.md,
    "Thirty epochs were too few")."""

    name = Method.TRAIN_STAMP
    uses_generator = True

    def cache_key(self, cfg: StampConfig, source: Source) -> dict:
        return {**METHODS[Method.STAMP].cache_key(cfg, source), **super().cache_key(cfg, source)}

    def record(self, cfg: StampConfig, source: Source) -> dict:
        return {**METHODS[Method.STAMP].record(cfg, source), **super().cache_key(cfg, source)}

    def choose(self, fine_tuned: torch.nn.Module, source: Source, job: Job) -> list[torch.Tensor]:
        return METHODS[Method.STAMP].masks(source, job)


METHODS: dict[Method, PruningMethod] = {m.name: m for m in (
    Dense(), *(ScoreMethod(name, score) for name, score in SCORES.items()), TrainPrune(), LearnGates(), Stamp(),
    TrainStamp())}


def method_named(name: str) -> PruningMethod:
    if name not in METHODS:
        raise StampError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


# --- `stamp prune`: one method, one target, one artifact ------------------------------------------------------


def _finetune_dense(source: Source, job: Job, epochs: int | None) -> Finetuned:
    """train_prune's first stage outside the bench: the dense network with a prototype head, fine-tuned on
    the sample with ``finetune.*`` for ``epochs`` (None: ``finetune.epochs``; no held-out images here: it is
    scored on the sample itself)."""
    dense = METHODS[Method.DENSE].prune(source, job)
    sample = (job.sample.x, job.sample.y)
    schedule = Schedule.finetuning(job.cfg.finetune, job.seed, epochs)
    return Finetuned(dense, finetune_model(dense.model, sample, sample, source.net.norm, schedule, source.net.device))


def prune_with(method: str, data: str | Path, budget: float, out: str | Path, cfg: StampConfig | None = None,
               generator: str | Path | None = None, backbone: str | Path | None = None,
               device: str = "auto", budget_kind: str | None = None) -> dict:
    """Prune for the target dataset ``data`` with ``method`` (a name of ``METHODS``) at ``budget``, a fraction of
    the dense network's MACs or, with ``budget_kind="latency"`` (default ``prune.budget_kind``), of its latency
    measured on ``device`` at ``prune.latency_batch`` images (pruning/latency.py), and write the pruned model
    to ``out``: ``model.safetensors`` + ``spec.json``, what `stamp finetune`, `stamp export` and ``load_pruned``
    read, whatever the method.

    STAMP prunes its generator's own backbone (``generator``: a meta-train run or a generator artifact);
    every other method prunes the pretrained backbone in ``backbone`` (default ``cfg.pretrain.out``) and
    ignores ``generator``. Every method reads ``prune.samples_per_class`` images per class of the train
    split (train_prune and learn_gates train on them; train_prune fine-tunes with ``finetune.*``), and is
    seeded by ``prune.seed``. ``dense`` writes the unpruned network with a head for the target (budget 1).
    Returns the report (MACs, params, latency, seconds to produce the model), also stored in the spec.
    """
    cfg = OmegaConf.structured(StampConfig if cfg is None else cfg)
    if budget_kind is not None:
        cfg.prune.budget_kind = budget_kind
    validate(cfg)  # a config built in Python skipped load_config
    m = method_named(method)
    budget = budget if m.prunes else 1.0
    check_budget(budget)
    if m.uses_generator and generator is None:
        raise StampError(f"method {m.name} reads a meta-trained generator: give one with --generator (a `stamp "
                         "meta-train` run or a generator artifact), or choose another --method")
    check_writable(out)
    t0 = time.perf_counter()
    dev = pick_device(device)
    chunk = cfg.runtime.micro_batch
    source = Source.of_generator(load_generator(generator, dev, chunk)) if m.uses_generator else \
        Source.load(cfg.pretrain.out if backbone is None else backbone, dev, chunk)
    p = cfg.prune
    target = load_target(data, p.samples_per_class, source.net.record)
    target.x, target.y = target.x.to(dev), target.y.to(dev)
    job = Job(target, target, budget, p.seed, cfg, lambda epochs: _finetune_dense(source, job, epochs))
    # a latency table is read (or measured) before any method runs; dense keeps every channel whatever the kind
    cost = job.cost(source) if m.prunes else source.net.budget("macs")
    pruned = m.prune(source, job)
    return _save(out, source, pruned, target, m.name, budget, time.perf_counter() - t0,
                 {**m.record(cfg, source), "seed": p.seed, **_budget_report(cost, pruned, source, p.latency_batch)})


def _budget_report(cost: BudgetCost, pruned: Pruned, source: Source, batch: int) -> dict:
    """The budget's kind and, for a latency budget, the predicted and measured latency ratio of the pruned network
    at the budget's batch size (measured as the table's calibration networks are: ``networks_ms``)."""
    if cost.kind != "latency":
        return {"budget_kind": cost.kind}
    size = source.net.input_size
    pruned_ms, dense_ms = networks_ms([pruned.model, source.net.backbone], size, batch)
    predicted = float(cost(kept_counts(cost.groups, [m.cpu() for m in pruned.masks]))) / cost.dense
    return {"budget_kind": cost.kind, "latency_batch": batch, "latency_ratio_predicted": predicted,
            f"latency_ms_b{batch}_measured": pruned_ms, f"dense_latency_ms_b{batch}_measured": dense_ms,
            "latency_ratio": pruned_ms / dense_ms, "latency_table": str(cost.path) if cost.path else None}


def prune(generator: str | Path, data: str | Path, budget: float, out: str | Path, cfg: PruneConfig | None = None,
          device: str = "auto") -> dict:
    """Prune the generator's backbone for the target dataset ``data`` at ``budget`` (of ``cfg.budget_kind``) with STAMP;
    write the pruned model to ``out``. ``cfg`` (the ``prune`` config section; defaults if None) sets the
    sample size, budget kind, adaptation steps, allocation, selection, round_to and seed. Returns the report (MACs,
    params, latency, seconds to produce the model). Other methods: ``prune_with``."""
    return prune_with(Method.STAMP, data, budget, out, StampConfig(prune=PruneConfig() if cfg is None else cfg),
                      generator=generator, device=device)


def _save(out: str | Path, source: Source, pruned: Pruned, target: Target, method: Method, budget: float,
          seconds: float, extra: dict) -> dict:
    """Report + atomic save of the pruned model; returns the report (also stored in the spec)."""
    net, size = source.net, source.net.input_size
    dense_macs, dense_params = count_macs_params(net.backbone, size)
    macs, params = count_macs_params(pruned.model, size)
    report = {
        "method": method.value, "budget": budget, "target": str(target.path), "classes": target.manifest.classes,
        "macs": macs, "params": params, "dense_macs": dense_macs, "dense_params": dense_params,
        "macs_ratio": macs / dense_macs, "params_ratio": params / dense_params,
        "seconds_to_prune": seconds,
        "latency_ms_b64": latency_ms(pruned.model, size, 64),
        "dense_latency_ms_b64": latency_ms(net.backbone, size, 64),
        **extra,
    }
    spec = PruningSpec.from_masks(net.record, net.groups, pruned.masks, num_classes=target.num_classes,
                                  report=report)
    save_pruned(out, pruned.model, spec)
    return report
