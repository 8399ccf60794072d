"""Downstream pruning's building blocks: a target sample, STAMP's masks for it, and the surgery path.

encode a sample set of the target → (optional) adapt the generator for a few steps on the target →
keep probabilities → hard mask meeting the MACs budget (``stamp_masks``) → channel surgery → a new
N-way head initialised from class prototypes (``build_pruned``, shared by every method). The methods
and `stamp prune` itself (one artifact, ``model.safetensors`` + ``spec.json``, for every method) are
in ``methods.py``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PruneConfig
from .data.episodes import Task, build_episode
from .data.manifest import Manifest
from .data.readers import load_split
from .errors import StampError
from .meta.artifact import Generator
from .meta.objective import episode_loss, hard_masks
from .models.heads import prototype_head
from .pruning.budget import Budgeted
from .pruning.prunable import PrunableBackbone
from .pruning.surgery import prune_model


@dataclass
class Target:
    """A labelled sample of the target dataset, checked against the backbone's input format."""

    x: torch.Tensor  # uint8 [N*K, 3, H, W], grouped by class
    y: torch.Tensor
    manifest: Manifest
    path: Path

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes


def load_target(data: str | Path, samples_per_class: int, backbone_meta: dict, split: str = "train") -> Target:
    manifest = Manifest.load(data)
    if manifest.num_classes < 2:
        raise StampError(f"target {data} has {manifest.num_classes} class; pruning for a task needs at least 2")
    size = backbone_meta["image_size"]
    if manifest.image_size != size or manifest.channels != 3:
        raise StampError(
            f"target {data} holds {manifest.channels}×{manifest.image_size}×{manifest.image_size} images but the "
            f"backbone takes 3×{size}×{size}: convert it with `stamp data convert ... --image-size {size}`"
        )
    x, y, _ = load_split(data, split, per_class=samples_per_class)
    if x.shape[1:] != (3, size, size):
        raise StampError(f"target {data}: images decode to {tuple(x.shape[1:])}, expected (3, {size}, {size}); "
                         "the shards do not match their manifest — re-create them")
    return Target(x, y, manifest, Path(data))


def adapt_generator(gen: Generator, target: Target, budget: float, steps: int, lr: float, seed: int):
    """A few gradient steps of the generator (a copy) on episodes built from the target sample:
    each step splits every class's images into support and query halves at random."""
    stamp = copy.deepcopy(gen.stamp).train()
    opt = torch.optim.Adam(stamp.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed)
    per_class = target.x.view(target.num_classes, -1, *target.x.shape[1:])
    k = per_class.shape[1] // 2
    if k < 1:
        raise StampError("adaptation needs at least 2 images per class (samples_per_class >= 2)")
    for _ in range(steps):
        images = [c[torch.randperm(len(c), generator=rng)] for c in per_class]
        episode = build_episode(images, Task(list(range(target.num_classes)), budget), k)
        out = episode_loss(gen.net, stamp, episode, rng)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return stamp.eval()


def stamp_masks(gen: Generator, stamp, target: Target, budget: float, p: PruneConfig,
                cost: Budgeted | None = None) -> list[torch.Tensor]:
    """Read the target sample with the frozen backbone and turn the generator's keep logits into hard
    masks at ``budget`` of ``cost`` (default: the MACs) under ``p``'s allocation (None = the generator's own),
    selection, round_to (None = the device's: ``default_round_to``) and seed."""
    net = gen.net
    x = net.norm(target.x.to(net.device))
    round_to = p.round_to if p.round_to is not None else default_round_to(net.device)
    return hard_masks(stamp, net.cost if cost is None else cost, stamp.read(net, x, target.num_classes), budget,
                      round_to, p.allocation, p.selection, p.seed)


def default_round_to(device: torch.device) -> int:
    """``prune.round_to`` when unset: multiples of 8 channels suit GPU kernels (tensor cores); 1 on CPU."""
    return 8 if device.type == "cuda" else 1


@torch.no_grad()
def build_pruned(net: PrunableBackbone, masks: list[torch.Tensor], target: Target) -> torch.nn.Module:
    """Physically remove the unmasked channels and attach an N-way head initialised from the
    class prototypes of the pruned network's features on the target sample (read ``net.micro_batch`` images at
    a time, if set: the sample's activations are never all alive at once)."""
    pruned = prune_model(net.backbone, net.groups, masks).eval()
    chunks = target.x.split(net.micro_batch) if net.micro_batch else [target.x]
    feats = torch.cat([pruned.forward_features(net.norm(c)) for c in chunks])
    head = prototype_head(feats, target.y, target.num_classes, unit_scale=True)
    pruned.fc = torch.nn.Linear(feats.shape[1], target.num_classes, device=feats.device)
    pruned.fc.weight.copy_(head["fc.weight"])
    pruned.fc.bias.copy_(head["fc.bias"])
    return pruned
