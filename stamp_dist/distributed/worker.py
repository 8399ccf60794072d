"""The Ray Train per-worker function: the one meta-training loop (``meta/trainer.py``) with the Ray
backend's parts plugged in.

- engine and group: DeepSpeed and ``torch.distributed`` (``engine.py``);
- episodes: this rank's ``meta_batch / num_workers`` episodes of every step, from the sampler actors
  (``sampler.py``), prefetched ``runtime.prefetch`` episodes ahead;
- checkpoints: Ray Train's (``meta.out/train/checkpoint_*``), holding the same safetensors + JSON state
  as a local run's checkpoint; rank 0 writes it and reports it, the other ranks report the metrics;
- publishing: rank 0 sends the weights to the aggregator actor, which writes the version while
  training goes on;
- stop requests: ``STOP`` in the run directory (written by the launcher on SIGTERM/SIGUSR1/Ctrl-C),
  read by rank 0 after every step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import ray
import ray.train
import ray.train.torch
import torch

from ..checkpoint import check_checkpoint_dir, load_state, save_state
from ..config import StampConfig, from_dict
from ..data.episodes import EpisodeStream, MetaClasses
from ..meta.backend import Backend, rank_share
from ..meta.trainer import MetaModel, MetaTrainer
from .engine import DeepSpeedEngine, TorchGroup

STOP_FILE = "STOP"


class RayTrainStore:
    """Checkpoints through Ray Train; generator versions through the aggregator actor."""

    def __init__(self, aggregator):
        self.aggregator = aggregator

    def latest(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            check_checkpoint_dir(d)
            return load_state(d)

    def save(self, state: dict | None, step: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "checkpoint"
            if state is not None:
                save_state(directory, state)
            checkpoint = ray.train.Checkpoint.from_directory(directory) if state is not None else None
            ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)

    def publish(self, step: int, model: MetaModel, metrics: dict) -> Callable[[], Path]:
        ref = self.aggregator.publish.remote(step, model.weights(), metrics)
        return lambda: Path(ray.get(ref))


def ray_backend(config: dict) -> Callable[[StampConfig, MetaModel, MetaClasses], Backend]:
    """The Ray backend's parts for this worker, from ``train_loop``'s ``config``."""

    def build(cfg: StampConfig, model: MetaModel, classes: MetaClasses) -> Backend:
        m = cfg.meta
        group = TorchGroup(model.device)
        count = rank_share(m.meta_batch, group.world)
        source = EpisodeStream(config["samplers"], classes.train, m, group.rank * count, count, cfg.runtime.prefetch,
                               classes.families)
        return Backend(DeepSpeedEngine(model.trained, cfg), group, source, RayTrainStore(config["aggregator"]))

    return build


def train_loop(config: dict) -> None:
    """Ray Train's function per worker. ``config``: ``cfg`` (``to_dict``), ``samplers`` (``SamplerPool``),
    ``aggregator`` (actor handle)."""
    cfg = from_dict(config["cfg"])
    torch.set_num_threads(cfg.runtime.cpus_per_worker)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    stop_file = Path(cfg.meta.out) / STOP_FILE
    MetaTrainer(cfg, ray_backend(config), device).train(stop_file.exists)
