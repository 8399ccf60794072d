"""Sampler actors, and the stream that assembles one worker's episodes from them.

Each ``SamplerActor`` wraps a ``ClassPool`` over the meta-training classes it owns (a round-robin
slice), so every class's bounded buffer lives in exactly one process and is refilled from that
class's shards there. A worker decides its tasks itself — the classes and budget of episode ``i``
of meta-step ``s`` are a pure function of ``(seed, s, i)`` (``task_rng``), ``i`` being the episode's
index in the global meta-batch, so the tasks do not depend on the number of workers and need no
state to resume — then asks each class's owner for ``k_shot + q_query`` images. Images travel as
uint8 tensors through the object store; the worker normalises them on its device.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np
import ray
import torch

from ..config import MetaConfig, StampConfig
from ..data.episodes import ClassPool, Episode, Task, build_episode, sample_task
from ..errors import StampError

NAMESPACE = "stamp_dist"
_TASK_STREAM = 1  # separates the task RNG from the mask RNG (``episode_rng``) seeded from the same triple


def task_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The RNG that picks the classes and budget of episode ``index`` of meta-step ``step``."""
    return np.random.default_rng([seed, step, index, _TASK_STREAM])


class SamplerActor:
    """Serves images of the classes it owns from bounded per-class buffers (a ``ClassPool``)."""

    def __init__(self, root: str, classes: list[int], seed: int, index: int, buffer_size: int, reuse: int):
        entropy = [seed, index]
        with warnings.catch_warnings():  # Ray 2.60's own check reads its deprecated ``actor_id`` property
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            # A restarted actor rebuilds its buffers on demand; fresh entropy keeps it from replaying
            # the image draws its predecessor already served.
            entropy.append(time.time_ns())
        self.classes = frozenset(classes)
        self.pool = ClassPool(root, "train", buffer_size=buffer_size, reuse=reuse,
                              seed=int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def get(self, label: int, n: int) -> torch.Tensor:
        if label not in self.classes:
            raise StampError(f"sampler actor asked for class {label}, which it does not own")
        return self.pool.get(label, n)

    def state(self) -> dict:
        return self.pool.state()

    def set_state(self, state: dict) -> None:
        self.pool.set_state(state)


@dataclass
class SamplerPool:
    """Handles to the sampler actors and which actor owns which class; picklable, so workers get a copy."""

    actors: list
    owner: dict[int, int]

    @classmethod
    def start(cls, cfg: StampConfig, classes: list[int], tag: str) -> "SamplerPool":
        r = cfg.runtime
        n = max(1, min(r.sampler_actors, len(classes)))
        remote = ray.remote(SamplerActor)
        actors = [
            remote.options(name=f"{tag}-sampler-{k}", namespace=NAMESPACE, num_cpus=r.sampler_cpus,
                           # max_task_retries: calls in flight when an actor dies are re-run on its replacement.
                           max_restarts=r.sampler_max_restarts, max_task_retries=-1)
            .remote(cfg.data.reference, classes[k::n], cfg.meta.seed, k, r.sampler_buffer, r.sampler_reuse)
            for k in range(n)
        ]
        return cls(actors, {c: k for k in range(n) for c in classes[k::n]})

    def request(self, label: int, n: int) -> ray.ObjectRef:
        return self.actors[self.owner[label]].get.remote(label, n)

    def state(self) -> list[dict]:
        """The actors' image-draw states (saved in training checkpoints)."""
        return ray.get([a.state.remote() for a in self.actors])

    def restore(self, states: list[dict]) -> None:
        if len(states) == len(self.actors):  # a run resumed with another actor count starts fresh streams
            ray.get([a.set_state.remote(s) for a, s in zip(self.actors, states)])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


@dataclass
class _Request:
    step: int
    task: Task
    images: list[ray.ObjectRef]


class EpisodeStream:
    """One worker's share of every meta-batch — global episode indices ``first … first+count-1`` —
    requested ``prefetch`` episodes ahead of the one being trained on."""

    def __init__(self, pool: SamplerPool, classes: list[int], cfg: MetaConfig, first: int, count: int,
                 prefetch: int, start_step: int, families: list[list[int]] = ()):
        self.pool, self.classes, self.cfg, self.families = pool, list(classes), cfg, list(families)
        self.first, self.count, self.depth = first, count, count + max(0, prefetch)
        self._next = start_step * count  # position of the next episode to request, counted over this rank's share
        self._pending: deque[_Request] = deque()

    def _request(self, position: int) -> _Request:
        m = self.cfg
        step, index = divmod(position, self.count)
        task = sample_task(task_rng(m.seed, step, self.first + index), self.classes, m, self.families)
        return _Request(step, task, [self.pool.request(c, m.k_shot + m.q_query) for c in task.classes])

    def _top_up(self) -> None:
        end = self.cfg.steps * self.count
        while len(self._pending) < self.depth and self._next < end:
            self._pending.append(self._request(self._next))
            self._next += 1

    def take(self, step: int) -> tuple[list[Episode], float]:
        """This rank's episodes of meta-step ``step`` (in global-index order) and the seconds spent waiting."""
        self._top_up()
        t = time.perf_counter()
        episodes = []
        for _ in range(self.count):
            req = self._pending.popleft()
            if req.step != step:
                raise RuntimeError(f"episode stream is at meta-step {req.step}, asked for {step}")
            episodes.append(build_episode(ray.get(req.images), req.task, self.cfg.k_shot))
        wait = time.perf_counter() - t
        self._top_up()
        return episodes, wait
