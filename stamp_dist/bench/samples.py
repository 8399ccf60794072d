"""The data of a cell: the regime's sample and the scoring set of a target, and the pruning batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.manifest import Manifest
from ..data.readers import load_split
from ..downstream import Target
from ..errors import StampError


@dataclass
class TargetData:
    path: Path
    manifest: Manifest
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def load(cls, path: str | Path) -> "TargetData":
        x, y, manifest = load_split(path, "train")
        tx, ty, _ = load_split(path, "test")
        return cls(Path(path), manifest, (x, y), (tx, ty))


def _pick(labels: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """A bool mask choosing ``per_class`` random entries of each class (all of a smaller class)."""
    picked = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        picked[idx[torch.randperm(len(idx), generator=gen)[:per_class]]] = True
    return picked


def split_sample(data: TargetData, per_class: int, seed: int, eval_per_class: int = 0):
    """The regime's sample (a class-grouped ``Target``) and the scoring set ``(images, labels)``."""
    (x, y), (tx, ty) = data.train, data.test
    gen = torch.Generator().manual_seed(seed)
    picked = _pick(y, per_class, gen) if per_class else torch.ones(len(y), dtype=torch.bool)
    order = torch.argsort(y[picked], stable=True)  # class-grouped, as the set encoder expects
    sample = Target(x[picked][order], y[picked][order], data.manifest, data.path)
    ex, ey = torch.cat([x[~picked], tx]), torch.cat([y[~picked], ty])
    if eval_per_class:
        keep = _pick(ey, eval_per_class, gen)
        ex, ey = ex[keep], ey[keep]
    return sample, (ex, ey)


def pruning_batch(sample: Target, per_class: int, seed: int, device: torch.device) -> Target:
    """``per_class`` random images per class of the sample (class-grouped, equal counts), on ``device``."""
    counts = torch.bincount(sample.y, minlength=sample.num_classes)
    k = min(per_class, int(counts.min()))
    if k < 1:
        raise StampError(f"target {sample.path}: a class has no image in the sample; raise bench.train_per_class")
    picked = _pick(sample.y, k, torch.Generator().manual_seed(seed + 1))
    return Target(sample.x[picked].to(device), sample.y[picked].to(device), sample.manifest, sample.path)
