"""The names a config may choose among: pruning methods, backbones, allocation and selection rules,
budget kinds, statistics, transforms, priors.

They live in this small base module, apart from ``config.py``, so that the layers that implement
them (``pruning/``, ``models/``, ``data/``) can check a name without importing the config, and so
that loading a config checks every name without importing torch.
"""

from __future__ import annotations

import re
from enum import Enum


class Method(str, Enum):
    """The pruning methods (`stamp prune --method`, ``bench.methods``): the dense reference, the score-based
    baselines of pruning/baselines.py, train-then-prune, gates learned on the target (pruning/gates.py),
    STAMP, and STAMP's channels of the dense network fine-tuned on the target (train-then-prune with STAMP
    choosing). Their implementations are the registry ``stamp_dist.methods.METHODS``."""

    DENSE = "dense"
    RANDOM = "random"
    L1 = "l1"
    SNIP = "snip"
    GRASP = "grasp"
    SYNFLOW = "synflow"
    TAYLOR = "taylor"
    MAGNITUDE = "magnitude"
    TRAIN_PRUNE = "train_prune"
    LEARN_GATES = "learn_gates"
    STAMP = "stamp"
    TRAIN_STAMP = "train_stamp"

    __str__ = str.__str__  # f-strings and joins show the name itself, as for a plain string
    __format__ = str.__format__


METHOD_NAMES = tuple(m.value for m in Method)

BACKBONES = ("convnet", "resnet20", "resnet56", "resnet18", "resnet50", "vgg19_bn", "mobilenet_v2",
             "mobilenet_v2_cifar")
# model.backbone may also name a factory of the user's own network: "package.module:function"
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
ALLOCATIONS = ("learned", "uniform")  # prune.allocation: pruning/hardmask.py
BUDGET_KINDS = ("macs", "latency")  # prune.budget_kind, meta.budget_kind: pruning/budget.py, pruning/latency.py
TASK_TRANSFORMS = ("gray", "invert", "lowres")  # meta.task_transforms: data/transforms.py
CHANNEL_STATS = ("activity", "fisher", "taylor", "redundancy")  # meta.stats: meta/set_inputs.py
SELECTIONS = ("top", "sample")  # prune.selection: meta/objective.py hard_masks
PRIORS = ("bernoulli", "beta_bernoulli", "none")  # meta.prior: models/generator.py prior_kl


def is_factory(backbone: str) -> bool:
    """Whether ``backbone`` has the form of a factory, ``package.module:function`` (not whether it imports)."""
    return _FACTORY.fullmatch(backbone) is not None
