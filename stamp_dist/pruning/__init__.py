"""Channel groups, masked forward, MACs / budget, hard masks, physical surgery, pruned artifacts."""

from .groups import ChannelGroups, Group, LayerCall, discover_groups
from .hardmask import budget_mask
from .macs import CostModel
from .masking import masked
from .spec import GroupSpec, PruningSpec, load_pruned, save_pruned
from .surgery import check_prunable, keep_indices, prune_model

__all__ = [
    "ChannelGroups", "CostModel", "Group", "GroupSpec", "LayerCall", "PruningSpec", "budget_mask",
    "check_prunable", "discover_groups", "keep_indices", "load_pruned", "masked", "prune_model", "save_pruned",
]
