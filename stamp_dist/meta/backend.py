"""What the one meta-training loop (``trainer.py``) is written against, and the checkpoint format.

A backend plugs four parts into the loop (``Backend``); the local backend's are in ``local.py``, the
Ray backend's in ``stamp_dist/distributed/``:

- ``Engine``: this process's optimizer over the meta-learned parameters — one ``backward`` per episode
  (gradients accumulate as the mean over the GLOBAL meta-batch), ``step`` (clip over every trained
  parameter, AdamW), and the training state in one format whatever the engine, world size or ZeRO stage;
- ``Group``: the processes training together (rank, world size, a few collectives);
- ``EpisodeSource``: this rank's episodes of a meta-step (``data.episodes.EpisodeStream`` over in-process
  pools or Ray sampler actors), and the pools' state;
- ``RunStore``: where checkpoints go and come from, and how rank 0 publishes a generator version.

A checkpoint (``checkpoint.py``: safetensors + JSON, no pickle) holds ``step``, ``adam_steps``,
``samplers`` (the image pools' states) and ``params``: for every meta-learned parameter ``name``
(``stamp.…``, and ``backbone.…`` with ``meta.learn_backbone``) ``fp32.name``, ``exp_avg.name`` and
``exp_avg_sq.name`` (AdamW's moments), whole, and ``buffer.name`` for the modules' buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from ..data.episodes import Episode
from ..errors import StampError

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides its step count


def rank_share(meta_batch: int, world: int) -> int:
    """Episodes each of ``world`` ranks takes of a meta-batch of ``meta_batch`` (global) episodes."""
    if meta_batch % world:
        raise StampError(f"meta.meta_batch={meta_batch} is not divisible by runtime.num_workers={world}: the "
                         f"meta-batch is global and each worker takes meta_batch / num_workers episodes of it; set "
                         f"meta.meta_batch to a multiple of {world} (e.g. {(meta_batch // world + 1) * world}) or "
                         "change runtime.num_workers")
    return meta_batch // world


class Engine(Protocol):
    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Clip and update; returns the pre-clip norm of the (rank-averaged) meta-gradient."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Collective: the ``params`` tensors of a checkpoint (module docstring)."""

    def adam_steps(self) -> int: ...

    def load_training_state(self, tensors: dict[str, torch.Tensor], adam_steps: int) -> None: ...


class Group(Protocol):
    rank: int
    world: int

    def mean(self, metrics: dict[str, float]) -> dict[str, float]: ...

    def any(self, flag: bool) -> bool: ...

    def gather(self, value: str) -> list[str]: ...

    def barrier(self) -> None: ...

    def close(self) -> None: ...


class EpisodeSource(Protocol):
    first: int  # global index of this rank's first episode in every meta-batch
    count: int  # episodes per rank and meta-step: meta_batch / world

    def take(self, step: int) -> tuple[list[Episode], float]:
        """This rank's episodes of meta-step ``step`` and the seconds spent waiting for them."""

    def state(self) -> list[dict]: ...

    def restore(self, states: list[dict]) -> None: ...


class RunStore(Protocol):
    def latest(self) -> dict | None:
        """The checkpoint to resume from, or None."""

    def save(self, state: dict | None, step: int, metrics: dict) -> None:
        """Collective: commit the checkpoint of ``step`` (``state`` on rank 0, None elsewhere)."""

    def publish(self, step: int, model, metrics: dict) -> Callable[[], Path]:
        """Rank 0: start writing a generator version of ``model`` (a ``MetaModel``); the returned call
        waits for it and gives its directory."""


@dataclass
class Backend:
    engine: Engine
    group: Group
    source: EpisodeSource
    store: RunStore


def state_names(module: nn.Module) -> set[str]:
    """The names of the ``params`` tensors of a checkpoint of ``module``."""
    return ({f"{key}.{name}" for name, _ in module.named_parameters() for key in ("fp32", *MOMENTS)}
            | {f"buffer.{name}" for name, _ in module.named_buffers()})


def param_state(name: str, p: torch.Tensor, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A parameter's checkpoint tensors where it is its own fp32 master (a plain torch optimizer, ZeRO 0)."""
    state = optimizer.state.get(p, {})
    return {f"fp32.{name}": p.detach().float(),
            **{f"{key}.{name}": state[key] if key in state else torch.zeros_like(p) for key in MOMENTS}}


def set_param_state(name: str, p: torch.Tensor, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    adam_steps: int) -> None:
    """``param_state``'s inverse (under ``torch.no_grad``)."""
    p.copy_(tensors[f"fp32.{name}"].to(p.device, p.dtype))
    optimizer.state[p] = {"step": torch.tensor(float(adam_steps)),
                          **{key: tensors[f"{key}.{name}"].to(p.device).clone() for key in MOMENTS}}


def buffer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"buffer.{name}": b.detach() for name, b in module.named_buffers()}


def set_buffer_state(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, b in module.named_buffers():
        b.copy_(tensors[f"buffer.{name}"])


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    """AdamW's update count (its bias correction depends on it)."""
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)
