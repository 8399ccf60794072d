"""The "learn gates on the target" baseline: STAMP's gate model trained on the target alone.

Choice (why this one): per-channel hard-concrete keep gates with free logits, trained from scratch on
the target sample, with exactly STAMP's mask distribution and loss terms — ``hard_concrete_sample``
at temperature ``meta.tau`` (straight-through if ``meta.straight_through``), the sparsity prior
``meta.prior`` weighted by ``meta.prior_weight``, and the budget penalty on the expected cost ratio (MACs, or
measured latency with ``prune.budget_kind=latency``: pruning/budget.py) under ``p = sigmoid(a)`` weighted by
``meta.budget_weight`` — and the same hard-mask rule
(``budget_mask`` on ``p``). What it lacks is only what STAMP meta-learns: the set encoder and
generator that predict the logits for a new task. (A freshly initialised STAMP generator would add
an encoder and trunk whose input, one task embedding, is constant on a single target: free logits
are the same model without those inert parameters.)

What it reads of the config comes as one ``GateSettings`` (``meta.*`` for the mask distribution and loss,
``bench.gate_*`` for the optimisation; ``methods.py`` builds it), so this layer does not import the config.

Setting, as in a STAMP meta-training episode: the pretrained backbone is frozen in eval mode (BN
uses its reference statistics) and masked by the gates; a linear head for the target, initialised
from the class prototypes of the dense features, is trained jointly with the gates. Every gate logit
starts at ``logit(√b)`` (the generator's budget offset: keeping a fraction √b of every group's
channels costs ≈ b), so training starts at the budget. Adam, ``steps`` steps of ``batch_size``
random images of the sample (no augmentation); the step count is a config value
(``bench.gate_steps``), the same for every target, regime and budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.heads import prototype_head
from ..models.generator import (budget_offset, budget_penalty, hard_concrete_sample, keep_probability, prior_keep_rate,
                                prior_kl)
from .budget import Budgeted, cost_ratio
from .hardmask import budget_mask, check_budget
from .masking import masked
from .prunable import PrunableBackbone


@dataclass(frozen=True)
class GateSettings:
    """STAMP's mask distribution and loss weights (``meta.tau`` … ``meta.budget_weight``) and the gates'
    optimisation (``bench.gate_steps``, ``gate_lr``, ``gate_batch``)."""

    tau: float
    straight_through: bool
    prior: str
    prior_keep: float | None
    prior_weight: float
    budget_weight: float
    steps: int
    lr: float
    batch_size: int


def learn_gate_logits(net: PrunableBackbone, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      budget: float, gates: GateSettings, seed: int,
                      cost: Budgeted | None = None) -> list[torch.Tensor]:
    """Train per-channel gate logits (and a head) on ``images`` (normalised, on the backbone's device)
    and ``labels`` (``0..num_classes-1``) at ``budget`` of ``cost`` (default: the MACs); returns the final
    logits, one ``[C_g]`` tensor per group."""
    check_budget(budget)
    backbone, groups, device = net.backbone, net.groups, images.device
    cost = net.cost if cost is None else cost
    was_training = backbone.training
    backbone.eval()
    init = float(budget_offset(torch.tensor(budget, dtype=torch.float64)))
    logits = [torch.full((g.channels,), init, device=device, requires_grad=True) for g in groups]
    with torch.no_grad():
        head = prototype_head(backbone.forward_features(images), labels, num_classes, unit_scale=True)
    weight, bias = (head[k].clone().requires_grad_() for k in ("fc.weight", "fc.bias"))
    opt = torch.optim.Adam([*logits, weight, bias], lr=gates.lr)
    rng = torch.Generator().manual_seed(seed)
    mask_rng = torch.Generator(device=device).manual_seed(seed)
    try:
        for _ in range(gates.steps):
            idx = torch.randperm(len(labels), generator=rng)[:gates.batch_size].to(device)
            z = [hard_concrete_sample(a, gates.tau, generator=mask_rng, straight_through=gates.straight_through)
                 for a in logits]
            with masked(backbone, groups, z):
                out = F.linear(backbone.forward_features(images[idx]), weight, bias)
            ratio = cost_ratio(cost, [keep_probability(a) for a in logits])
            prior = prior_kl(logits, gates.prior, prior_keep_rate(gates.prior_keep, budget))
            loss = (F.cross_entropy(out, labels[idx]) + gates.prior_weight * prior
                    + gates.budget_weight * budget_penalty(ratio, budget))
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[*logits, weight, bias])  # never into the backbone's .grad
            opt.step()
    finally:
        backbone.train(was_training)
    return [a.detach() for a in logits]


def gate_masks(net: PrunableBackbone, images: torch.Tensor, labels: torch.Tensor, num_classes: int, budget: float,
               gates: GateSettings, seed: int, cost: Budgeted | None = None) -> list[torch.Tensor]:
    """Hard keep masks at ``budget`` of ``cost`` (default: the MACs) from gates learned on the target (STAMP's
    hard-mask rule)."""
    cost = net.cost if cost is None else cost
    logits = learn_gate_logits(net, images, labels, num_classes, budget, gates, seed, cost)
    return budget_mask([keep_probability(a) for a in logits], cost, budget)
