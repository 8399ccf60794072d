"""Single-process episodic meta-trainer: the plain loop that the distributed path reproduces.

for step: sample a meta-batch of tasks → mean episode loss → backward → clip → AdamW step;
every ``val_every`` steps: hard-mask meta-validation on held-out reference classes, publish a
generator version; every ``checkpoint_every`` steps: save resumable state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_state, save_state
from ..config import MetaConfig, StampConfig, to_dict
from ..data.episodes import ClassPool, Episode, EpisodeSampler, split_classes, task_families
from ..data.manifest import Manifest
from ..devices import autocast, pick_device
from ..errors import StampError, Stopped
from ..progress import progress
from ..pruning.prunable import PrunableBackbone
from ..runlog import MetricsLog
from ..signals import StopRequest, stop_requests
from .artifact import GeneratorStore, save_generator
from .objective import EpisodeOutput, Stamp, StampSettings, check_finite, episode_loss, episode_rng, validate_episode


@dataclass
class MetaModel:
    """What every meta-training process builds from the config (the single-process trainer, and each
    distributed worker): the pretrained backbone with its channel groups and MACs model, and the STAMP
    module (seeded from ``meta.seed``, so every process starts from the same weights)."""

    net: PrunableBackbone
    stamp: Stamp

    @classmethod
    def build(cls, cfg: StampConfig, device: torch.device) -> "MetaModel":
        m = cfg.meta
        torch.manual_seed(m.seed)  # before the backbone is built: its initialisation draws from the same RNG
        net = PrunableBackbone.load(cfg.pretrain.out, device, trainable=m.learn_backbone,
                                    micro_batch=cfg.runtime.micro_batch)
        return cls(net, Stamp(net.backbone.feature_dim, net.groups.sizes, StampSettings.of(m)).to(device))

    def trainable(self, learn_backbone: bool) -> list[torch.nn.Parameter]:
        """The meta-learned parameters, in optimizer order: φ, ψ (and θ with ``meta.learn_backbone``)."""
        params = list(self.stamp.parameters()) + (list(self.net.backbone.parameters()) if learn_backbone else [])
        return [p for p in params if p.requires_grad]

    def validate(self, episodes: list[Episode]) -> dict[str, float]:
        """Hard-mask meta-validation: query accuracy and achieved MACs ratio at each task's budget."""
        self.stamp.eval()
        scores = [validate_episode(self.net, self.stamp, ep) for ep in episodes]
        acc, ratio = np.array(scores).T
        budgets = np.array([ep.budget for ep in episodes])
        return {"val_acc": float(acc.mean()), "val_ratio_error": float(np.abs(ratio - budgets).max()),
                "val_macs_ratio": float(ratio.mean())}

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


