"""The meta-training loop, once for every backend and world size (a local run is world size 1).

for step: this rank's episodes of the step (global indices first … first+count-1 of a GLOBAL
meta-batch of ``meta.meta_batch``) → per episode, the outer loss → ``engine.backward`` (the mean over
the global meta-batch) → ``engine.step`` (clip, AdamW); rank 0 ("chief"): every ``val_every`` steps
hard-mask meta-validation on held-out reference classes, a keep-ratio plot and a published generator
version; every step wandb (``Tracker``) and ``metrics.jsonl``; ``events.jsonl`` and ``summary.json``
per start. Every ``checkpoint_every`` steps, at the last step and on a stop request, the checkpoint
(``backend.py``: one format on both backends). What differs between backends is plugged in
(``Backend``): ``local.py`` here, ``stamp_dist/distributed/`` for Ray + DeepSpeed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..atomic import write_json
from ..config import MetaConfig, StampConfig, to_dict
from ..data.episodes import ClassPool, Episode, EpisodeSampler, MetaClasses
from ..devices import autocast, pick_device
from ..errors import StampError, Stopped
from ..integrity import digest
from ..progress import progress
from ..pruning.prunable import PrunableBackbone
from ..runlog import MetricsLog
from ..signals import stop_requests
from ..tracking import Tracker
from .artifact import GeneratorStore, save_generator
from .backend import Backend, state_names
from .local import local_backend
from .objective import (EpisodeOutput, Stamp, StampSettings, check_finite, episode_loss, episode_rng, hard_masks,
                        validate_episode)


@dataclass
class MetaModel:
    """What every meta-training process builds from the config (each rank, and the Ray aggregator): the
    pretrained backbone with its channel groups and MACs model, and the STAMP module (seeded from
    ``meta.seed``, so every process starts from the same weights)."""

    net: PrunableBackbone
    stamp: Stamp
    learn_backbone: bool

    @classmethod
    def build(cls, cfg: StampConfig, device: torch.device) -> "MetaModel":
        m = cfg.meta
        torch.manual_seed(m.seed)  # before the backbone is built: its initialisation draws from the same RNG
        net = PrunableBackbone.load(cfg.pretrain.out, device, trainable=m.learn_backbone,
                                    micro_batch=cfg.runtime.micro_batch)
        stamp = Stamp(net.backbone.feature_dim, net.groups.sizes, StampSettings.of(m)).to(device)
        return cls(net, stamp, m.learn_backbone)

    @cached_property
    def trained(self) -> nn.ModuleDict:
        """The meta-learned modules, named as in checkpoints: φ, ψ (and θ with ``meta.learn_backbone``)."""
        return nn.ModuleDict({"stamp": self.stamp} | ({"backbone": self.net.backbone} if self.learn_backbone else {}))

    @property
    def device(self) -> torch.device:
        return next(self.stamp.parameters()).device

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """fp32 CPU copies of the meta-learned weights (what the Ray aggregator publishes)."""
        return {name: {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
                for name, module in self.trained.items()}

    def weights_hash(self) -> str:
        """A hash of the meta-learned weights (identical ranks ⇔ identical hashes)."""
        return digest(self.trained.state_dict(), as_fp32=True)

    def validate(self, episodes: list[Episode]) -> dict[str, float]:
        """Hard-mask meta-validation: query accuracy and achieved MACs ratio at each task's budget."""
        self.stamp.eval()
        scores = [validate_episode(self.net, self.stamp, ep) for ep in episodes]
        acc, ratio = np.array(scores).T
        budgets = np.array([ep.budget for ep in episodes])
        return {"val_acc": float(acc.mean()), "val_ratio_error": float(np.abs(ratio - budgets).max()),
                "val_macs_ratio": float(ratio.mean())}

    @torch.no_grad()
    def keep_ratios(self, episodes: list[Episode]) -> list[float]:
        """Per channel group, the fraction of channels the hard mask keeps, averaged over ``episodes``."""
        net, stamp = self.net, self.stamp
        per_task = []
        for ep in episodes:
            inputs = stamp.read(net, net.norm(ep.support_x.to(self.device)), ep.n_way)
            per_task.append([float(k.float().mean()) for k in hard_masks(stamp, stamp.cost(net), inputs, ep.budget)])
        return np.mean(per_task, axis=0).tolist()

    def publish(self, store: GeneratorStore, step: int, meta_cfg: MetaConfig, metrics: dict) -> Path:
        """Write the current generator as a new version of ``store`` (scored by ``val_acc``)."""
        return store.publish(step, metrics["val_acc"], lambda d: save_generator(
            d, self.stamp, self.net, to_dict(meta_cfg), step, metrics))


def validation_episodes(cfg: StampConfig, val_classes: list[int]) -> list[Episode]:
    """A fixed set of tasks on held-out classes (test split), so scores are comparable across steps."""
    m = cfg.meta
    pool = ClassPool(cfg.data.reference, "test", seed=m.seed + 1)
    sampler = EpisodeSampler(pool, val_classes, m, seed=m.seed + 1)
    return [sampler.sample() for _ in range(m.val_tasks)]


