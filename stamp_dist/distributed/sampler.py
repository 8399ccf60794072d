"""Sampler actors: the Ray backend's image pools.

Each ``SamplerActor`` holds pool ``k`` of a ``PoolPlan`` — a ``ClassPool`` over the meta-training classes
it owns (``classes[k::n]``), seeded from ``(seed, k)`` — so every class's bounded buffer lives in exactly
one process and is refilled from that class's shards there; the local backend builds the same pools in
its own process (``data.episodes.ClassPools``). A worker's ``EpisodeStream`` decides its tasks itself
(``task_rng``: a pure function of the seed, the step and the episode's global index) and asks each
class's owner for ``k_shot + q_query`` images, drawn with an RNG keyed by the step and the index, so
several workers sharing an actor get the images one process would. Images travel as uint8 tensors
through the object store; the worker normalises them on its device.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import ray
import torch

from ..config import StampConfig, from_dict, to_dict
from ..data.episodes import PoolPlan
from ..errors import StampError

NAMESPACE = "stamp_dist"


class SamplerActor:
    """Serves images of the classes it owns from bounded per-class buffers (a ``ClassPool``)."""

    def __init__(self, cfg: dict, plan: PoolPlan, index: int):
        cfg = from_dict(cfg)
        with warnings.catch_warnings():  # Ray 2.60's own check reads its deprecated ``actor_id`` property
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        # A restarted actor rebuilds its buffers on demand; fresh entropy keeps it from replaying the image
        # draws its predecessor already served.
        entropy = (time.time_ns(),) if restarted else ()
        self.classes = frozenset(plan.shares[index])
        self.pool = plan.pool(cfg.data.reference, index, cfg.meta.seed, cfg.runtime, entropy)

    def get(self, label: int, n: int, key: tuple[int, ...]) -> torch.Tensor:
        if label not in self.classes:
            raise StampError(f"sampler actor asked for class {label}, which it does not own")
        return self.pool.get(label, n, key)

    def state(self) -> dict:
        return self.pool.state()

    def set_state(self, state: dict) -> None:
        self.pool.set_state(state)


@dataclass
class SamplerPool:
    """Handles to the sampler actors and which actor owns which class; picklable, so workers get a copy.
    The pools of an ``EpisodeStream`` (``request`` / ``fetch``)."""

    actors: list
    owner: dict[int, int]

    @classmethod
    def start(cls, cfg: StampConfig, classes: list[int], tag: str) -> "SamplerPool":
        r = cfg.runtime
        plan = PoolPlan.of(classes, r.sampler_actors)
        remote = ray.remote(SamplerActor)
        actors = [
            remote.options(name=f"{tag}-sampler-{k}", namespace=NAMESPACE, num_cpus=r.sampler_cpus,
                           # max_task_retries: calls in flight when an actor dies are re-run on its replacement.
                           max_restarts=r.sampler_max_restarts, max_task_retries=-1)
            .remote(to_dict(cfg), plan, k)
            for k in range(len(plan.shares))
        ]
        return cls(actors, plan.owner)

    def request(self, label: int, n: int, key: tuple[int, ...]) -> ray.ObjectRef:
        return self.actors[self.owner[label]].get.remote(label, n, key)

    @staticmethod
    def fetch(refs: list[ray.ObjectRef]) -> list[torch.Tensor]:
        return ray.get(refs)

    def state(self) -> list[dict]:
        """The actors' image-draw states (saved in training checkpoints)."""
        return ray.get([a.state.remote() for a in self.actors])

    def restore(self, states: list[dict]) -> None:
        if len(states) == len(self.actors):  # a run resumed with another actor count starts fresh streams
            ray.get([a.set_state.remote(s) for a, s in zip(self.actors, states)])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
