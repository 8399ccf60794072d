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

Checkpoints are not DeepSpeed's (``engine.save_checkpoint`` pickles its state, and loading a pickle
can run code): ``save`` gathers every parameter's fp32 master and AdamW moments whole from the ZeRO
partitions and rank 0 writes them as safetensors + JSON (``stamp_dist.checkpoint``); ``load`` sets
each rank's partition from them. Such a checkpoint does not depend on the world size or ZeRO stage.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import FILES as CHECKPOINT_FILES
from ..checkpoint import load_state, save_state
from ..config import StampConfig
from ..data.episodes import Episode
from ..devices import autocast
from ..errors import StampError
from ..meta.objective import check_finite, episode_loss, episode_rng, hard_masks
from ..meta.trainer import MetaModel, summarize

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides its step count


def deepspeed_config(cfg: StampConfig, world_size: int) -> dict:
    m, r = cfg.meta, cfg.runtime
    if r.precision == "bf16" and r.zero_stage == 0:
        raise StampError("runtime.precision=bf16 needs runtime.zero_stage 1 or 2: DeepSpeed's bf16 optimizer for "
                         "ZeRO 0 does not expose the fp32 master weights a checkpoint saves (ZeRO 1 costs nothing "
                         "extra on one worker)")
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
        modules = {"stamp": self.model.stamp} | ({"backbone": self.model.net.backbone} if m.learn_backbone else {})
        optimizer = torch.optim.AdamW(self.model.trainable(m.learn_backbone), lr=m.lr, weight_decay=m.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=nn.ModuleDict(modules), optimizer=optimizer,
                                               config=deepspeed_config(cfg, dist.get_world_size()))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.step = 0

    def autocast(self):
        """bf16 engines hold bf16 weights while inputs (images, frozen-backbone features) stay fp32."""
        return autocast(self.device, self.cfg.runtime.precision)

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
                out = episode_loss(mm.net, mm.stamp, ep, rng)
            check_finite(out, self.step)
            self.engine.backward(out.loss)
            if j == len(episodes) - 1:  # the boundary: gradients are averaged over ranks, not yet clipped
                own_norm = self._parameter_grad_norm()
            self.engine.step()  # updates only after the last episode (the accumulation boundary)
            outs.append(out)
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()  # reported by ZeRO 1/2 and bf16; None for fp32 ZeRO 0
        return summarize(outs, episodes) | {"grad_norm": float(own_norm if grad_norm is None else grad_norm)}

    def _parameter_grad_norm(self) -> float:
        """The pre-clip gradient norm where the gradients live on the parameters (ZeRO 0; NaN where ZeRO
        partitions them: the engine reports those)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.requires_grad]
        if any(g is None for g in grads):
            return float("nan")
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def validate(self, episodes: list[Episode]) -> dict[str, float]:
        with self.autocast():
            return self.model.validate(episodes)

    @torch.no_grad()
    def keep_ratios(self, episodes: list[Episode]) -> list[float]:
        """Per channel group, the fraction of channels the hard mask keeps, averaged over ``episodes``."""
        mm = self.model
        per_task = []
        with self.autocast():
            for ep in episodes:
                inputs = mm.stamp.read(mm.net, mm.net.norm(ep.support_x.to(self.device)), ep.n_way)
                per_task.append([float(k.float().mean()) for k in hard_masks(mm.stamp, mm.net.cost, inputs, ep.budget)])
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

    def _optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW itself: DeepSpeed's ZeRO optimizers wrap it as ``.optimizer``; ZeRO 0 uses it as is."""
        opt = self.engine.optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer

    def training_state(self) -> dict[str, torch.Tensor]:
        """Collective: every meta-learned parameter's fp32 value and AdamW moments, whole (gathered from the
        ZeRO partitions), plus the module's buffers — the same tensors on every rank, whatever the world
        size, ZeRO stage or precision, so a checkpoint is plain safetensors (no DeepSpeed pickle)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        opt, state = self._optimizer(), {}
        for name, p in self.engine.module.named_parameters():
            if hasattr(p, "_hp_mapping"):  # ZeRO 1/2 (and bf16): the fp32 master and moments are partitioned
                state[f"fp32.{name}"] = safe_get_full_fp32_param(p)
                for key in MOMENTS:
                    state[f"{key}.{name}"] = safe_get_full_optimizer_state(p, key)
            else:  # ZeRO 0, fp32: the module's parameters are the masters
                state[f"fp32.{name}"] = p.detach().float()
                for key in MOMENTS:
                    state[f"{key}.{name}"] = opt.state[p][key] if p in opt.state else torch.zeros_like(p)
        for name, b in self.engine.module.named_buffers():
            state[f"buffer.{name}"] = b.detach()
        return state

    def adam_steps(self) -> int:
        """AdamW's update count (its bias correction depends on it)."""
        return max((int(s["step"]) for s in self._optimizer().state.values() if "step" in s), default=0)

    def load_training_state(self, state: dict[str, torch.Tensor], adam_steps: int) -> None:
        """Set weights, masters and moments from ``training_state``'s tensors (each rank keeps its own partition)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        opt = self._optimizer()
        zero = self.engine.optimizer
        if hasattr(zero, "single_partition_of_fp32_groups"):
            # A fresh ZeRO engine has no AdamW state before its first step, and its parameters' fragments
            # of that state are linked lazily: create the state, then link (as DeepSpeed's step would).
            for flat in zero.single_partition_of_fp32_groups:
                if not opt.state[flat]:
                    opt.state[flat].update(step=torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS})
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        with torch.no_grad():
            for name, p in self.engine.module.named_parameters():
                fp32 = state[f"fp32.{name}"].to(p.device)
                p.copy_(fp32.to(p.dtype))
                if hasattr(p, "_hp_mapping"):
                    safe_set_full_fp32_param(p, fp32)
                    for key in MOMENTS:
                        safe_set_full_optimizer_state(p, state[f"{key}.{name}"].to(p.device), key)
                else:
                    opt.state[p] = {"step": torch.tensor(float(adam_steps)),
                                    **{key: state[f"{key}.{name}"].to(p.device).clone() for key in MOMENTS}}
            for name, b in self.engine.module.named_buffers():
                b.copy_(state[f"buffer.{name}"])
        for s in opt.state.values():  # ZeRO: one entry per flat partition
            s["step"] = torch.full_like(s["step"], adam_steps) if torch.is_tensor(s["step"]) else adam_steps

    def save(self, directory: Path, extra: dict) -> None:
        """Collective: gather the training state; rank 0 writes it (safetensors + JSON, ``checkpoint.py``)
        with the step and ``extra`` to ``directory``."""
        tensors = self.training_state()
        if self.rank == 0:
            save_state(directory, {"step": self.step, "adam_steps": self.adam_steps(), "params": tensors, **extra})

    def load(self, directory: Path) -> dict:
        """Restore weights, optimizer and step from what ``save`` wrote; returns the ``extra`` saved with them.
        Nothing but the checkpoint's safetensors and JSON is read (``check_checkpoint_dir``)."""
        check_checkpoint_dir(directory)
        state = load_state(directory)
        fix = f"remove {directory.parent} to start the run over"
        try:
            self.load_training_state(state.pop("params"), state.pop("adam_steps"))
            self.step = state.pop("step")
        except (KeyError, AttributeError, RuntimeError) as e:
            raise StampError(f"checkpoint {directory} does not fit this run's meta-model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}); resume with the config it was started with, or {fix}") from None
        return state


def check_checkpoint_dir(directory: Path) -> None:
    """A training checkpoint holds ``checkpoint.FILES`` and nothing else. Anything more — DeepSpeed's
    ``.pt`` pickles from an older stamp_dist, or a planted file — is refused unread: unpickling runs code."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.relative_to(directory).as_posix() not in CHECKPOINT_FILES:
            raise StampError(
                f"{path} is not part of a stamp_dist training checkpoint (which holds only "
                f"{' and '.join(CHECKPOINT_FILES)}); it was not loaded — a pickled file can run code. A checkpoint "
                f"of an older version (DeepSpeed .pt files) cannot be resumed: remove {Path(directory).parent} to "
                "start the run over")
