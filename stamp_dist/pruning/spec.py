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

from ..atomic import atomic_dir, atomic_file, read_json, write_json
from ..errors import StampError
from ..integrity import load_tensors, save_tensors
from ..models.backbones import build_backbone
from ..records import MAX_IMAGE_SIZE, check_record, is_int, stats_problem
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
    weights_sha256: str | None = None  # of model.safetensors, set by save_pruned (None: written before hashes)

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
    def from_dict(cls, d: Any, path: str | os.PathLike = SPEC_FILE) -> "PruningSpec":
        """A spec read from ``path``, every field checked before anything is built from it."""
        path = Path(path)
        fix = "regenerate it with `stamp prune`"
        check_record(d, {"backbone": str, "width": int, "num_classes": int, "input_size": list, "groups": list,
                         "dense_macs": (int, float), "pruned_macs": (int, float), "dense_params": int,
                         "pruned_params": int, "report": dict}, path, fix)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise StampError(f"{path} has unknown fields {unknown}; {fix}")
        size = d["input_size"]
        if not (len(size) == 3 and all(is_int(x) for x in size) and size[0] == 3 and size[1] == size[2]
                and 1 <= size[1] <= MAX_IMAGE_SIZE):
            raise StampError(f"{path}: 'input_size' is {size}; expected [3, S, S] with S in [1, {MAX_IMAGE_SIZE}]; {fix}")
        if (d.get("mean") is None) != (d.get("std") is None) or (d.get("mean") is not None and stats_problem(d)):
            raise StampError(f"{path}: 'mean' and 'std' must both be 3 finite numbers (std > 0) or both absent; {fix}")
        groups = []
        for g in d["groups"]:
            check_record(g, {"name": str, "channels": int, "kept": list}, path, fix)
            kept = g["kept"]
            if not (kept and all(is_int(i) for i in kept) and kept == sorted(set(kept))
                    and 0 <= kept[0] and kept[-1] < g["channels"]):
                raise StampError(f"{path}: group {g['name']} keeps {kept[:8]}{'…' if len(kept) > 8 else ''}: kept "
                                 f"channels must be distinct integers in ascending order, within 0..{g['channels'] - 1} "
                                 f"(at least one); {fix}")
            groups.append(GroupSpec(**g))
        return cls(**{**d, "groups": groups})


def save_pruned(out_dir: str | os.PathLike, model: nn.Module, spec: PruningSpec, overwrite: bool = False) -> Path:
    """Write ``out_dir/{model.safetensors, spec.json}`` (the spec records the weights' sha256); the
    directory appears only when complete. Non-finite weights are refused."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with atomic_file(tmp / MODEL_FILE) as f:
            spec.weights_sha256 = save_tensors(model.state_dict(), f, "the pruned model")
        write_json(tmp / SPEC_FILE, spec.to_dict())
    return Path(out_dir)


def load_pruned(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, PruningSpec]:
    """Rebuild a pruned model saved by ``save_pruned`` (architecture from the spec, weights hash-checked, strict)."""
    path = Path(path)
    spec = PruningSpec.from_dict(read_json(path / SPEC_FILE, "pruning spec"), path / SPEC_FILE)
    fix = f"the pruned model {path} is damaged: copy it again or re-create it with `stamp prune`"
    weights = load_tensors(path / MODEL_FILE, "pruned model weights", spec.weights_sha256, fix)
    try:
        dense = build_backbone(spec.backbone, spec.num_classes, spec.width, spec.input_size[1])
    except StampError as e:
        raise StampError(f"{path / SPEC_FILE}: {e}") from None
    groups = discover_groups(dense, torch.zeros(1, *spec.input_size))
    if [(g.name, g.channels) for g in groups] != [(g.name, g.channels) for g in spec.groups]:
        raise StampError(f"{path / SPEC_FILE} does not match the channel groups of {spec.backbone} "
                         f"(width {spec.width}); it was written for another architecture or version")
    keep = []
    for g in spec.groups:
        mask = torch.zeros(g.channels, dtype=torch.bool)
        mask[g.kept] = True
        keep.append(mask)
    model = prune_model(dense, groups, keep)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise StampError(f"{path / MODEL_FILE} does not match {path / SPEC_FILE}: {e}") from None
    return model.to(device), spec
