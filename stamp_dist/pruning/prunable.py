"""A pretrained backbone as every pruner sees it: the network, its record, channel groups, MACs model (and, on
demand, its measured latency model: ``budget``) and input normalisation, assembled in one place
(``PrunableBackbone.load`` / ``.build``).

The meta-trainer, the generator artifact, the methods' ``Source`` and the bench all prune through one of
these; it lives in the pruning layer so that each of them can import it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ..choices import BUDGET_KINDS
from ..data.readers import Normalization
from ..devices import bound_host_allocator, memory_format
from ..errors import StampError
from ..integrity import digest
from ..models.backbones import Backbone
from ..models.saved import load_backbone
from .budget import BudgetCost, MacsBudget
from .groups import ChannelGroups, discover_groups
from .latency import latency_model
from .macs import CostModel
from .masking import masked


@dataclass
class PrunableBackbone:
    backbone: Backbone
    record: dict  # backbone.json: architecture, width, classes, image size, normalisation
    groups: ChannelGroups
    cost: CostModel
    path: Path | None = None  # where it was read: a pretrain run, or the generator artifact holding it
    # Images per forward pass when reading a set or scoring an episode (``runtime.micro_batch``; 0 = all at
    # once): memory then grows with this, not with the episode or the target sample.
    micro_batch: int = 0
    _latency: dict = field(default_factory=dict, repr=False)  # batch size → LatencyModel

    @classmethod
    def build(cls, backbone: Backbone, record: dict, path: Path | None = None) -> "PrunableBackbone":
        """Channel groups and MACs model of ``backbone`` (already on its device), traced at the record's image size.
        The backbone takes its device's layout (``devices.memory_format``: channels_last on CUDA), which
        ``features`` feeds it."""
        size = record["image_size"]
        device = next(backbone.parameters()).device
        groups = discover_groups(backbone, torch.zeros(1, 3, size, size, device=device))
        backbone.to(memory_format=memory_format(device))
        return cls(backbone, record, groups, CostModel(backbone, groups, (3, size, size)), path)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device, fix: str = "re-run `stamp pretrain`",
             trainable: bool = False, micro_batch: int = 0) -> "PrunableBackbone":
        """A saved backbone (``models/saved.py``; ``fix`` ends its errors) on ``device`` in eval mode, frozen
        unless ``trainable`` (``meta.learn_backbone``)."""
        backbone, record = load_backbone(directory, fix)
        net = cls.build(backbone.to(device).eval().requires_grad_(trainable), record, Path(directory))
        net.micro_batch = micro_batch
        if micro_batch:
            bound_host_allocator()
        return net

    def features(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``forward_features(x)`` with each group's channels scaled by ``masks`` (if given), ``micro_batch``
        images at a time. Chunks that carry a gradient are checkpointed: their activations are recomputed in
        the backward pass instead of kept, so an episode's memory does not grow with its images. (The backbone
        is in eval mode, so chunking does not change BatchNorm.)"""
        def run(chunk: torch.Tensor, *ms: torch.Tensor) -> torch.Tensor:
            with masked(self.backbone, self.groups, ms) if ms else nullcontext():
                return self.backbone.forward_features(chunk)

        ms = tuple(masks or ())
        x = x.contiguous(memory_format=memory_format(x.device))
        if not self.micro_batch or len(x) <= self.micro_batch:
            return run(x, *ms)
        grad = torch.is_grad_enabled() and (any(m.requires_grad for m in ms) or
                                            any(p.requires_grad for p in self.backbone.parameters()))
        return torch.cat([checkpoint(run, c, *ms, use_reentrant=False) if grad else run(c, *ms)
                          for c in x.split(self.micro_batch)])

    def budget(self, kind: str = "macs", batch: int = 64) -> BudgetCost:
        """What a budget of ``kind`` is a fraction of: the MACs, or the latency at ``batch`` images on this
        backbone's device, measured once and cached next to the backbone (``path``) as a table that later runs
        read (pruning/latency.py)."""
        if kind not in BUDGET_KINDS:
            raise StampError(f"unknown budget kind {kind!r}; choose one of {', '.join(BUDGET_KINDS)}")
        if kind == "macs":
            return MacsBudget(self.cost)
        if batch not in self._latency:
            self._latency[batch] = latency_model(self.backbone, self.groups, self.input_size, batch, self.path)
        return self._latency[batch]

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.record["image_size"], self.record["image_size"])

    @cached_property
    def norm(self) -> Normalization:
        return Normalization.of(self.record)

    def fingerprint(self) -> str:
        """A hash of the weights as they are now: a generator is only valid for the exact backbone it was
        trained on."""
        return digest(self.backbone.state_dict())
