"""Masked forward: scale every group's channels by a (soft or hard) keep vector.

The mask is applied by forward hooks on each group's mask points (its BNs, or convs without a BN),
so every tensor that carries the group's channels is masked consistently, gradients reach the mask,
and the hooks also fire under ``torch.func.functional_call``. With a hard 0/1 mask the eval-mode
output equals that of the physically pruned network.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import StampError
from .groups import ChannelGroups


def _scale(mask: torch.Tensor, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    shape = [1] * output.dim()
    shape[1] = -1  # channels are dim 1 for conv maps [B, C, H, W] and features [B, C]
    return output * mask.to(output).view(shape)


@contextlib.contextmanager
def masked(model: nn.Module, groups: ChannelGroups, masks: Sequence[torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block, ``model`` (called directly or functionally) computes with each group ``g``'s
    channels multiplied by ``masks[g]`` (shape ``[C_g]``)."""
    check_masks(groups, masks)
    handles = []
    try:
        for group, mask in zip(groups, masks):
            for name in group.mask_points:
                handles.append(model.get_submodule(name).register_forward_hook(partial(_scale, mask)))
        yield model
    finally:
        for h in handles:
            h.remove()


def check_masks(groups: ChannelGroups, masks: Sequence[torch.Tensor]) -> None:
    """Raise StampError unless there is one ``[C_g]`` vector per group."""
    if len(masks) != len(groups):
        raise StampError(f"expected {len(groups)} group masks, got {len(masks)}")
    for group, mask in zip(groups, masks):
        if tuple(mask.shape) != (group.channels,):
            raise StampError(f"mask for group {group.index} ({group.name}) has shape {tuple(mask.shape)}, "
                             f"expected ({group.channels},)")
