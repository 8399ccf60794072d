"""Physical channel removal through Torch-Pruning: the result is a plain, smaller ``nn.Module``."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import StampError
from ..models.backbones import replace_head
from .groups import ChannelGroups, build_graph
from .masking import check_masks, masked


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


@torch.no_grad()
def check_prunable(model: nn.Module, groups: ChannelGroups) -> None:
    """Raise StampError unless removing half of every group's channels gives the network that the
    hard mask computes (on a random batch, eval mode): the test that the dependency graph followed
    every op, for a network brought by the user (e.g. a channel shuffle by reshapes is not followed).
    Uses its own random generator, so the global RNG stream is untouched."""
    keep = [torch.arange(c) % 2 == 0 for c in groups.sizes]
    p = next(model.parameters())
    x = torch.randn(2, *groups.input_shape[1:], generator=torch.Generator().manual_seed(0)).to(p)
    was_training = model.training
    try:
        model.eval()
        with masked(model, groups, [k.to(p) for k in keep]):
            want = model(x)
        pruned = prune_model(model, groups, keep).eval()
        got = pruned(x)
        diff = float((got - want).abs().max())
    except StampError:
        raise
    except Exception as e:
        raise StampError(f"{type(model).__name__} breaks when its channel groups are pruned ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): an op the dependency graph does not follow "
                         "(a reshape or view of the channel dim?); build that part from layers") from None
    finally:
        model.train(was_training)
    if not diff <= 1e-4 * (1 + float(want.abs().max())):
        raise StampError(f"{type(model).__name__}: pruning half of every channel group changes its output by {diff:.3g} "
                         "against the masked network: an op the dependency graph does not follow rearranges channels "
                         "(a channel shuffle by view/transpose?); build that part from layers")
