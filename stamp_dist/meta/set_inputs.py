"""What STAMP reads from a labelled sample set: one pass of the frozen backbone gives

* ``features`` ``[N, K, D]``: penultimate features per class, the set encoder's input (→ task embedding ``r``);
* ``channel_stats``: per channel group ``g``, a ``[C_g, S]`` matrix describing how each channel
  responds to *this* set, one column per statistic named in ``meta.stats`` (``choices.CHANNEL_STATS``),
  each standardised across the group's channels:

  - ``activity``: mean ReLU'd, spatially pooled activation (log-scaled);
  - ``fisher``: class separability, the variance of the class means over the mean within-class
    variance (log-scaled);
  - ``taylor``: the first-order change of the set's loss when the channel is removed, per image
    ``|Σ a · ∂L/∂a|`` over the group's mask points, summed over images (Molchanov et al. 2017), ``L`` the
    cross-entropy of a prototype head on the set (log-scaled); it needs one backward pass;
  - ``redundancy``: the channel's mean absolute correlation with the other channels of its group over
    the set's images: channels that copy others can go first (Mariet & Sra 2016 prune by diversity).

Why statistics: a single pooled embedding ``r`` has to name every channel worth keeping through a
learned lookup, and in meta-training that path collapsed (every task got the same embedding and the
same mask). Per-channel statistics are task-dependent by construction — a channel that separates
digits but not shapes scores high on one set and low on the other — so the generator only has to
learn *how to weigh* them, with one small network shared by every channel of every group, and what
it learns transfers to channels and domains the reference tasks never singled out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..models.backbones import Backbone
from ..models.heads import prototype_head
from ..pruning.groups import ChannelGroups

LEGACY_STATS = ("activity", "fisher")  # what generators saved before ``meta.stats`` existed read


@dataclass
class SetInputs:
    features: torch.Tensor  # [N, K, D]
    channel_stats: list[torch.Tensor]  # per group [C_g, S]


def _standardise(s: torch.Tensor) -> torch.Tensor:
    """z-score across channels."""
    return (s - s.mean()) / s.std(unbiased=False).clamp_min(1e-3)


def _log(s: torch.Tensor) -> torch.Tensor:
    """log-scale with a relative floor, so dead channels do not dominate."""
    return (s + 1e-3 * s.mean() + 1e-8).log()


def _pooled(acts: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...]`` → ReLU'd, spatially pooled ``[B, C]``."""
    return acts.relu().flatten(2).mean(2) if acts.dim() > 2 else acts.relu()


def fisher_ratio(v: torch.Tensor, n_way: int) -> torch.Tensor:
    per_class = v.view(n_way, -1, v.shape[1])
    between = per_class.mean(1).var(0, unbiased=False)
    within = per_class.var(1, unbiased=False).mean(0)
    return between / (within + 1e-3 * within.mean() + 1e-8)


def redundancy(v: torch.Tensor) -> torch.Tensor:
    """Mean |correlation| of each channel with the group's other channels (0 for a constant channel)."""
    z = v - v.mean(0)
    z = z / z.norm(dim=0).clamp_min(1e-8)
    corr = (z.T @ z).abs()
    c = corr.shape[0]
    return (corr.sum(1) - corr.diagonal()) / max(c - 1, 1)


