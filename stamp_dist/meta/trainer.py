"""Single-process episodic meta-trainer: the plain loop that the distributed path reproduces.

for step: sample a meta-batch of tasks → mean episode loss → backward → clip → AdamW step;
every ``val_every`` steps: hard-mask meta-validation on held-out reference classes, publish a
generator version; every ``checkpoint_every`` steps: save resumable state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_state, save_state
from ..config import StampConfig, to_dict
from ..data.episodes import ClassPool, Episode, EpisodeSampler, split_classes
from ..data.manifest import Manifest
from ..data.readers import Normalization
from ..progress import progress
from ..pruning.groups import discover_groups
from ..pruning.macs import CostModel
from ..training import pick_device
from .artifact import GeneratorStore, save_generator
from .objective import Stamp, episode_loss, episode_rng, validate_episode


class MetaTrainer:
    def __init__(self, cfg: StampConfig):
        from ..pretrain import load_backbone

        self.cfg, m = cfg, cfg.meta
        self.out = Path(m.out)
        self.device = pick_device(cfg.runtime.device)
        torch.manual_seed(m.seed)
        self.backbone, self.backbone_meta = load_backbone(cfg.pretrain.out)
        self.backbone = self.backbone.to(self.device).eval().requires_grad_(m.learn_backbone)
        size = self.backbone_meta["image_size"]
        self.groups = discover_groups(self.backbone, torch.zeros(1, 3, size, size, device=self.device))
        self.cost = CostModel(self.backbone, self.groups, (3, size, size))
        self.stamp = Stamp(self.backbone.feature_dim, self.groups.sizes, m).to(self.device)
        params = list(self.stamp.parameters()) + (list(self.backbone.parameters()) if m.learn_backbone else [])
        self.optimizer = torch.optim.AdamW(params, lr=m.lr, weight_decay=m.weight_decay)
        self.norm = Normalization.of(self.backbone_meta)

        manifest = Manifest.load(cfg.data.reference)
        train_classes, self.val_classes = split_classes(manifest.num_classes, m.val_classes, m.seed)
        pool = ClassPool(cfg.data.reference, "train", seed=m.seed, manifest=manifest)
        self.sampler = EpisodeSampler(pool, train_classes, m.n_way_min, m.n_way_max, m.k_shot, m.q_query,
                                      m.budget_min, m.budget_max, seed=m.seed)
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
            out = episode_loss(self.backbone, self.stamp, self.groups, self.cost, ep, self.norm, self.cfg.meta, rng)
            (out.loss / len(episodes)).backward()
            outs.append(out)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.stamp.parameters(), self.cfg.meta.grad_clip)
        self.optimizer.step()
        self.step += 1
        mean = lambda f: float(np.mean([float(getattr(o, f).detach()) for o in outs]))  # noqa: E731
        return {"loss": mean("loss"), "ce": mean("ce"), "prior": mean("prior"), "budget_term": mean("budget_term"),
                "query_acc": mean("accuracy"), "expected_ratio": mean("expected_ratio"),
                "budget": float(np.mean([e.budget for e in episodes])), "grad_norm": float(grad_norm)}

    # --- meta-validation ------------------------------------------------------------------

    def val_episodes(self) -> list[Episode]:
        """A fixed set of tasks on held-out classes (test split), so scores are comparable across steps."""
        if self._val_episodes is None:
            m = self.cfg.meta
            pool = ClassPool(self.cfg.data.reference, "test", seed=m.seed + 1)
            sampler = EpisodeSampler(pool, self.val_classes, m.n_way_min, m.n_way_max, m.k_shot, m.q_query,
                                     m.budget_min, m.budget_max, seed=m.seed + 1)
            self._val_episodes = [sampler.sample() for _ in range(m.val_tasks)]
        return self._val_episodes

    def validate(self) -> dict[str, float]:
        self.stamp.eval()
        scores = [validate_episode(self.backbone, self.stamp, self.groups, self.cost, ep, self.norm,
                                   self.cfg.meta) for ep in self.val_episodes()]
        acc, ratio = np.array(scores).T
        budgets = np.array([ep.budget for ep in self.val_episodes()])
        return {"val_acc": float(acc.mean()), "val_ratio_error": float(np.abs(ratio - budgets).max())}

    # --- state ------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"step": self.step, "stamp": self.stamp.state_dict(), "optimizer": self.optimizer.state_dict(),
                "backbone": self.backbone.state_dict() if self.cfg.meta.learn_backbone else {},
                "torch_rng": torch.get_rng_state(),
                "sampler_rng": self.sampler.rng.bit_generator.state, "pool_rng": self.sampler.pool.rng_state()}

    def load(self, state: dict) -> None:
        self.step = state["step"]
        self.stamp.load_state_dict(state["stamp"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["backbone"]:
            self.backbone.load_state_dict(state["backbone"])
        torch.set_rng_state(state["torch_rng"])
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        self.sampler.pool.set_rng_state(state["pool_rng"])

    def publish(self, metrics: dict) -> Path:
        return self.store.publish(self.step, metrics["val_acc"], lambda d: save_generator(
            d, self.stamp, self.backbone, self.backbone_meta, self.groups, to_dict(self.cfg.meta), self.step, metrics))

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> Path:
        m = self.cfg.meta
        state = load_state(self.out / "checkpoint", self.device)
        if state is not None:
            self.load(state)
            print(f"meta-train: resuming {self.out} from step {self.step}")
        self.out.mkdir(parents=True, exist_ok=True)
        log = self.out / "metrics.jsonl"
        bar = progress(total=m.steps, initial=self.step, desc="meta-train", unit="step")
        t0, wait = time.perf_counter(), 0.0
        while self.step < m.steps:
            t = time.perf_counter()
            episodes = [self.sampler.sample() for _ in range(m.meta_batch)]
            wait += time.perf_counter() - t
            metrics = self.meta_step(episodes)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['query_acc']:.2f}",
                            ratio=f"{metrics['expected_ratio']:.2f}/{metrics['budget']:.2f}")
            if self.step % m.val_every == 0 or self.step == m.steps:
                metrics |= self.validate()
                metrics["data_wait_fraction"] = wait / (time.perf_counter() - t0)
                self.publish(metrics)
                bar.write(f"step {self.step}: val_acc {metrics['val_acc']:.3f} "
                          f"(hard masks, max |ratio-b| {metrics['val_ratio_error']:.3f})")
            if self.step % m.checkpoint_every == 0 or self.step == m.steps:
                save_state(self.out / "checkpoint", self.state())
            with open(log, "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        bar.close()
        return self.store.root


def meta_train(cfg: StampConfig) -> Path:
    """`stamp meta-train`: train (or resume) and return the run's generator store."""
    return MetaTrainer(cfg).run()
