"""Episode (task) sampling from per-class shards.

A task is N classes drawn from a pool of class ids, with K support and Q query images per class
and a MACs budget ``b``. ``ClassPool`` is the per-class bounded image buffer that the single-process
trainer uses directly and that the distributed sampler actors wrap: it reads a class's shards only
when the class is first asked for, keeps at most ``buffer_size`` images per class, and reloads a
fresh random subset once a class has served its buffer ``reuse`` times over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import read_json
from ..config import MetaConfig
from ..errors import StampError
from .manifest import Manifest
from .readers import iter_class
from .transforms import apply_task_transforms


@dataclass(frozen=True)
class Task:
    """What a task is, decided before any image is read: its classes (reference ids, in task-label
    order), its budget, and the domain transforms applied to all of its images (data/transforms.py)."""

    classes: list[int]
    budget: float
    transforms: tuple[str, ...] = ()


@dataclass
class Episode:
    support_x: torch.Tensor  # uint8 [N*K, 3, H, W], grouped by class
    support_y: torch.Tensor  # long [N*K], task-local labels 0..N-1
    query_x: torch.Tensor  # uint8 [N*Q, 3, H, W]
    query_y: torch.Tensor
    classes: list[int]  # reference class ids, in task-label order
    budget: float
    transforms: tuple[str, ...] = ()

    @property
    def n_way(self) -> int:
        return len(self.classes)


class ClassPool:
    """Bounded per-class image buffers over one split of a per-class shard dataset.

    Which images fill a class's buffer is a pure function of ``(seed, class, fill number)``, so the
    pool's whole state is small — the draw RNG and, per class, the fill number and the images served
    from it (``state``) — and a pool restored from it serves exactly the images the original would
    have, whatever the class sizes (a resumed run is bit-identical to an uninterrupted one)."""

    def __init__(self, root: str | Path, split: str = "train", buffer_size: int = 512, reuse: int = 4,
                 seed: int = 0, manifest: Manifest | None = None):
        self.root = Path(root)
        self.manifest = manifest or Manifest.load(root)
        self.split = split
        self.buffer_size = buffer_size
        self.reuse = reuse
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._buffers: dict[int, torch.Tensor] = {}
        self._fills: dict[int, int] = {}  # per class: how many times its buffer was filled
        self._served: dict[int, int] = {}  # per class: images served from the current fill

    def _load(self, label: int, fill: int) -> torch.Tensor:
        """The buffer of fill number ``fill`` of a class: all its images, or a subset chosen by ``(seed, label, fill)``."""
        count = self.manifest.split(self.split).counts[label]
        keep = min(count, self.buffer_size)
        subset = np.random.default_rng([self.seed, label, fill])
        # Pick indices first, then stream the shards once, decoding only the chosen images.
        chosen = set(subset.choice(count, size=keep, replace=False).tolist()) if keep < count else None
        images = list(iter_class(self.root, self.manifest, self.split, label, chosen))
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()

    def get(self, label: int, n: int) -> torch.Tensor:
        """``n`` distinct images of class ``label`` (uint8 ``[n, 3, H, W]``), drawn at random."""
        count = self.manifest.split(self.split).counts[label]
        if n > count:
            raise StampError(
                f"class '{self.manifest.classes[label]}' has {count} '{self.split}' images in {self.root}; "
                f"an episode needs {n} (k_shot + q_query): lower them"
            )
        buf = self._buffers.get(label)
        if buf is None and label in self._fills:  # restored from a state: the buffer it had
            buf = self._buffers[label] = self._load(label, self._fills[label])
        if buf is None or len(buf) < n or self._served[label] >= self.reuse * len(buf):
            self._fills[label] = self._fills.get(label, 0) + 1
            buf = self._buffers[label] = self._load(label, self._fills[label])
            self._served[label] = 0
        self._served[label] += n
        idx = torch.from_numpy(self.rng.choice(len(buf), size=n, replace=False))
        return buf[idx]

    def state(self) -> dict:
        """What ``set_state`` needs to continue exactly: the draw RNG, and per class the fill and images served."""
        return {"rng": self.rng.bit_generator.state, "fills": [[c, f, self._served[c]] for c, f in self._fills.items()]}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._buffers.clear()  # rebuilt on demand from the fill numbers
        self._fills = {int(c): int(f) for c, f, _ in state["fills"]}
        self._served = {int(c): int(n) for c, _, n in state["fills"]}


def split_classes(num_classes: int, val_classes: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic split of reference classes into meta-train and held-out meta-validation ids."""
    if not 0 <= val_classes <= num_classes - 2:
        raise StampError(f"meta.val_classes={val_classes} leaves fewer than 2 of {num_classes} classes to meta-train on")
    perm = np.random.default_rng(seed).permutation(num_classes).tolist()
    return sorted(perm[val_classes:]), sorted(perm[:val_classes])


