"""The local backend (``runtime.backend=local``): the one loop as world size 1.

A plain torch AdamW over the meta-learned parameters (clipped over all of them, as DeepSpeed clips),
the image pools in this process, split and seeded as the Ray sampler actors are (``PoolPlan``), and
the run directory: the checkpoint in ``meta.out/checkpoint``, generator versions written directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..checkpoint import check_checkpoint_dir, load_state, save_state
from ..config import StampConfig
from ..data.episodes import ClassPools, EpisodeStream, MetaClasses
from ..errors import StampError
from .artifact import GeneratorStore
from .backend import Backend, adam_steps, buffer_state, param_state, rank_share, set_buffer_state, set_param_state


class AdamWEngine:
    def __init__(self, trained: nn.ModuleDict, lr: float, weight_decay: float, grad_clip: float, count: int):
        self.module, self.grad_clip, self.count = trained, grad_clip, count
        self.params = [p for p in trained.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.count).backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def training_state(self) -> dict[str, torch.Tensor]:
        tensors = buffer_state(self.module)
        for name, p in self.module.named_parameters():
            tensors |= param_state(name, p, self.optimizer)
        return tensors

    def adam_steps(self) -> int:
        return adam_steps(self.optimizer)

    @torch.no_grad()
    def load_training_state(self, tensors: dict[str, torch.Tensor], adam_steps: int) -> None:
        for name, p in self.module.named_parameters():
            set_param_state(name, p, self.optimizer, tensors, adam_steps)
        set_buffer_state(self.module, tensors)


class OneProcess:
    """The group of a local run: this process alone."""

    rank, world = 0, 1

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def any(self, flag: bool) -> bool:
        return flag

    def gather(self, value: str) -> list[str]:
        return [value]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunDirectory:
    """Checkpoints in ``meta.out/checkpoint``; generator versions in ``meta.out/generators``."""

    def __init__(self, cfg: StampConfig):
        self.cfg = cfg
        self.checkpoint = Path(cfg.meta.out) / "checkpoint"
        self.generators = GeneratorStore(cfg.meta.out, keep=cfg.meta.keep_last)

    def latest(self) -> dict | None:
        check_checkpoint_dir(self.checkpoint)
        state = load_state(self.checkpoint)
        if state is not None and "params" not in state:
            raise StampError(f"checkpoint {self.checkpoint} was written by an older stamp_dist (its own format, "
                             "before both backends shared one); it cannot be resumed: remove it to start the run "
                             "over, or set meta.out to a new directory")
        return state

    def save(self, state: dict | None, step: int, metrics: dict) -> None:
        if state is not None:  # rank 0's (a local run has no other)
            save_state(self.checkpoint, state)

    def publish(self, step: int, model, metrics: dict) -> Callable[[], Path]:
        path = model.publish(self.generators, step, self.cfg.meta, metrics)
        return lambda: path


def local_backend(cfg: StampConfig, model, classes: MetaClasses) -> Backend:
    m = cfg.meta
    count = rank_share(m.meta_batch, 1)
    engine = AdamWEngine(model.trained, m.lr, m.weight_decay, m.grad_clip, count)
    pools = ClassPools(cfg.data.reference, classes.train, m.seed, cfg.runtime)
    # No prefetch: nothing to overlap with in one process, and the checkpoint's pool state stays exact.
    source = EpisodeStream(pools, classes.train, m, 0, count, 0, classes.families)
    return Backend(engine, OneProcess(), source, RunDirectory(cfg))