class MetaTrainer:
    def __init__(self, cfg: StampConfig):
        self.cfg, m = cfg, cfg.meta
        self.out = Path(m.out)
        self.device = pick_device(cfg.runtime.device)
        self.model = MetaModel.build(cfg, self.device)
        self.net, self.stamp = self.model.net, self.model.stamp
        self.optimizer = torch.optim.AdamW(self.model.trainable(m.learn_backbone), lr=m.lr,
                                           weight_decay=m.weight_decay)

        manifest = Manifest.load(cfg.data.reference)
        train_classes, self.val_classes = split_classes(manifest.num_classes, m.val_classes, m.seed)
        pool = ClassPool(cfg.data.reference, "train", cfg.runtime.sampler_buffer, cfg.runtime.sampler_reuse, m.seed,
                         manifest)
        families = task_families(m.task_families, manifest, train_classes, m.n_way_min)
        self.sampler = EpisodeSampler(pool, train_classes, m, m.seed, families)
        self.store = GeneratorStore(self.out, keep=m.keep_last)
        self.step = 0
        self._val_episodes: list[Episode] | None = None

    # --- one meta-step --------------------------------------------------------------------

    def meta_step(self, episodes: list[Episode]) -> dict[str, float]:
        """Average the outer loss over a meta-batch and take one optimizer step."""
        self.stamp.train()
        self.optimizer.zero_grad(set_to_none=True)
        outs = []
        for i, ep in enumerate(episodes):
            rng = episode_rng(self.cfg.meta.seed, self.step, i, self.device)
            with autocast(self.device, self.cfg.runtime.precision):
                out = episode_loss(self.net, self.stamp, ep, rng)
            check_finite(out, self.step)
            (out.loss / len(episodes)).backward()
            outs.append(out)
        # Clip what the optimizer trains (the backbone too with meta.learn_backbone), as DeepSpeed does.
        trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, self.cfg.meta.grad_clip)
        self.optimizer.step()
        self.step += 1
        return summarize(outs, episodes) | {"grad_norm": float(grad_norm)}

    # --- meta-validation ------------------------------------------------------------------

    def val_episodes(self) -> list[Episode]:
        if self._val_episodes is None:
            self._val_episodes = validation_episodes(self.cfg, self.val_classes)
        return self._val_episodes

    def validate(self) -> dict[str, float]:
        with autocast(self.device, self.cfg.runtime.precision):
            return self.model.validate(self.val_episodes())

    # --- state ------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"step": self.step, "stamp": self.stamp.state_dict(), "optimizer": self.optimizer.state_dict(),
                "backbone": self.net.backbone.state_dict() if self.cfg.meta.learn_backbone else {},
                "torch_rng": torch.get_rng_state(),
                "sampler_rng": self.sampler.rng.bit_generator.state, "pool": self.sampler.pool.state()}

    def load(self, state: dict) -> None:
        self.step = state["step"]
        try:
            self.stamp.load_state_dict(state["stamp"])
        except RuntimeError as e:
            raise StampError(f"the checkpoint in {self.out} holds a generator of another shape than meta.* in this "
                             f"config describes ({str(e).splitlines()[1].strip()}); resume with the config it was "
                             "started with, or choose a new meta.out") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if state["backbone"]:
            self.net.backbone.load_state_dict(state["backbone"])
        torch.set_rng_state(state["torch_rng"])
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        # Checkpoints written before the pool state existed hold its draw RNG only (buffers start afresh).
        self.sampler.pool.set_state(state.get("pool") or {"rng": state["pool_rng"], "fills": []})

    def publish(self, metrics: dict) -> Path:
        return self.model.publish(self.store, self.step, self.cfg.meta, metrics)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> Path:
        """Train (or resume) to ``meta.steps``; raises ``Stopped`` after checkpointing on a stop request."""
        m = self.cfg.meta
        state = load_state(self.out / "checkpoint", self.device)
        if state is not None:
            self.load(state)
            print(f"meta-train: resuming {self.out} from step {self.step}")
        self.out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out / "metrics.jsonl")
        log.resume_from(self.step)
        with progress(total=m.steps, initial=self.step, desc="meta-train", unit="step") as bar, \
                stop_requests() as stop:
            self._loop(bar, log, stop)
        if self.step < m.steps:
            raise Stopped(f"meta-train: stopped at step {self.step} of {m.steps} with a checkpoint; run the same "
                          "command to resume")
        return self.store.root

    def _loop(self, bar, log: MetricsLog, stop: StopRequest) -> None:
        m = self.cfg.meta
        t0, wait = time.perf_counter(), 0.0
        while self.step < m.steps:
            t = time.perf_counter()
            episodes = [self.sampler.sample() for _ in range(m.meta_batch)]
            wait += time.perf_counter() - t
            metrics = self.meta_step(episodes)
            bar.update(1)
            bar.set_postfix(step_postfix(metrics), refresh=False)
            if self.step % m.val_every == 0 or self.step == m.steps:
                metrics |= self.validate()
                metrics["data_wait_fraction"] = wait / (time.perf_counter() - t0)
                self.publish(metrics)
                bar.write(validation_line(self.step, metrics))
            checkpoint = self.step % m.checkpoint_every == 0 or self.step == m.steps or stop.is_set()
            metrics["seconds"] = time.perf_counter() - t  # the step's wall time (bench reports the sum)
            log.append(self.step, metrics, durable=checkpoint)  # before the checkpoint: runlog.py
            if checkpoint:
                save_state(self.out / "checkpoint", self.state())
            if stop.is_set():
                return


def step_postfix(metrics: dict) -> dict[str, str]:
    """What the progress bar shows of a meta-step (both backends)."""
    return {"loss": f"{metrics['loss']:.3f}", "acc": f"{metrics['query_acc']:.2f}",
            "ratio": f"{metrics['expected_ratio']:.2f}/{metrics['budget']:.2f}"}


def validation_line(step: int, metrics: dict) -> str:
    return (f"step {step}: val_acc {metrics['val_acc']:.3f} "
            f"(hard masks, max |ratio-b| {metrics['val_ratio_error']:.3f})")
