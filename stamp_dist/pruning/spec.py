"""Pruned-model artifacts: ``model.safetensors`` + ``spec.json``, no pickle anywhere.

The spec names the backbone and, per channel group, the kept channel indices in the dense network's
numbering; loading rebuilds the dense backbone, prunes it with those indices and loads the weights
strictly, so the architecture comes from data, never from unpickled code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, atomic_file, read_json, write_json
from ..errors import StampError
from ..models.backbones import build_backbone
from .groups import ChannelGroups, discover_groups
from .surgery import keep_indices, prune_model

MODEL_FILE, SPEC_FILE = "model.safetensors", "spec.json"


@dataclass
class GroupSpec:
    name: str
    channels: int  # in the dense network
    kept: list[int]  # kept channel indices, dense numbering


@dataclass
class PruningSpec:
    backbone: str
    width: int
    num_classes: int  # of the pruned model's head
    input_size: list[int]  # [C, H, W] the MACs are counted at
    groups: list[GroupSpec]
    dense_macs: float
    pruned_macs: float
    dense_params: int
    pruned_params: int
    mean: list[float] | None = None  # input normalisation, so the shipped model is usable as is
    std: list[float] | None = None
    report: dict[str, Any] = dataclasses.field(default_factory=dict)  # how it was made (method, timings …)

    @classmethod
    def from_masks(cls, backbone_meta: dict[str, Any], groups: ChannelGroups, masks: Sequence[torch.Tensor],
                   num_classes: int, report: dict[str, Any]) -> "PruningSpec":
        """``backbone_meta``: ``backbone``, ``width``, ``image_size`` (+ ``mean``, ``std``);
        ``report``: at least ``macs``, ``params``, ``dense_macs``, ``dense_params``."""
        size = backbone_meta["image_size"]
        return cls(
            backbone=backbone_meta["backbone"], width=backbone_meta["width"], num_classes=num_classes,
            input_size=[3, size, size],
            groups=[GroupSpec(g.name, g.channels, keep_indices(k)) for g, k in zip(groups, masks)],
            dense_macs=float(report["dense_macs"]), pruned_macs=float(report["macs"]),
            dense_params=int(report["dense_params"]), pruned_params=int(report["params"]),
            mean=backbone_meta.get("mean"), std=backbone_meta.get("std"), report=dict(report))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruningSpec":
        try:
            groups = [GroupSpec(**g) for g in d["groups"]]
            return cls(**{**d, "groups": groups})
        except (KeyError, TypeError) as e:
            raise StampError(f"invalid pruning spec ({e}); regenerate it with `stamp prune`") from None


def save_pruned(out_dir: str | os.PathLike, model: nn.Module, spec: PruningSpec, overwrite: bool = False) -> Path:
    """Write ``out_dir/{model.safetensors, spec.json}``; the directory appears only when complete."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with atomic_file(tmp / MODEL_FILE) as f:
            save_file(state, str(f))
        write_json(tmp / SPEC_FILE, spec.to_dict())
    return Path(out_dir)


def load_pruned(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, PruningSpec]:
    """Rebuild a pruned model saved by ``save_pruned`` (architecture from the spec, weights strict)."""
    path = Path(path)
    spec = PruningSpec.from_dict(read_json(path / SPEC_FILE, "pruning spec"))
    if not (path / MODEL_FILE).is_file():
        raise StampError(f"pruned model weights not found: {path / MODEL_FILE}")
    try:
        dense = build_backbone(spec.backbone, spec.num_classes, spec.width)
    except ValueError as e:
        raise StampError(f"{path / SPEC_FILE}: {e}") from None
    groups = discover_groups(dense, torch.zeros(1, *spec.input_size))
    if [(g.name, g.channels) for g in groups] != [(g.name, g.channels) for g in spec.groups]:
        raise StampError(f"{path / SPEC_FILE} does not match the channel groups of {spec.backbone} "
                         f"(width {spec.width}); it was written for another architecture or version")
    keep = []
    for g in spec.groups:
        if not g.kept or min(g.kept) < 0 or max(g.kept) >= g.channels:
            raise StampError(f"{path / SPEC_FILE}: group {g.name} has invalid kept indices")
        mask = torch.zeros(g.channels, dtype=torch.bool)
        mask[g.kept] = True
        keep.append(mask)
    model = prune_model(dense, groups, keep)
    try:
        model.load_state_dict(load_file(str(path / MODEL_FILE)), strict=True)
    except RuntimeError as e:
        raise StampError(f"{path / MODEL_FILE} does not match {path / SPEC_FILE}: {e}") from None
    return model.to(device), spec
