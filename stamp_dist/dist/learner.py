"""A DeepSpeed engine over the meta-model, and one meta-step on this rank's share of a meta-batch.

The meta-model is the STAMP module (set encoder + mask generator), plus the backbone when
``meta.learn_backbone``. The inner loop stays functional and outside the engine (``episode_loss``);
only the outer loss goes through ``engine.backward``.

Why one distributed step equals ``MetaTrainer.meta_step`` on the union meta-batch: each rank runs
its ``meta_batch`` episodes as DeepSpeed micro-steps of one episode, with gradient accumulation over
``meta_batch``. DeepSpeed divides each loss by the accumulation steps and averages the accumulated
gradients across ranks, so the gradient is Σ_i loss_i / (meta_batch · world): the single-process
mean over all episodes. Clipping (``gradient_clipping``) and the AdamW update act on that averaged
gradient, as in the single-process step. Masks are drawn with ``episode_rng(seed, step, i)`` where
``i`` is the episode's index in the GLOBAL meta-batch, so they match too. (One difference: with
``meta.learn_backbone`` the single-process trainer clips only the STAMP module's gradient norm, while
DeepSpeed clips the norm over every meta-learned parameter, backbone included.)
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..atomic import read_json, write_json
from ..config import StampConfig
from ..data.episodes import Episode
from ..errors import StampError
from ..meta.objective import check_finite, episode_loss, episode_rng, hard_masks
from ..meta.trainer import MetaModel, summarize

ENGINE_TAG = "engine"  # DeepSpeed checkpoint tag inside a Ray Train checkpoint directory
STATE_FILE = "stamp_state.json"  # step and sampler RNG state, beside the engine's files


def deepspeed_config(cfg: StampConfig, world_size: int) -> dict:
    m, r = cfg.meta, cfg.runtime
    if r.zero_stage == 3:
        raise StampError("runtime.zero_stage=3 partitions the meta-model's parameters, which rank 0's meta-validation "
                         "and publishing read whole; the encoder + generator are small: use zero_stage 0, 1 or 2")
    return {
        "train_micro_batch_size_per_gpu": 1,  # one episode per micro-step
        "gradient_accumulation_steps": m.meta_batch,  # a rank's share of the meta-batch
        "train_batch_size": m.meta_batch * world_size,
        "gradient_clipping": m.grad_clip,
        "zero_optimization": {"stage": r.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW, exactly the single-process optimizer
        "bf16": {"enabled": r.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }


class Learner:
    """This rank's meta-model inside a DeepSpeed engine; ``step`` counts finished meta-steps."""

    def __init__(self, cfg: StampConfig, device: torch.device):
        import deepspeed

        m = cfg.meta
        self.cfg, self.device = cfg, device
        self.model = MetaModel.build(cfg, device)
        modules = {"stamp": self.model.stamp} | ({"backbone": self.model.backbone} if m.learn_backbone else {})
        optimizer = torch.optim.AdamW(self.model.trainable(m.learn_backbone), lr=m.lr, weight_decay=m.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=nn.ModuleDict(modules), optimizer=optimizer,
                                               config=deepspeed_config(cfg, dist.get_world_size()))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.step = 0

    def autocast(self):
        """bf16 engines hold bf16 weights while inputs (images, frozen-backbone features) stay fp32."""
        if self.cfg.runtime.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def meta_step(self, episodes: list[Episode], first_index: int) -> dict[str, float]:
        """One optimizer step from this rank's episodes; ``first_index`` is the global index of the first.
        Returns this rank's meta-batch means (see ``mean_over_ranks``)."""
        m, mm = self.cfg.meta, self.model
        if len(episodes) != m.meta_batch:
            raise ValueError(f"a rank's share of a meta-batch has meta.meta_batch={m.meta_batch} episodes, got {len(episodes)}")
        mm.stamp.train()
        outs = []
        for j, ep in enumerate(episodes):
            rng = episode_rng(m.seed, self.step, first_index + j, self.device)
            with self.autocast():
                out = episode_loss(mm.backbone, mm.stamp, mm.groups, mm.cost, ep, mm.norm, m, rng)
            check_finite(out, self.step)
            self.engine.backward(out.loss)
            self.engine.step()  # updates only after the last episode (the accumulation boundary)
            outs.append(out)
        self.step += 1
        metrics = summarize(outs, episodes)
        grad_norm = self.engine.get_global_grad_norm()  # reported by ZeRO 1/2 and bf16; None for fp32 ZeRO 0
        return metrics if grad_norm is None else metrics | {"grad_norm": float(grad_norm)}

    def validate(self, episodes: list[Episode]) -> dict[str, float]:
        with self.autocast():
            return self.model.validate(episodes, self.cfg.meta)

    @torch.no_grad()
    def keep_ratios(self, episodes: list[Episode]) -> list[float]:
        """Per channel group, the fraction of channels the hard mask keeps, averaged over ``episodes``."""
        mm = self.model
        per_task = []
        with self.autocast():
            for ep in episodes:
                inputs = mm.stamp.read(mm.backbone, mm.groups, mm.norm(ep.support_x.to(self.device)), ep.n_way)
                per_task.append([float(k.float().mean()) for k in hard_masks(mm.stamp, mm.cost, inputs, ep.budget)])
        return np.mean(per_task, axis=0).tolist()

    # --- collectives ------------------------------------------------------------------------

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        t = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(metrics, (t / self.world).tolist()))

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def fingerprints(self) -> list[str]:
        """A hash of every rank's meta-model weights (identical ranks ⇔ identical hashes)."""
        h = hashlib.sha256()
        for name, t in sorted(self.engine.module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        out: list[str | None] = [None] * self.world
        dist.all_gather_object(out, h.hexdigest()[:16])
        return out  # type: ignore[return-value]

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """fp32 CPU copies of the meta-learned weights, what the aggregator publishes."""
        return {name: {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
                for name, module in self.engine.module.items()}

    # --- checkpoints ------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the process group cleanly (without this, two-process gloo runs often crash at exit)."""
        dist.barrier()
        dist.destroy_process_group()

    def save(self, directory: Path, extra: dict) -> None:
        """Collective: every rank writes its engine/optimizer shard; rank 0 adds step and ``extra``."""
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)
        if self.rank == 0:
            write_json(directory / STATE_FILE, {"step": self.step, **extra})

    def load(self, directory: Path) -> dict:
        """Restore engine, optimizer and step; returns the ``extra`` saved with them."""
        path, _ = self.engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
        if path is None:
            raise StampError(f"{directory} holds no DeepSpeed checkpoint '{ENGINE_TAG}'; the run directory is damaged")
        state = read_json(directory / STATE_FILE, "training state")
        self.step = state.pop("step")
        return state