def channel_statistics(pooled: torch.Tensor, n_way: int, names: Sequence[str] = LEGACY_STATS,
                       raw: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``pooled`` ReLU'd, spatially pooled activations ``[N*K, C]`` (class-grouped; :func:`_pooled`) →
    ``[C, len(names)]`` standardised statistics; ``raw`` holds the ``[C]`` scores not computed from them
    (``taylor``) that ``names`` asks for."""
    v = pooled
    raw = raw or {}
    columns = {
        "activity": lambda: _log(v.mean(0)),
        "fisher": lambda: _log(fisher_ratio(v, n_way)),
        "redundancy": lambda: redundancy(v),
        **{name: (lambda s=s: _log(s.to(v))) for name, s in raw.items()},
    }
    return torch.stack([_standardise(columns[n]()) for n in names], dim=1)


def _set_loss(feats: torch.Tensor, y: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the set's own unit-scale nearest-prototype head (the head a pruned model starts
    fine-tuning from); summed, so ``∂L/∂a`` does not shrink with the set size (or a chunk's)."""
    return F.cross_entropy(F.linear(feats, head["fc.weight"], head["fc.bias"]), y, reduction="sum")


@dataclass
class _Chunk:
    features: torch.Tensor  # [n, D], detached
    pooled: list[torch.Tensor]  # per group, [n, C_g] at its first mask point
    taylor: list[torch.Tensor] | None  # per group, [C_g]: Σ over the chunk's images of |Σ a·∂L/∂a|


def _read_chunk(backbone: Backbone, groups: ChannelGroups, x: torch.Tensor, y: torch.Tensor, n_way: int,
                taylor: bool, head: dict[str, torch.Tensor] | None = None) -> _Chunk:
    """One forward pass over ``x``; with ``taylor`` also one backward of the set loss, whose prototype head is
    ``head`` (the whole set's) or, when None, built from ``x`` itself (``x`` is the whole set)."""
    acts: dict[str, torch.Tensor] = {}
    points = {name for g in groups for name in (g.mask_points if taylor else g.mask_points[:1])}

    def keep(name):
        def hook(module, inputs, out):
            acts[name] = out
        return hook

    handles = [backbone.get_submodule(name).register_forward_hook(keep(name)) for name in points]
    try:
        with torch.set_grad_enabled(taylor):
            feats = backbone.forward_features(x.detach().requires_grad_(taylor))
            if taylor:
                head = head or prototype_head(feats.detach(), y, n_way, unit_scale=True)
                names = sorted(points)
                grad_of = dict(zip(names, torch.autograd.grad(_set_loss(feats, y, head), [acts[n] for n in names])))
    finally:
        for h in handles:
            h.remove()
    scores = None
    if taylor:  # per image |Σ_mask points Σ_spatial a·∂L/∂a|: removing a channel removes it everywhere at once
        scores = [sum((acts[n] * grad_of[n]).flatten(2).sum(2) if acts[n].dim() > 2 else acts[n] * grad_of[n]
                      for n in g.mask_points).abs().sum(0).detach().float() for g in groups]
    return _Chunk(feats.detach(), [_pooled(acts[g.mask_points[0]].detach()).float() for g in groups], scores)


def read_set(backbone: Backbone, groups: ChannelGroups, x: torch.Tensor, n_way: int,
             stats: Sequence[str] = LEGACY_STATS, micro_batch: int = 0) -> SetInputs:
    """Normalised, class-grouped images ``[N*K, 3, H, W]`` → :class:`SetInputs`. Nothing here carries a
    gradient to the meta-learned module: these are its inputs, read while the backbone stays fixed.

    ``micro_batch`` > 0 reads the set that many images at a time (memory grows with the chunk, not the
    set); ``taylor`` then takes a second pass, since its loss needs the whole set's prototypes first."""
    taylor = "taylor" in stats
    y = torch.arange(n_way, device=x.device).repeat_interleave(len(x) // n_way)
    if not micro_batch or len(x) <= micro_batch:
        chunks = [_read_chunk(backbone, groups, x, y, n_way, taylor)]
    else:
        xs, ys = x.split(micro_batch), y.split(micro_batch)
        chunks = [_read_chunk(backbone, groups, c, yc, n_way, False) for c, yc in zip(xs, ys)]
        if taylor:
            head = prototype_head(torch.cat([c.features for c in chunks]), y, n_way, unit_scale=True)
            for chunk, (c, yc) in zip(chunks, zip(xs, ys)):
                chunk.taylor = _read_chunk(backbone, groups, c, yc, n_way, True, head).taylor
    feats = torch.cat([c.features for c in chunks])
    out = []
    for i in range(len(groups)):
        raw = {"taylor": sum(c.taylor[i] for c in chunks)} if taylor else {}
        out.append(channel_statistics(torch.cat([c.pooled[i] for c in chunks]), n_way, stats, raw))
    return SetInputs(feats.view(n_way, -1, feats.shape[-1]), out)
