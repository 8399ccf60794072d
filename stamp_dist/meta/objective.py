"""One STAMP episode: encode the support set, generate a mask, adapt a head, score the query set.

Outer loss = CE(query | adapted head, masked backbone) + β·prior + λ·(E[cost ratio] − b)², the cost being
the MACs or the measured latency (``meta.budget_kind``: pruning/budget.py). Gradients reach the set encoder
and the generator through the relaxed mask samples ``z`` (which gate the backbone's channels) and through
the expected cost ratio (which depends on ``p``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..config import MetaConfig
from ..data.episodes import Episode
from ..errors import StampError
from ..models.heads import prototype_head
from ..models.generator import (MaskGenerator, budget_penalty, hard_concrete_sample, keep_probability, prior_keep_rate,
                                prior_kl)
from ..models.set_encoder import SetEncoder
from ..pruning.hardmask import hard_mask
from ..pruning.budget import Budgeted, BudgetCost, cost_ratio
from ..pruning.masking import masked
from ..pruning.prunable import PrunableBackbone
from .set_inputs import SetInputs, read_set


@dataclass
class StampSettings:
    """The part of ``meta.*`` a STAMP module is: what builds it (sizes, the statistics it reads, its
    allocation rule) and the episode objective it is trained with (adaptation on a target reuses it).
    A generator artifact stores it as its own typed record (``meta/artifact.py``)."""

    encoder_dim: int
    encoder_heads: int
    encoder_inducing: int
    generator_hidden: int
    stats: list[str]  # the per-channel statistics the generator reads (meta.stats); empty = none
    allocation: str
    tau: float
    straight_through: bool
    prior: str
    prior_keep: Optional[float]
    prior_weight: float
    budget_weight: float
    inner_steps: int
    inner_lr: float
    first_order: bool
    adapt_backbone: bool
    # What the budgets it was trained with are fractions of (meta.budget_kind; artifacts older than this key
    # were trained for MACs) and the batch size of a latency budget.
    budget_kind: str = "macs"
    latency_batch: int = 64

    @classmethod
    def of(cls, meta: MetaConfig) -> "StampSettings":
        """From a meta config (or anything with its keys as attributes)."""
        same = {f.name: getattr(meta, f.name) for f in fields(cls) if f.name != "stats"}
        return cls(**same, stats=list(meta.stats) if meta.channel_stats else [])


class Stamp(nn.Module):
    """The meta-learned part: set encoder E_φ and mask generator G_ψ (the backbone stays outside).
    With ``settings.stats`` the generator also reads the set's per-channel statistics."""

    def __init__(self, feature_dim: int, group_sizes: list[int], settings: StampSettings):
        super().__init__()
        self.settings = settings
        self.stats = tuple(settings.stats)  # what read_set must compute for it
        self.encoder = SetEncoder(feature_dim, settings.encoder_dim, settings.encoder_heads, settings.encoder_inducing)
        self.allocation = settings.allocation
        self.generator = MaskGenerator(group_sizes, settings.encoder_dim, settings.generator_hidden,
                                       channel_stats=len(self.stats), uniform=settings.allocation == "uniform")

    def forward(self, inputs: SetInputs, budget: float) -> list[torch.Tensor]:
        """What was read from a set (:func:`read_set`) and a budget → per-group keep-logits."""
        return self.generator(self.encoder(inputs.features), budget,
                              inputs.channel_stats if self.stats else None)

    def allocation_for(self, configured: str | None) -> str:
        """``prune.allocation`` when set, else the allocation this generator was trained with."""
        return configured or self.allocation

    def cost(self, net: PrunableBackbone) -> BudgetCost:
        """What this module's budgets are fractions of on ``net``: the kind it is trained for (``budget_kind``)."""
        return net.budget(self.settings.budget_kind, self.settings.latency_batch)

    def read(self, net: PrunableBackbone, x: torch.Tensor, n_way: int) -> SetInputs:
        """What this module reads from a set of normalised, class-grouped images (:func:`read_set`)."""
        return read_set(net.backbone, net.groups, x, n_way, self.stats or ("activity",), net.micro_batch)


@dataclass
class EpisodeOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    prior: torch.Tensor
    budget_term: torch.Tensor
    accuracy: torch.Tensor
    expected_ratio: torch.Tensor


def inner_loop(params: dict[str, torch.Tensor], loss_fn, steps: int, lr: float, first_order: bool):
    """``steps`` plain SGD steps on a params dict, functionally (no module state is changed).

    First-order drops the second-order terms: the update direction is treated as a constant, but the
    adapted params still depend on their (mask-dependent) initial values. Params that carry no graph
    (a frozen backbone, or meta-validation) are adapted as fresh leaves.
    """
    params = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        for _ in range(steps):
            # retain_graph: the outer loss later backpropagates through the same masked forward.
            grads = torch.autograd.grad(loss_fn(params), list(params.values()), create_graph=not first_order,
                                        retain_graph=True)
            params = {k: v - lr * g for (k, v), g in zip(params.items(), grads)}
    return params


