"""Episode (task) sampling from per-class shards.

A task is N classes drawn from a pool of class ids, with K support and Q query images per class
and a MACs budget ``b``. ``ClassPool`` is the per-class bounded image buffer: it reads a class's shards
only when the class is first asked for, keeps at most ``buffer_size`` images per class, and reloads a
fresh random subset once a class has served its buffer ``reuse`` times over.

Meta-training's task stream is the same on every backend and world size: episode ``i`` of meta-step
``s`` (``i`` its index in the GLOBAL meta-batch) is ``sample_task(task_rng(seed, s, i), …)``, and its
images come from the pool that owns each class (``PoolPlan``: ``runtime.sampler_actors`` pools, class
``c`` in pool ``k`` when ``c`` is in ``classes[k::n]``, pool ``k`` seeded from ``(seed, k)``), drawn
with an RNG keyed by ``(s, i)``. ``EpisodeStream`` assembles a rank's episodes from such pools:
in-process ``ClassPools`` on the local backend, Ray sampler actors (one pool each) on Ray.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import read_json
from ..config import MetaConfig, RuntimeConfig
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

    def get(self, label: int, n: int, key: tuple[int, ...] | None = None) -> torch.Tensor:
        """``n`` distinct images of class ``label`` (uint8 ``[n, 3, H, W]``), drawn at random: with ``key``
        by an RNG keyed by it (and the class and fill), so the draw does not depend on the order in which
        requests arrive (several workers share a sampler actor); without, from the pool's own RNG."""
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
        rng = self.rng if key is None else np.random.default_rng([self.seed, label, self._fills[label], *key])
        idx = torch.from_numpy(rng.choice(len(buf), size=n, replace=False))
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


_TASK_STREAM = 1  # separates the task RNG from the mask RNG (``episode_rng``) seeded from the same triple


def task_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The RNG that picks the classes, budget and transforms of episode ``index`` (global) of meta-step ``step``."""
    return np.random.default_rng([seed, step, index, _TASK_STREAM])


@dataclass(frozen=True)
class MetaClasses:
    """The reference classes of a meta-training run: meta-train and held-out validation ids, and the
    families of related meta-train classes (``task_families``)."""

    train: list[int]
    val: list[int]
    families: list[list[int]]

    @classmethod
    def of(cls, reference: str | Path, m: MetaConfig) -> "MetaClasses":
        manifest = Manifest.load(reference)
        train, val = split_classes(manifest.num_classes, m.val_classes, m.seed)
        return cls(train, val, task_families(m.task_families, manifest, train, m.n_way_min))


@dataclass(frozen=True)
class PoolPlan:
    """How the meta-training classes are split over image pools — the Ray sampler actors, or the local
    backend's in-process pools, built from the same plan so that both serve the same images."""

    shares: list[list[int]]  # pool k owns classes[k::n]

    @classmethod
    def of(cls, classes: list[int], pools: int) -> "PoolPlan":
        n = max(1, min(pools, len(classes)))
        return cls([list(classes[k::n]) for k in range(n)])

    @property
    def owner(self) -> dict[int, int]:
        return {c: k for k, share in enumerate(self.shares) for c in share}

    def pool(self, root: str | Path, k: int, seed: int, r: RuntimeConfig, entropy: tuple[int, ...] = ()) -> ClassPool:
        """Pool ``k`` (``entropy``: a restarted sampler actor's, so it does not replay its predecessor's buffers)."""
        return ClassPool(root, "train", buffer_size=r.sampler_buffer, reuse=r.sampler_reuse,
                         seed=int(np.random.SeedSequence([seed, k, *entropy]).generate_state(1)[0]))


class ClassPools:
    """The local backend's image pools: ``PoolPlan``'s pools in this process (what the sampler actors hold on Ray)."""

    def __init__(self, root: str | Path, classes: list[int], seed: int, r: RuntimeConfig):
        plan = PoolPlan.of(classes, r.sampler_actors)
        self.pools, self.owner = [plan.pool(root, k, seed, r) for k in range(len(plan.shares))], plan.owner

    def request(self, label: int, n: int, key: tuple[int, ...]) -> torch.Tensor:
        return self.pools[self.owner[label]].get(label, n, key)

    @staticmethod
    def fetch(images: list[torch.Tensor]) -> list[torch.Tensor]:
        return images

    def state(self) -> list[dict]:
        """The pools' image-draw states (saved in training checkpoints, as the sampler actors' are)."""
        return [p.state() for p in self.pools]

    def restore(self, states: list[dict]) -> None:
        if len(states) == len(self.pools):  # a run resumed with another pool count starts fresh streams
            for pool, state in zip(self.pools, states):
                pool.set_state(state)


@dataclass
class _Request:
    step: int
    task: Task
    images: list  # what the pools' ``request`` returned, one per class: tensors, or Ray object refs


class EpisodeStream:
    """One rank's share of every meta-batch — global episode indices ``first … first+count-1`` — from
    ``pools`` (``request(label, n, key)`` → a handle, ``fetch(handles)`` → image tensors), requested
    ``prefetch`` episodes ahead of the one being trained on. Without prefetch nothing is drawn before its
    step, so the pools' state in a checkpoint is exactly that of the step (the local backend resumes
    bit-exactly); with it, a checkpoint's pool state is a little ahead."""

    def __init__(self, pools, classes: list[int], cfg: MetaConfig, first: int, count: int, prefetch: int,
                 families: list[list[int]] = ()):
        self.pools, self.classes, self.cfg, self.families = pools, list(classes), cfg, list(families)
        self.first, self.count, self.depth = first, count, count + max(0, prefetch)
        self._next: int | None = None  # position of the next episode to request, over this rank's share
        self._pending: deque[_Request] = deque()

    def _request(self, position: int) -> _Request:
        m = self.cfg
        step, index = divmod(position, self.count)
        index += self.first
        task = sample_task(task_rng(m.seed, step, index), self.classes, m, self.families)
        return _Request(step, task, [self.pools.request(c, m.k_shot + m.q_query, (step, index)) for c in task.classes])

    def _top_up(self) -> None:
        end = self.cfg.steps * self.count
        while len(self._pending) < self.depth and self._next < end:
            self._pending.append(self._request(self._next))
            self._next += 1

    def take(self, step: int) -> tuple[list[Episode], float]:
        """This rank's episodes of meta-step ``step`` (in global-index order) and the seconds spent waiting
        for them; the first call sets where the stream starts (a resumed run's step)."""
        t = time.perf_counter()
        if self._next is None:
            self._next = step * self.count
        self._top_up()
        episodes = []
        for _ in range(self.count):
            req = self._pending.popleft()
            if req.step != step:
                raise RuntimeError(f"episode stream is at meta-step {req.step}, asked for {step}")
            episodes.append(build_episode(self.pools.fetch(req.images), req.task, self.cfg.k_shot))
        if self.depth > self.count:  # keep the prefetch going while this step trains
            self._top_up()
        return episodes, time.perf_counter() - t

    def state(self) -> list[dict]:
        return self.pools.state()

    def restore(self, states: list[dict]) -> None:
        self.pools.restore(states)
