"""The Ray Train per-worker loop: DeepSpeed meta-training on this rank's share of every meta-batch.

Every rank resumes from the latest Ray Train checkpoint (engine, optimizer, step, sampler RNG
state), takes its episodes from the sampler actors, runs a meta-step, and joins a collective
checkpoint every ``meta.checkpoint_every`` steps, at the last step, and when a stop was requested
(``STOP`` in the run directory, written by the launcher on SIGTERM/SIGUSR1). Rank 0 also
meta-validates, sends the generator to the aggregator, and logs to wandb, ``metrics.jsonl`` and
``events.jsonl``. The loop ends with a barrier and ``destroy_process_group``.

Run directory (``meta.out``) written here: ``metrics.jsonl`` (one line per step, as the single-process
trainer writes: each step exactly once across kills and resumes, ``runlog.MetricsLog``), ``events.jsonl``
(start/finish of each worker group: shows resumes and restarts), ``summary.json`` (the last finish:
rank fingerprints, throughput, data-wait fraction), ``plots/``. A checkpoint holds safetensors + JSON
only (``Learner.save``); rank 0 writes it and reports it to Ray Train.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from ..atomic import write_json
from ..config import StampConfig, from_dict
from ..meta.trainer import step_postfix, validation_episodes, validation_line
from ..progress import progress
from ..runlog import MetricsLog
from ..tracking import Tracker
from .learner import Learner
from .sampler import EpisodeStream, SamplerPool

STOP_FILE = "STOP"


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Chief:
    """Rank 0's extra duties: meta-validation, publishing through the aggregator, tracking, run logs."""

    def __init__(self, cfg: StampConfig, learner: Learner, aggregator, val_classes: list[int]):
        self.cfg, self.learner, self.aggregator = cfg, learner, aggregator
        self.out = Path(cfg.meta.out)
        self.val_episodes = validation_episodes(cfg, val_classes)
        self.tracker = Tracker(cfg, self.out)
        self.log = MetricsLog(self.out / "metrics.jsonl")
        self.log.resume_from(learner.step)  # drop the steps after the checkpoint this group starts from
        self._publishing: tuple | None = None  # (ObjectRef, step, metrics) of the version being written
        # A worker's output reaches the driver's log through Ray, never a terminal: periodic lines.
        self.bar = progress(total=cfg.meta.steps, initial=learner.step, desc="meta-train", unit="step")

    def after_step(self, step: int, metrics: dict, validate: bool, checkpoint: bool) -> None:
        if validate:
            metrics = metrics | self.learner.validate(self.val_episodes)
            self.tracker.keep_ratio_plot([g.name for g in self.learner.model.net.groups],
                                         self.learner.keep_ratios(self.val_episodes),
                                         sum(ep.budget for ep in self.val_episodes) / len(self.val_episodes), step)
            self._collect()
            # Asynchronous: the aggregator writes while training goes on; collected at the next publish.
            self._publishing = (self.aggregator.publish.remote(step, self.learner.weights(), metrics), step, metrics)
        self.tracker.log(metrics, step)
        self.log.append(step, metrics, durable=checkpoint)  # before the checkpoint: runlog.py
        self.bar.update(1)
        self.bar.set_postfix(step_postfix(metrics), refresh=False)
        if validate:
            self.bar.write(validation_line(step, metrics))

    def _collect(self) -> None:
        """Wait for the version being written, then log it as an artifact."""
        if self._publishing is not None:
            ref, step, metrics = self._publishing
            self.tracker.log_generator(ray.get(ref), step, metrics)
            self._publishing = None

    def event(self, kind: str, **fields) -> None:
        _append(self.out / "events.jsonl", {"event": kind, "time": time.time(), **fields})

    def close(self, summary: dict) -> None:
        self.bar.close()
        self._collect()
        write_json(self.out / "summary.json", summary)
        self.event("finish", **{k: summary[k] for k in ("step", "stopped")})
        self.tracker.finish(summary)


def _resume(learner: Learner, samplers: SamplerPool) -> bool:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as d:
        extra = learner.load(Path(d))
    if learner.rank == 0:
        samplers.restore(extra.get("samplers", []))
    return True


def _checkpoint(learner: Learner, samplers: SamplerPool, metrics: dict) -> None:
    """Collective; rank 0 writes the checkpoint and reports it, the other ranks report the metrics only."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "checkpoint"
        learner.save(directory, {"samplers": samplers.state()} if learner.rank == 0 else {})
        checkpoint = ray.train.Checkpoint.from_directory(directory) if learner.rank == 0 else None
        ray.train.report({"step": learner.step, **metrics}, checkpoint=checkpoint)


def train_loop(config: dict) -> None:
    """Ray Train's function per worker. ``config``: ``cfg`` (``to_dict``), ``samplers`` (``SamplerPool``),
    ``aggregator`` (actor handle), ``train_classes`` and ``val_classes`` (reference class ids)."""
    cfg = from_dict(config["cfg"])
    m, r = cfg.meta, cfg.runtime
    out = Path(m.out)
    torch.set_num_threads(r.cpus_per_worker)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    learner = Learner(cfg, device)
    samplers: SamplerPool = config["samplers"]
    resumed = _resume(learner, samplers)
    torch.distributed.barrier()  # sampler RNG state restored before any rank draws images
    chief = Chief(cfg, learner, config["aggregator"], config["val_classes"]) if learner.rank == 0 else None
    if chief:
        chief.event("start", step=learner.step, resumed=resumed, world_size=learner.world)

    first = learner.rank * m.meta_batch  # global index of this rank's first episode in every meta-batch
    stream = EpisodeStream(samplers, config["train_classes"], m, first, m.meta_batch, r.prefetch, learner.step,
                           config["families"])
    # Throughput totals leave out the first step after a (re)start: it includes buffer fills and warm-up.
    wait_total = seconds_total = 0.0
    steady_steps, warmed_up, stopped = 0, False, False
    while learner.step < m.steps and not stopped:
        t0 = time.perf_counter()
        episodes, wait = stream.take(learner.step)
        metrics = learner.meta_step(episodes, first)
        seconds = time.perf_counter() - t0
        if warmed_up:
            wait_total, seconds_total, steady_steps = wait_total + wait, seconds_total + seconds, steady_steps + 1
        warmed_up = True
        metrics |= {"data_wait_fraction": wait / seconds, "episodes_per_s": learner.world * m.meta_batch / seconds}
        metrics = learner.mean_over_ranks(metrics)
        stopped = learner.any_rank(learner.rank == 0 and (out / STOP_FILE).exists())
        last = learner.step == m.steps
        checkpoint = last or stopped or learner.step % m.checkpoint_every == 0
        if chief:
            chief.after_step(learner.step, metrics, validate=last or learner.step % m.val_every == 0,
                             checkpoint=checkpoint)
        if checkpoint:
            _checkpoint(learner, samplers, metrics)

    fingerprints = learner.fingerprints()
    steady = learner.mean_over_ranks({"wait": wait_total, "seconds": seconds_total, "steps": steady_steps})
    if chief:
        chief.close({
            "step": learner.step, "stopped": stopped and learner.step < m.steps, "world_size": learner.world,
            "rank_fingerprints": fingerprints, "ranks_identical": len(set(fingerprints)) == 1,
            "steady_steps": int(steady["steps"]),
            "data_wait_fraction": steady["wait"] / steady["seconds"] if steady["steps"] else None,
            "episodes_per_s": (steady["steps"] * learner.world * m.meta_batch / steady["seconds"]
                               if steady["steps"] else None),
        })
    learner.close()