def summarize(outs: list[EpisodeOutput], episodes: list[Episode]) -> dict[str, float]:
    """Meta-batch means of the loss terms and diagnostics."""
    mean = lambda f: float(np.mean([float(getattr(o, f).detach()) for o in outs]))  # noqa: E731
    return {"loss": mean("loss"), "ce": mean("ce"), "prior": mean("prior"), "budget_term": mean("budget_term"),
            "query_acc": mean("accuracy"), "expected_ratio": mean("expected_ratio"),
            "budget": float(np.mean([e.budget for e in episodes]))}


class Chief:
    """Rank 0's duties: meta-validation, keep-ratio plots, publishing, tracking, progress and run logs."""

    def __init__(self, trainer: "MetaTrainer", val_classes: list[int]):
        self.trainer, cfg = trainer, trainer.cfg
        self.out = Path(cfg.meta.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.val_episodes = validation_episodes(cfg, val_classes)
        self.tracker = Tracker(cfg, self.out)
        self.log = MetricsLog(self.out / "metrics.jsonl")
        self.log.resume_from(trainer.step)  # drop the steps after the checkpoint this start resumes from
        self._publishing: tuple[Callable[[], Path], int, dict] | None = None  # the version being written
        # On Ray a worker's output reaches the driver's log, never a terminal: periodic lines there.
        self.bar = progress(total=cfg.meta.steps, initial=trainer.step, desc="meta-train", unit="step")

    def after_step(self, step: int, metrics: dict, validate: bool, checkpoint: bool, started: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(step_postfix(metrics), refresh=False)
        if validate:
            trainer, model = self.trainer, self.trainer.model
            with trainer.autocast():
                metrics = metrics | model.validate(self.val_episodes)
                ratios = model.keep_ratios(self.val_episodes)
            self.tracker.keep_ratio_plot([g.name for g in model.net.groups], ratios,
                                         float(np.mean([ep.budget for ep in self.val_episodes])), step)
            self._collect()
            # On Ray the aggregator writes while training goes on; collected at the next publish.
            self._publishing = (trainer.store.publish(step, model, metrics), step, metrics)
            self.bar.write(validation_line(step, metrics))
        metrics["seconds"] = time.perf_counter() - started  # the step's wall time (bench reports the sum)
        self.tracker.log(metrics, step)
        self.log.append(step, metrics, durable=checkpoint)  # before the checkpoint: runlog.py

    def _collect(self) -> None:
        """Wait for the version being written, then log it as an artifact."""
        if self._publishing is not None:
            wait, step, metrics = self._publishing
            self.tracker.log_generator(wait(), step, metrics)
            self._publishing = None

    def event(self, kind: str, **fields) -> None:
        with open(self.out / "events.jsonl", "a") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")

    def close(self, summary: dict | None) -> None:
        """``summary`` None: the run failed (nothing more is written, the wandb run is closed)."""
        self.bar.close()
        if summary is not None:
            self._collect()
            write_json(self.out / "summary.json", summary)
            self.event("finish", **{k: summary[k] for k in ("step", "stopped")})
        self.tracker.finish(summary)


# A backend: parts built for this process from the config, the meta-model and the run's classes.
BackendFactory = Callable[[StampConfig, MetaModel, MetaClasses], Backend]


class MetaTrainer:
    """One process's meta-training, with ``backend``'s parts (the local backend's by default); ``run`` is
    the local command, ``train`` the loop every rank runs."""

    def __init__(self, cfg: StampConfig, backend: BackendFactory = local_backend, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or pick_device(cfg.runtime.device)
        self.model = MetaModel.build(cfg, self.device)
        self.net, self.stamp = self.model.net, self.model.stamp
        self.classes = MetaClasses.of(cfg.data.reference, cfg.meta)
        parts = backend(cfg, self.model, self.classes)
        self.engine, self.group, self.source, self.store = parts.engine, parts.group, parts.source, parts.store
        self.step = 0

    def autocast(self):
        return autocast(self.device, self.cfg.runtime.precision)

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        """One optimizer step from this rank's episodes of the step (the first has global index
        ``source.first``); returns this rank's means (the loop averages them over ranks)."""
        m = self.cfg.meta
        self.stamp.train()
        outs = []
        for j, ep in enumerate(episodes):
            rng = episode_rng(m.seed, self.step, self.source.first + j, self.device)
            with self.autocast():
                out = episode_loss(self.net, self.stamp, ep, rng)
            check_finite(out, self.step)
            self.engine.backward(out.loss)
            outs.append(out)
        grad_norm = self.engine.step()
        self.step += 1
        return summarize(outs, episodes) | {"grad_norm": grad_norm}

    # --- checkpoints -----------------------------------------------------------------------

    def _resume(self) -> bool:
        state = self.store.latest()
        if state is None:
            return False
        fix = "resume with the config it was started with, or choose a new meta.out"
        where = f"the checkpoint in {self.cfg.meta.out} holds a meta-model of another shape than meta.* in this config"
        differ = sorted(set(state["params"]) ^ state_names(self.model.trained))
        if differ:
            raise StampError(f"{where} describes ({len(differ)} tensors differ, e.g. {differ[0]}); {fix}")
        try:
            self.engine.load_training_state(state["params"], state["adam_steps"])
        except RuntimeError as e:
            raise StampError(f"{where} describes ({str(e).splitlines()[0]}); {fix}") from None
        self.step = state["step"]
        if self.group.rank == 0:
            self.source.restore(state["samplers"])  # on Ray the sampler actors are shared: rank 0 restores them
            print(f"meta-train: resuming {self.cfg.meta.out} from step {self.step}", flush=True)
        self.group.barrier()  # the pools are restored before any rank draws images
        return True

    def _save(self, metrics: dict) -> None:
        tensors = self.engine.training_state()  # collective (gathers ZeRO partitions)
        state = None
        if self.group.rank == 0:
            state = {"step": self.step, "adam_steps": self.engine.adam_steps(), "params": tensors,
                     "samplers": self.source.state()}
        self.store.save(state, self.step, metrics)

    # --- the loop ----------------------------------------------------------------------------

    def train(self, stop_requested: Callable[[], bool]) -> dict:
        """Train (or resume) to ``meta.steps``, or until ``stop_requested()`` (asked on rank 0 after every
        step) holds; returns the run summary (rank 0 also writes it to ``summary.json``)."""
        group = self.group
        resumed = self._resume()
        chief = Chief(self, self.classes.val) if group.rank == 0 else None
        if chief:
            chief.event("start", step=self.step, resumed=resumed, world_size=group.world)
        summary = None
        try:
            summary = self._loop(chief, stop_requested)
        finally:
            if chief:
                chief.close(summary)
        group.close()
        return summary

    def _loop(self, chief: Chief | None, stop_requested: Callable[[], bool]) -> dict:
        m, group = self.cfg.meta, self.group
        # Throughput totals leave out the first step after a (re)start: it includes buffer fills and warm-up.
        wait_total = seconds_total = 0.0
        steady_steps, warmed_up, stopped = 0, False, False
        while self.step < m.steps and not stopped:
            t0 = time.perf_counter()
            episodes, wait = self.source.take(self.step)
            metrics = self.meta_step(episodes)
            seconds = time.perf_counter() - t0
            if warmed_up:
                wait_total, seconds_total, steady_steps = wait_total + wait, seconds_total + seconds, steady_steps + 1
            warmed_up = True
            metrics |= {"data_wait_fraction": wait / seconds, "episodes_per_s": m.meta_batch / seconds}
            metrics = group.mean(metrics)
            stopped = group.any(group.rank == 0 and stop_requested())
            last = self.step == m.steps
            checkpoint = last or stopped or self.step % m.checkpoint_every == 0
            if chief:
                chief.after_step(self.step, metrics, validate=last or self.step % m.val_every == 0,
                                 checkpoint=checkpoint, started=t0)
            if checkpoint:
                self._save(metrics)
        fingerprints = group.gather(self.model.weights_hash())
        steady = group.mean({"wait": wait_total, "seconds": seconds_total, "steps": steady_steps})
        return {
            "step": self.step, "stopped": stopped and self.step < m.steps, "world_size": group.world,
            "rank_fingerprints": fingerprints, "ranks_identical": len(set(fingerprints)) == 1,
            "steady_steps": int(steady["steps"]),
            "data_wait_fraction": steady["wait"] / steady["seconds"] if steady["steps"] else None,
            "episodes_per_s": steady["steps"] * m.meta_batch / steady["seconds"] if steady["steps"] else None,
        }

    def run(self) -> Path:
        """The local backend's command: train in this process, stopping (after a checkpoint) on SIGTERM,
        SIGUSR1 or Ctrl-C; raises ``Stopped`` then. Returns the run's generator store."""
        with stop_requests() as stop:
            summary = self.train(stop.is_set)
        return finished(summary, self.cfg.meta)


def finished(summary: dict, m: MetaConfig) -> Path:
    """After a run (either backend): its throughput line; ``Stopped`` if a stop request ended it early;
    else the run's generator store."""
    if summary["episodes_per_s"] is not None:
        print(f"meta-train: step {summary['step']} on {summary['world_size']} worker(s): "
              f"{summary['episodes_per_s']:.1f} episodes/s, data wait {summary['data_wait_fraction']:.1%} of step time")
    if summary["stopped"]:
        raise Stopped(f"meta-train: stopped at step {summary['step']} of {m.steps} with a checkpoint; run the same "
                      "command to resume")
    return GeneratorStore(m.out).root


def step_postfix(metrics: dict) -> dict[str, str]:
    """What the progress bar shows of a meta-step."""
    return {"loss": f"{metrics['loss']:.3f}", "acc": f"{metrics['query_acc']:.2f}",
            "ratio": f"{metrics['expected_ratio']:.2f}/{metrics['budget']:.2f}"}


def validation_line(step: int, metrics: dict) -> str:
    return (f"step {step}: val_acc {metrics['val_acc']:.3f} "
            f"(hard masks, max |ratio-b| {metrics['val_ratio_error']:.3f})")
