"""Typed configuration: OmegaConf structured dataclasses, loaded from YAML plus ``key=value`` overrides.

One ``StampConfig`` describes a whole run. Sections follow the data flow:
data → model → pretrain → meta → prune → finetune, plus runtime (distribution) and tracking.
OmegaConf rejects unknown keys and wrong types; ``load_config`` turns those rejections (and values
outside the allowed choices) into a ``StampError`` naming the key and the valid options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .choices import (ALLOCATIONS, BACKBONES, BUDGET_KINDS, CHANNEL_STATS, METHOD_NAMES, PRIORS, SELECTIONS,
                      TASK_TRANSFORMS, is_factory)
from .errors import StampError
from .ranges import check_numbers


@dataclass
class DataConfig:
    root: str = "runs/demo/data"  # directory made by `stamp data demo` (reference/ and targets/)
    reference: str = "${.root}/reference"  # per-class shard directory used to pretrain and meta-train
    seed: int = 0
    demo_classes: int = 64  # synthetic reference classes (the demo also holds out 16 more as a target)
    demo_train_per_class: int = 200
    demo_test_per_class: int = 50
    # Fractal classes (random iterated function systems, FractalDB-style) added to the synthetic reference.
    demo_fractal_classes: int = 0
    # Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist puts them here): the demo's second real
    # target, written where they exist; "" leaves it out.
    fashion_mnist: str = "/usr/share/datasets/fashion-mnist"


@dataclass
class ModelConfig:
    # a name in BACKBONES or "package.module:function" (a function returning your nn.Module; README)
    backbone: str = "resnet20"
    width: int = 16  # base width of the CIFAR ResNets, the ConvNet and MobileNetV2-CIFAR
    # a state dict to start pretraining from (torchvision-format: torch.save of state_dict(), or
    # .safetensors), loaded strictly; "" = random initialisation
    weights: str = ""


@dataclass
class PretrainConfig:
    out: str = "runs/demo/pretrain"
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = True
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class MetaConfig:
    out: str = "runs/demo/meta"
    steps: int = 300
    meta_batch: int = 4  # tasks per meta-step, in all (on Ray each worker takes meta_batch / num_workers)
    n_way_min: int = 5
    n_way_max: int = 10
    k_shot: int = 10
    q_query: int = 10
    inner_steps: int = 3
    inner_lr: float = 0.1
    first_order: bool = True
    learn_backbone: bool = False
    adapt_backbone: bool = False  # inner steps also update the backbone (else only the head)
    budget_min: float = 0.1
    budget_max: float = 0.6
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    tau: float = 0.5  # hard-concrete temperature
    straight_through: bool = False
    prior: str = "bernoulli"  # sparsity prior: bernoulli | beta_bernoulli | none
    prior_weight: float = 0.01
    prior_keep: Optional[float] = None  # the prior's keep rate; None = √b, the uniform rate of each task's budget
    budget_weight: float = 50.0
    encoder_dim: int = 128
    encoder_heads: int = 4
    encoder_inducing: int = 16
    generator_hidden: int = 128
    task_families: str = "none"  # none | name_tokens | families.json: see data/episodes.py task_families
    family_tasks: float = 0.5  # fraction of meta-training tasks drawn inside one family (when there are families)
    # Domain transforms applied to whole tasks (names in TASK_TRANSFORMS; data/transforms.py), each
    # drawn with task_transform_prob: meta-training then sees targets unlike the reference data.
    task_transforms: list[str] = field(default_factory=list)
    task_transform_prob: float = 0.5
    channel_stats: bool = True  # the generator also reads per-channel statistics of the set (meta/set_inputs.py)
    # How the generator spreads a budget over channel groups, in training and (unless prune.allocation says
    # otherwise) when pruning: "learned" (its probabilities decide) or "uniform" (every group keeps the same
    # fraction; the generator ranks channels within each group). See pruning/hardmask.py.
    allocation: str = "uniform"
    # What a task's budget is a fraction of in training (the expected-cost term of the episode loss): "macs" or
    # "latency" (the dense network's measured latency at latency_batch images on the training device:
    # pruning/latency.py). Stored in the generator; at pruning, prune.budget_kind decides the hard masks.
    budget_kind: str = "macs"
    latency_batch: int = 64
    stats: list[str] = field(default_factory=lambda: list(CHANNEL_STATS))  # which statistics (CHANNEL_STATS)
    val_every: int = 50
    val_tasks: int = 20
    val_classes: int = 8  # reference classes held out from meta-training for meta-validation
    checkpoint_every: int = 50
    keep_last: int = 3
    seed: int = 0


@dataclass
class PruneConfig:
    budget: float = 0.25  # target fraction of the dense network's MACs
    adapt_steps: int = 0
    adapt_lr: float = 1e-2
    samples_per_class: int = 10  # images per class the set encoder reads
    # Kept channels per group are rounded to multiples of this (groups that have that many); None = what suits
    # the device's kernels: 8 on CUDA, 1 on CPU (measured: no gain from rounding there, docs/BENCHMARKS.md).
    round_to: Optional[int] = None
    # What ``budget`` is a fraction of: "macs" (the dense network's MACs) or "latency" (its measured latency
    # on this device at ``latency_batch`` images per forward pass; a table measured once per backbone, device,
    # thread count and batch size and cached next to the backbone: pruning/latency.py).
    budget_kind: str = "macs"
    latency_batch: int = 64
    # How the budget is spread over channel groups (see meta.allocation); None = the generator's own.
    allocation: Optional[str] = None
    # Which channels the generator's keep probabilities choose: "top" (the most probable) or "sample" (a
    # draw from the generator's own distribution, seeded by prune.seed, as in meta-training).
    selection: str = "sample"
    seed: int = 0
    # train_prune / train_stamp: epochs of the dense network's fine-tune on the sample before it is pruned; None =
    # the fine-tune's own (finetune.epochs; in the bench, the regime's). Fewer epochs cost less and keep part of the
    # gain (docs/BENCHMARKS.md, "Where the room is").
    warmup_epochs: Optional[int] = None


@dataclass
class FinetuneConfig:
    epochs: int = 30
    batch_size: int = 16  # small: data-scarce targets have ~100 images, and each epoch should take several steps
    lr: float = 0.05
    # Multiplies ``lr`` for every parameter but the new head: a small target sample otherwise drags
    # the pretrained features away (measured: docs/history/BENCHMARKS-v1.md).
    backbone_lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    train_per_class: int = 0  # 0 = every training image; >0 = data-scarce regime
    seed: int = 0
    augment: bool = True  # random crops (4-px padding)
    flip: bool = False  # random horizontal flips: off by default, they change the meaning of digits


@dataclass
class RuntimeConfig:
    backend: str = "local"  # local | ray
    address: Optional[str] = None  # existing Ray cluster; None starts a local one
    host: str = "127.0.0.1"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    sampler_actors: int = 2
    prefetch: int = 4  # episodes each worker requests ahead of the one it trains on
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast on both backends; on Ray it needs zero_stage 1 or 2)
    # Images per forward pass when reading a set or scoring an episode (meta-training, `stamp prune`); 0 = the
    # whole set at once. Chunks are checkpointed (recomputed in backward), so memory stops growing with the
    # episode: what ImageNet-sized episodes need (configs/imagenet_resnet50.yaml).
    micro_batch: int = 0
    max_failures: int = 2
    device: str = "auto"  # auto | cpu | cuda
    num_cpus: Optional[int] = None  # logical CPUs of a locally started Ray; None = max(detected, what the run asks for)
    sampler_cpus: float = 1.0  # CPUs reserved per sampler actor
    sampler_buffer: int = 512  # images buffered per class by a sampler actor (bounds its memory)
    sampler_reuse: int = 4  # a class buffer is refilled from its shards after serving this many times its size
    sampler_max_restarts: int = 3  # restarts of a crashed sampler actor before the run fails
    # Pretrain / fine-tune data: a split whose decoded images (N·3·S·S bytes) exceed this many MiB is read from
    # its shards batch by batch (random access through the shard indexes) instead of loaded whole, so memory
    # stops growing with the split; 0 = always. Same batches, order and augmentation either way.
    data_memory_mb: int = 4096
    # DataLoader worker processes decoding a streamed split; 0 = the training process itself (2-core machines)
    data_workers: int = 0
    checkpoints_kept: int = 2  # Ray Train checkpoints kept in meta.out/train


@dataclass
class TrackingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "stamp_dist"
    dir: str = "runs/demo/wandb"
    name: Optional[str] = None
    log_artifacts: bool = True  # also log each published generator as a wandb artifact


@dataclass
class BenchConfig:
    """What `stamp bench` (and the demo) compares: targets × data regimes × budgets × methods × seeds."""

    out: str = "runs/demo/results"
    targets: list[str] = field(default_factory=lambda: ["${data.root}/targets/digits",
                                                        "${data.root}/targets/fashion_mnist",
                                                        "${data.root}/targets/synthetic_heldout"])
    methods: list[str] = field(default_factory=lambda: ["dense", "random", "stamp"])
    budgets: list[float] = field(default_factory=lambda: [0.25])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # One data regime per value: images per class of the target's train split to prune and fine-tune
    # on; 0 = the whole train split.
    train_per_class: Union[int, list[int]] = 10
    epochs: Optional[list[int]] = None  # fine-tune epochs per regime, the same for every method; None = finetune.epochs
    seed_counts: Optional[list[int]] = None  # per regime: run the first N of `seeds`; None = all of them
    eval_per_class: int = 0  # score on at most this many held-out images per class; 0 = all not in the sample
    gate_steps: int = 50  # learn_gates: Adam steps of the gates (+ head) on the target sample
    gate_lr: float = 0.05
    gate_batch: int = 32
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class SlurmConfig:
    """`stamp slurm submit`: the #SBATCH header it renders; the script bodies stay in slurm/*.sbatch."""

    partition: Optional[str] = None  # None = the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1  # meta-train: Ray head on the first node, Ray workers on the others (prune: always 1)
    cpus_per_task: int = 0  # CPUs per node for Ray / the run; 0 = the cluster's default
    gpus_per_node: int = 0
    mem: Optional[str] = None  # memory per node, e.g. "64G"; None = the cluster's default
    time: str = "24:00:00"  # meta-train time limit per start; the job requeues itself and resumes
    prune_time: str = "00:30:00"  # time limit of a prune job (each array task)
    signal_seconds: int = 600  # USR1 this long before the limit, to checkpoint (SLURM may send it ~1 min early)
    output: str = "${meta.out}/slurm"  # rendered scripts and job logs
    extra: list[str] = field(default_factory=list)  # more sbatch options, verbatim, e.g. ["--constraint=a100"]