def adapted_logits(net: PrunableBackbone, masks: list[torch.Tensor], sx: torch.Tensor, sy: torch.Tensor,
                   qx: torch.Tensor, n_way: int, cfg: StampSettings) -> torch.Tensor:
    """Masked backbone → prototype-initialised head → ``inner_steps`` on the support set → query logits."""
    def head_loss(p):
        return F.cross_entropy(F.linear(fs, p["fc.weight"], p["fc.bias"]), sy)

    fs = net.features(sx, masks)
    # Unscaled prototype logits are in the hundreds: fine for steps on the head alone, but their
    # gradients through the whole backbone diverged to NaN within 3 meta-steps (demo, inner_lr 0.1).
    head = prototype_head(fs, sy, n_way, unit_scale=cfg.adapt_backbone)
    if not cfg.adapt_backbone:
        # Head-only adaptation: masked features stay fixed across inner steps, so compute them once
        # (micro-batched: net.features).
        head = inner_loop(head, head_loss, cfg.inner_steps, cfg.inner_lr, cfg.first_order)
        return F.linear(net.features(qx, masks), head["fc.weight"], head["fc.bias"])
    # Backbone adaptation: the N-way head stands in for ``fc`` and every step re-runs the whole network.
    backbone = net.backbone
    with masked(backbone, net.groups, masks):
        params = {k: v for k, v in backbone.named_parameters() if not k.startswith("fc.")}
        params = inner_loop({**params, **head}, lambda p: F.cross_entropy(functional_call(backbone, p, (sx,)), sy),
                            cfg.inner_steps, cfg.inner_lr, cfg.first_order)
        return functional_call(backbone, params, (qx,))


def _episode_tensors(episode: Episode, net: PrunableBackbone, device: torch.device):
    norm = net.norm
    return (norm(episode.support_x.to(device)), episode.support_y.to(device),
            norm(episode.query_x.to(device)), episode.query_y.to(device))


def episode_rng(seed: int, step: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The mask-sampling RNG of episode ``index`` of meta-step ``step``: a pure function of the three,
    so a meta-batch split across workers samples exactly the masks one process would."""
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))


def episode_loss(net: PrunableBackbone, stamp: Stamp, episode: Episode,
                 generator: torch.Generator | None = None) -> EpisodeOutput:
    """The outer (meta) loss of one episode (the objective of ``stamp.settings``), with relaxed masks
    sampled from the generator."""
    cfg = stamp.settings
    sx, sy, qx, qy = _episode_tensors(episode, net, next(stamp.parameters()).device)
    logits = stamp(stamp.read(net, sx, episode.n_way), episode.budget)
    z = [hard_concrete_sample(a, cfg.tau, generator=generator, straight_through=cfg.straight_through) for a in logits]
    ratio = cost_ratio(stamp.cost(net), [keep_probability(a) for a in logits])
    out = adapted_logits(net, z, sx, sy, qx, episode.n_way, cfg)
    ce = F.cross_entropy(out, qy)
    prior = prior_kl(logits, cfg.prior, prior_keep_rate(cfg.prior_keep, episode.budget))
    budget_term = budget_penalty(ratio, episode.budget)
    loss = ce + cfg.prior_weight * prior + cfg.budget_weight * budget_term
    accuracy = (out.argmax(1) == qy).float().mean()
    return EpisodeOutput(loss, ce.detach(), prior.detach(), budget_term.detach(), accuracy.detach(), ratio.detach())


def check_finite(out: EpisodeOutput, step: int) -> None:
    """Stop a diverged run before its optimizer step, so the last checkpoint stays a good one."""
    if not torch.isfinite(out.loss):
        loss = float(out.loss.detach())
        raise StampError(f"meta-training diverged at step {step + 1}: the outer loss is {loss} "
                         f"(query CE {float(out.ce)}, expected MACs ratio {float(out.expected_ratio)}); lower "
                         "meta.lr or meta.inner_lr (or meta.inner_steps) and run again — it resumes from the "
                         "last checkpoint")


@torch.no_grad()
def hard_masks(stamp: Stamp, cost: Budgeted, inputs: SetInputs, budget: float, round_to: int = 1,
               allocation: str | None = None, selection: str = "top", seed: int = 0):
    """Hard masks meeting ``budget`` from the generator's keep logits (``allocation``: see
    pruning/hardmask.py; None = the one the generator was trained for).

    ``selection``: ``top`` keeps the most probable channels; ``sample`` draws the mask from the generator's
    own distribution (Gumbel noise on the logits, then the same rule; seeded), as meta-training scores
    masks drawn from it. Channels the generator rates alike then stay a diverse draw instead of one
    correlated block (measured on the real targets: docs/BENCHMARKS.md, "What changed the method")."""
    logits = stamp(inputs, budget)
    if selection == "sample":
        gen = torch.Generator().manual_seed(seed)
        logits = [a + gumbel_noise(a.shape, gen).to(a) for a in logits]
    elif selection != "top":
        raise StampError(f"unknown selection {selection!r}; choose top or sample")
    probs = [keep_probability(a) for a in logits]
    return hard_mask(probs, cost, budget, round_to, stamp.allocation_for(allocation))


def gumbel_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise (CPU generator: the same draw on every device). Ranking ``logits + noise``
    samples channels without replacement in proportion to their keep odds (Gumbel-top-k)."""
    u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    return -(-u.log()).log()


def validate_episode(net: PrunableBackbone, stamp: Stamp, episode: Episode) -> tuple[float, float]:
    """Meta-validation score: query accuracy with the HARD mask at the task's budget after the
    inner steps; returns ``(accuracy, achieved cost ratio)`` (the budget kind it is trained for)."""
    sx, sy, qx, qy = _episode_tensors(episode, net, next(stamp.parameters()).device)
    cost = stamp.cost(net)
    with torch.no_grad():
        masks = [m.float() for m in hard_masks(stamp, cost, stamp.read(net, sx, episode.n_way), episode.budget)]
    out = adapted_logits(net, masks, sx, sy, qx, episode.n_way, stamp.settings).detach()
    ratio = float(cost_ratio(cost, masks))
    return float((out.argmax(1) == qy).float().mean()), ratio
