"""A pretrained backbone as every pruner sees it: the network, its record, channel groups, MACs model and
input normalisation, assembled in one place (``PrunableBackbone.load`` / ``.build``).

The meta-trainer, the generator artifact, the methods' ``Source`` and the bench all prune through one of
these; it lives in the pruning layer so that each of them can import it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..data.readers import Normalization
from ..models.backbones import Backbone
from ..models.saved import load_backbone
from .groups import ChannelGroups, discover_groups
from .macs import CostModel


@dataclass
class PrunableBackbone:
    backbone: Backbone
    record: dict  # backbone.json: architecture, width, classes, image size, normalisation
    groups: ChannelGroups
    cost: CostModel
    path: Path | None = None  # where it was read: a pretrain run, or the generator artifact holding it

    @classmethod
    def build(cls, backbone: Backbone, record: dict, path: Path | None = None) -> "PrunableBackbone":
        """Channel groups and MACs model of ``backbone`` (already on its device), traced at the record's image size."""
        size = record["image_size"]
        device = next(backbone.parameters()).device
        groups = discover_groups(backbone, torch.zeros(1, 3, size, size, device=device))
        return cls(backbone, record, groups, CostModel(backbone, groups, (3, size, size)), path)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device, fix: str = "re-run `stamp pretrain`",
             trainable: bool = False) -> "PrunableBackbone":
        """A saved backbone (``models/saved.py``; ``fix`` ends its errors) on ``device`` in eval mode, frozen
        unless ``trainable`` (``meta.learn_backbone``)."""
        backbone, record = load_backbone(directory, fix)
        return cls.build(backbone.to(device).eval().requires_grad_(trainable), record, Path(directory))

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
        h = hashlib.sha256()
        for name, t in sorted(self.backbone.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