@dataclass
class StampConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


CHOICES: dict[str, Sequence[Any]] = {
    "meta.prior": PRIORS,
    "meta.allocation": ALLOCATIONS,
    "prune.allocation": (None, *ALLOCATIONS),
    "prune.selection": SELECTIONS,
    "prune.budget_kind": BUDGET_KINDS,
    "meta.budget_kind": BUDGET_KINDS,
    "runtime.backend": ("local", "ray"),
    "runtime.precision": ("fp32", "bf16"),
    "runtime.zero_stage": (0, 1, 2, 3),
    "runtime.device": ("auto", "cpu", "cuda"),
    "tracking.wandb_mode": ("offline", "online", "disabled"),
}

def _valid_keys(key: str) -> str:
    """The keys of the section that ``key`` points into, for error messages."""
    parent = key.rpartition(".")[0]
    node = OmegaConf.structured(StampConfig)
    section = OmegaConf.select(node, parent) if parent else node
    return ", ".join(section.keys()) if isinstance(section, DictConfig) else ", ".join(node.keys())


def _explain(e: OmegaConfBaseException, source: str) -> StampError:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        return StampError(f"{source}: unknown config key '{key}'. Valid keys here: {_valid_keys(key)}")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return StampError(f"{source}: bad value for '{key}': {msg}")
    return StampError(f"{source}: {str(e).splitlines()[0]}")