def task_families(spec: str, manifest: Manifest, classes: list[int], n_way_min: int) -> list[list[int]]:
    """Families of related classes among ``classes`` (``meta.task_families``), each a list of class ids.

    A task drawn inside one family must tell apart classes that share something (a colour, a
    superclass), so it needs other channels than a task across families: without such tasks every
    reference task wants the same channels and the generator has no reason to look at the set.

    * ``none``: no families.
    * ``name_tokens``: classes whose names share a token (split on ``-``, ``_`` or spaces) form a
      family: ``red-flat-disk`` belongs to ``red``, ``flat`` and ``disk``.
    * a path to a JSON file ``{family: [class names]}`` (e.g. WordNet subtrees, as in tieredImageNet).

    Families with fewer than ``n_way_min`` of ``classes``, or holding all of them, are dropped.
    """
    if spec == "none":
        return []
    if spec == "name_tokens":
        groups: dict[str, list[int]] = {}
        for c in classes:
            for token in set(re.split(r"[-_ ]+", manifest.classes[c])):
                groups.setdefault(token, []).append(c)
    else:
        path = Path(spec)
        if not path.is_file():
            raise StampError(f"meta.task_families is {spec!r}: not 'none', 'name_tokens' or an existing JSON file "
                             "mapping family names to class names")
        data = read_json(path, "task families")
        index = {name: i for i, name in enumerate(manifest.classes)}
        unknown = sorted({n for names in data.values() for n in names} - index.keys())
        if unknown:
            raise StampError(f"{path}: classes {unknown[:5]} are not in the reference dataset's manifest")
        wanted = set(classes)
        groups = {f: [index[n] for n in names if index[n] in wanted] for f, names in data.items()}
    return [sorted(g) for _, g in sorted(groups.items()) if n_way_min <= len(g) < len(classes)]


def sample_task(rng: np.random.Generator, classes: list[int], m: MetaConfig,
                families: list[list[int]] = ()) -> Task:
    """Which classes, budget and domain transforms a task uses (cheap; decided before any image is read).
    With ``families``, a fraction ``m.family_tasks`` of tasks draws its classes inside one family; each of
    ``m.task_transforms`` applies with probability ``m.task_transform_prob`` (drawn only when some are
    configured, so runs without them keep their task stream)."""
    if families and rng.random() < m.family_tasks:
        classes = families[int(rng.integers(len(families)))]
    n_max = min(m.n_way_max, len(classes))
    if n_max < 2:
        raise StampError(f"need at least 2 classes to build a task, have {len(classes)}")
    n = int(rng.integers(min(m.n_way_min, n_max), n_max + 1))
    chosen = sorted(rng.choice(classes, size=n, replace=False).tolist())
    budget = float(rng.uniform(m.budget_min, m.budget_max))
    transforms = tuple(t for t in m.task_transforms if rng.random() < m.task_transform_prob)
    return Task(chosen, budget, transforms)


def build_episode(images_per_class: list[torch.Tensor], task: Task, k_shot: int) -> Episode:
    """Split each class's ``k_shot + q`` images into support and query sets, after the task's transforms."""
    sx, sy, qx, qy = [], [], [], []
    for i, x in enumerate(images_per_class):
        x = apply_task_transforms(x, task.transforms)
        sx.append(x[:k_shot])
        qx.append(x[k_shot:])
        sy.append(torch.full((k_shot,), i, dtype=torch.long))
        qy.append(torch.full((len(x) - k_shot,), i, dtype=torch.long))
    return Episode(torch.cat(sx), torch.cat(sy), torch.cat(qx), torch.cat(qy), list(task.classes), task.budget,
                   task.transforms)


class EpisodeSampler:
    """Draws tasks from a ``ClassPool`` restricted to ``classes`` (meta-train or meta-val ids)."""

    def __init__(self, pool: ClassPool, classes: list[int], m: MetaConfig, seed: int = 0,
                 families: list[list[int]] = ()):
        self.pool, self.classes, self.cfg = pool, list(classes), m
        self.families = list(families)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> Episode:
        task = sample_task(self.rng, self.classes, self.cfg, self.families)
        images = [self.pool.get(c, self.cfg.k_shot + self.cfg.q_query) for c in task.classes]
        return build_episode(images, task, self.cfg.k_shot)
