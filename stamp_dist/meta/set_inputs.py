"""What STAMP reads from a labelled sample set: one dense forward pass of the frozen backbone gives

* ``features`` ``[N, K, D]``: penultimate features per class, the set encoder's input (→ task embedding ``r``);
* ``channel_stats``: per channel group ``g``, a ``[C_g, 2]`` matrix describing how each channel
  responds to *this* set — its mean activation and its class separability (Fisher ratio) —
  each log-scaled and standardised across the group's channels.

Why the statistics: a single pooled embedding ``r`` has to name every channel worth keeping through
a learned lookup, and in meta-training that path collapsed (every task got the same embedding and
the same mask). Per-channel statistics are task-dependent by construction — a channel that separates
digits but not shapes scores high on one set and low on the other — so the generator only has to
learn *how to weigh* them, with one small network shared by every channel of every group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.backbones import Backbone
from ..pruning.groups import ChannelGroups

NUM_STATS = 2


@dataclass
class SetInputs:
    features: torch.Tensor  # [N, K, D]
    channel_stats: list[torch.Tensor]  # per group [C_g, NUM_STATS]


def _standardise(s: torch.Tensor) -> torch.Tensor:
    """log-scale (relative floor, so dead channels do not dominate) and z-score across channels."""
    s = (s + 1e-3 * s.mean() + 1e-8).log()
    return (s - s.mean()) / s.std(unbiased=False).clamp_min(1e-3)


def channel_statistics(acts: torch.Tensor, n_way: int) -> torch.Tensor:
    """``acts`` ``[N*K, C, ...]`` (class-grouped) → ``[C, 2]``: standardised mean activation and
    Fisher ratio (variance of the class means over the mean within-class variance) per channel,
    computed on ReLU'd, spatially pooled responses."""
    v = acts.relu().flatten(2).mean(2) if acts.dim() > 2 else acts.relu()  # [N*K, C]
    per_class = v.view(n_way, -1, v.shape[1])
    means = per_class.mean(1)  # [N, C]
    between = means.var(0, unbiased=False)
    within = per_class.var(1, unbiased=False).mean(0)
    fisher = between / (within + 1e-3 * within.mean() + 1e-8)
    return torch.stack([_standardise(v.mean(0)), _standardise(fisher)], dim=1)


@torch.no_grad()
def read_set(backbone: Backbone, groups: ChannelGroups, x: torch.Tensor, n_way: int) -> SetInputs:
    """Normalised, class-grouped images ``[N*K, 3, H, W]`` → :class:`SetInputs` (no gradient: these are
    inputs of the meta-learned module; the backbone stays fixed while they are read)."""
    acts: dict[int, torch.Tensor] = {}
    # A group's first mask point is the first tensor carrying its channels (BN output, before the mask).
    handles = [backbone.get_submodule(g.mask_points[0]).register_forward_hook(
        lambda m, i, out, index=g.index: acts.__setitem__(index, out)) for g in groups]
    try:
        feats = backbone.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    stats = [channel_statistics(acts[g.index].float(), n_way) for g in groups]
    return SetInputs(feats.view(n_way, -1, feats.shape[-1]), stats)