def validate(cfg: StampConfig | DictConfig) -> None:
    check_numbers(cfg)  # every numeric key's range: ranges.py
    if cfg.model.backbone not in BACKBONES and not is_factory(cfg.model.backbone):
        # only the form: importing the factory would import torch and the user's code on every config load
        raise StampError(f"config key 'model.backbone' is {cfg.model.backbone!r}; valid choices: "
                         f"{', '.join(BACKBONES)}, or your own network as package.module:function")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise StampError(f"config key '{key}' is {value!r}; valid choices: {', '.join(map(str, choices))}")
    for method in cfg.bench.methods:
        if method not in METHOD_NAMES:
            raise StampError(f"config key 'bench.methods' has {method!r}; valid choices: {', '.join(METHOD_NAMES)}")
    _validate_regimes(cfg.bench)
    for name in cfg.meta.stats:
        if name not in CHANNEL_STATS:
            raise StampError(f"config key 'meta.stats' has {name!r}; valid choices: {', '.join(CHANNEL_STATS)}")
    if cfg.meta.channel_stats and not cfg.meta.stats:
        raise StampError("config key 'meta.stats' is empty while meta.channel_stats is true; name at least one "
                         f"statistic ({', '.join(CHANNEL_STATS)}) or set meta.channel_stats=false")
    for name in cfg.meta.task_transforms:
        if name not in TASK_TRANSFORMS:
            raise StampError(f"config key 'meta.task_transforms' has {name!r}; valid choices: {', '.join(TASK_TRANSFORMS)}")
    if cfg.meta.budget_min > cfg.meta.budget_max:
        raise StampError("config: meta.budget_min must not exceed meta.budget_max")
    if not 2 <= cfg.meta.n_way_min <= cfg.meta.n_way_max:
        raise StampError("config: need 2 <= meta.n_way_min <= meta.n_way_max")
    if cfg.meta.encoder_dim % cfg.meta.encoder_heads:
        raise StampError(f"config: meta.encoder_dim ({cfg.meta.encoder_dim}) must be a multiple of meta.encoder_heads "
                         f"({cfg.meta.encoder_heads}): each attention head takes an equal share")


