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


def channel_statistics(acts: torch.Tensor, n_way: int, names: Sequence[str] = LEGACY_STATS,
                       raw: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``acts`` ``[N*K, C, ...]`` (class-grouped) → ``[C, len(names)]`` standardised statistics; ``raw``
    holds the ``[C]`` scores not computed from ``acts`` (``taylor``) that ``names`` asks for."""
    v = _pooled(acts)
    raw = raw or {}
    columns = {
        "activity": lambda: _log(v.mean(0)),
        "fisher": lambda: _log(fisher_ratio(v, n_way)),
        "redundancy": lambda: redundancy(v),
        **{name: (lambda s=s: _log(s.to(v))) for name, s in raw.items()},
    }
    return torch.stack([_standardise(columns[n]()) for n in names], dim=1)


def _set_loss(feats: torch.Tensor, y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Cross-entropy of a unit-scale nearest-prototype head built from the set itself (the head a
    pruned model starts fine-tuning from); summed, so ``∂L/∂a`` does not shrink with the set size."""
    head = prototype_head(feats.detach(), y, n_way, unit_scale=True)
    return F.cross_entropy(F.linear(feats, head["fc.weight"], head["fc.bias"]), y, reduction="sum")


def read_set(backbone: Backbone, groups: ChannelGroups, x: torch.Tensor, n_way: int,
             stats: Sequence[str] = LEGACY_STATS) -> SetInputs:
    """Normalised, class-grouped images ``[N*K, 3, H, W]`` → :class:`SetInputs`. Nothing here carries a
    gradient to the meta-learned module: these are its inputs, read while the backbone stays fixed."""
    need_grad = "taylor" in stats
    acts: dict[str, torch.Tensor] = {}
    points = {name for g in groups for name in (g.mask_points if need_grad else g.mask_points[:1])}

    def keep(name):
        def hook(module, inputs, out):
            acts[name] = out
        return hook

    handles = [backbone.get_submodule(name).register_forward_hook(keep(name)) for name in points]
    try:
        with torch.set_grad_enabled(need_grad):
            feats = backbone.forward_features(x.detach().requires_grad_(need_grad))
            if need_grad:
                y = torch.arange(n_way, device=x.device).repeat_interleave(len(x) // n_way)
                names = sorted(points)
                grads = torch.autograd.grad(_set_loss(feats, y, n_way), [acts[n] for n in names])
                grad_of = dict(zip(names, grads))
    finally:
        for h in handles:
            h.remove()
    out = []
    for g in groups:
        raw = {}
        if need_grad:  # Σ_images |Σ_mask points Σ_spatial a·∂L/∂a|: removing a channel removes it everywhere at once
            per_image = sum((acts[n] * grad_of[n]).flatten(2).sum(2) if acts[n].dim() > 2 else acts[n] * grad_of[n]
                            for n in g.mask_points)
            raw["taylor"] = per_image.abs().sum(0).detach().float()
        out.append(channel_statistics(acts[g.mask_points[0]].detach().float(), n_way, stats, raw))
    return SetInputs(feats.detach().view(n_way, -1, feats.shape[-1]), out)
