"""Physical channel removal through Torch-Pruning: the result is a plain, smaller ``nn.Module``."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import StampError
from ..models.backbones import replace_head
from .groups import ChannelGroups, build_graph
from .masking import check_masks


def keep_indices(mask: torch.Tensor) -> list[int]:
    """Indices of the kept channels of one group's 0/1 mask."""
    return torch.nonzero(mask.detach().cpu() > 0.5).flatten().tolist()


def prune_model(model: nn.Module, groups: ChannelGroups, keep: Sequence[torch.Tensor],
                num_classes: int | None = None) -> nn.Module:
    """A trainable deep copy of ``model`` with exactly the channels where ``keep[g]`` is 1 (original numbering).

    Coupled layers (BNs, residual partners, next convs' in-channels, the head's in-features) shrink
    with each group. With ``num_classes`` the copy also gets a fresh head for the target.
    """
    check_masks(groups, keep)
    pruned = copy.deepcopy(model)
    p = next(pruned.parameters())
    dg = build_graph(pruned, torch.zeros(groups.input_shape, device=p.device, dtype=p.dtype))
    for group, mask in zip(groups, keep):
        kept = set(keep_indices(mask))
        if not kept:
            raise StampError(f"group {group.index} ({group.name}) would lose all its channels; keep at least one")
        removed = [i for i in range(group.channels) if i not in kept]
        if removed:
            # Groups are disjoint, so removing one group's channels leaves every other group's
            # original channel numbering intact.
            root = pruned.get_submodule(group.name)
            pruner = dg.get_pruner_of_module(root)
            dg.get_pruning_group(root, pruner.prune_out_channels, removed).prune()
    if hasattr(pruned, "feature_dim") and hasattr(pruned, "fc"):
        pruned.feature_dim = pruned.fc.in_features
    if num_classes is not None:
        replace_head(pruned, num_classes)
    # Torch-Pruning re-creates the parameters of pruned layers (trainable) but leaves untouched ones
    # as they were: a frozen source (the meta-learning backbone) would give a half-frozen copy.
    return pruned.requires_grad_(True)