def bench_regimes(b: BenchConfig | DictConfig) -> list[int]:
    """``bench.train_per_class`` as a list (an int is one regime)."""
    return [b.train_per_class] if isinstance(b.train_per_class, int) else list(b.train_per_class)


def _validate_regimes(b: BenchConfig | DictConfig) -> None:
    regimes = bench_regimes(b)
    if not regimes:
        raise StampError("config key 'bench.train_per_class' is empty; give images per class >= 0 (0 = all)")
    for key in ("epochs", "seed_counts"):
        values = getattr(b, key)
        if values is not None and len(values) != len(regimes):
            raise StampError(f"config key 'bench.{key}' has {len(values)} values but bench.train_per_class has "
                             f"{len(regimes)} regimes; give one value per regime (or leave it unset)")
    if b.seed_counts is not None and max(b.seed_counts) > len(b.seeds):
        raise StampError(f"config key 'bench.seed_counts' asks for {max(b.seed_counts)} seeds but bench.seeds "
                         f"has {len(b.seeds)}; add seeds or lower the count")


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def _read_yaml(path: Path) -> DictConfig:
    """A YAML config file as a mapping; syntax errors, Python tags and non-mappings are user errors."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:  # also !!python tags: OmegaConf's loader refuses them (no code runs)
        raise StampError(f"{path}: not a valid YAML config ({_yaml_problem(e)}); fix the file") from None
    except UnicodeDecodeError:
        raise StampError(f"{path}: not a text file (not UTF-8); pass a YAML config") from None
    if not isinstance(loaded, DictConfig):
        raise StampError(f"{path}: a config file must be a YAML mapping (key: value lines), not a list")
    return loaded


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> StampConfig:
    """Defaults ← YAML file ← ``key=value`` overrides, validated. Returns a typed (structured) config."""
    cfg = OmegaConf.structured(StampConfig)
    source = "defaults"
    try:
        if path is not None:
            path = Path(path)
            source = str(path)
            if not path.is_file():
                raise StampError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, _read_yaml(path))
        for item in overrides:
            source = f"override '{item}'"
            if "=" not in item:
                raise StampError(f"override '{item}' is not of the form key=value (e.g. meta.steps=100)")
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
            except yaml.YAMLError as e:
                raise StampError(f"{source}: the value is not valid YAML ({_yaml_problem(e)})") from None
        source = "config"
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, source) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


def to_dict(cfg: StampConfig | DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(d: dict) -> StampConfig:
    """The typed config back from ``to_dict`` (how a config travels to Ray actors and workers)."""
    return OmegaConf.merge(OmegaConf.structured(StampConfig), d)  # type: ignore[return-value]
