"""The Ray backend's optimizer engine and process group: DeepSpeed over the meta-learned modules, and
``torch.distributed`` collectives (``meta/backend.py``'s ``Engine`` and ``Group``).

The meta-model is the STAMP module (set encoder + mask generator), plus the backbone when
``meta.learn_backbone``. The inner loop stays functional and outside the engine (``episode_loss``);
only the outer loss goes through ``engine.backward``.

Why a step on ``world`` ranks equals the local backend's step on the same GLOBAL meta-batch: each rank
runs its ``meta_batch / world`` episodes as DeepSpeed micro-steps of one episode, with gradient
accumulation over them. DeepSpeed divides each loss by the accumulation steps and averages the
accumulated gradients across ranks, so the gradient is Σ_i loss_i / meta_batch: the local backend's
mean over all episodes. Clipping (``gradient_clipping``, over every trained parameter, as the local
engine clips) and the AdamW update act on that averaged gradient. Masks are drawn with
``episode_rng(seed, step, i)``, ``i`` the episode's index in the global meta-batch, so they match too.

Checkpoints are not DeepSpeed's (``engine.save_checkpoint`` pickles its state, and loading a pickle
can run code): ``training_state`` gathers every parameter's fp32 master and AdamW moments whole from
the ZeRO partitions (the format of ``meta/backend.py``, which the local engine writes too);
``load_training_state`` sets each rank's partition from them. Such a checkpoint does not depend on
the world size, ZeRO stage or backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import StampConfig
from ..errors import StampError
from ..meta.backend import (MOMENTS, adam_steps, buffer_state, param_state, rank_share, set_buffer_state,
                            set_param_state)


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
        "gradient_accumulation_steps": rank_share(m.meta_batch, world_size),  # a rank's share of the meta-batch
        "train_batch_size": m.meta_batch,
        "gradient_clipping": m.grad_clip,
        "zero_optimization": {"stage": r.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW, exactly the local backend's optimizer
        "bf16": {"enabled": r.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }


class DeepSpeedEngine:
    def __init__(self, trained: nn.ModuleDict, cfg: StampConfig):
        import deepspeed

        m = cfg.meta
        optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=m.lr,
                                      weight_decay=m.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=trained, optimizer=optimizer,
                                               config=deepspeed_config(cfg, dist.get_world_size()))
        self._own_norm = float("nan")

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        if boundary:  # gradients are averaged over ranks, not yet clipped
            self._own_norm = self._parameter_grad_norm()
        else:
            self.engine.step()  # a micro-step: counts, updates nothing

    def step(self) -> float:
        self.engine.step()  # the accumulation boundary: clip and update
        grad_norm = self.engine.get_global_grad_norm()  # reported by ZeRO 1/2 and bf16; None for fp32 ZeRO 0
        return float(self._own_norm if grad_norm is None else grad_norm)

    def _parameter_grad_norm(self) -> float:
        """The pre-clip gradient norm where the gradients live on the parameters (ZeRO 0; NaN where ZeRO
        partitions them: the engine reports those)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.requires_grad]
        if any(g is None for g in grads):
            return float("nan")
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def _optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW itself: DeepSpeed's ZeRO optimizers wrap it as ``.optimizer``; ZeRO 0 uses it as is."""
        opt = self.engine.optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer

    def training_state(self) -> dict[str, torch.Tensor]:
        """Collective: the same tensors on every rank, whatever the world size, ZeRO stage or precision."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        opt, module = self._optimizer(), self.engine.module
        state = buffer_state(module)
        for name, p in module.named_parameters():
            if hasattr(p, "_hp_mapping"):  # ZeRO 1/2 (and bf16): the fp32 master and moments are partitioned
                state[f"fp32.{name}"] = safe_get_full_fp32_param(p)
                for key in MOMENTS:
                    state[f"{key}.{name}"] = safe_get_full_optimizer_state(p, key)
            else:  # ZeRO 0, fp32: the module's parameters are the masters
                state |= param_state(name, p, opt)
        return state

    def adam_steps(self) -> int:
        return adam_steps(self._optimizer())

    def load_training_state(self, tensors: dict[str, torch.Tensor], adam_steps: int) -> None:
        """Set weights, masters and moments (each rank keeps its own partition)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        opt, zero, module = self._optimizer(), self.engine.optimizer, self.engine.module
        if hasattr(zero, "single_partition_of_fp32_groups"):
            # A fresh ZeRO engine has no AdamW state before its first step, and its parameters' fragments
            # of that state are linked lazily: create the state, then link (as DeepSpeed's step would).
            for flat in zero.single_partition_of_fp32_groups:
                if not opt.state[flat]:
                    opt.state[flat].update(step=torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS})
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        with torch.no_grad():
            for name, p in module.named_parameters():
                if hasattr(p, "_hp_mapping"):
                    fp32 = tensors[f"fp32.{name}"].to(p.device)
                    p.copy_(fp32.to(p.dtype))
                    safe_set_full_fp32_param(p, fp32)
                    for key in MOMENTS:
                        safe_set_full_optimizer_state(p, tensors[f"{key}.{name}"].to(p.device), key)
                else:
                    set_param_state(name, p, opt, tensors, adam_steps)
            set_buffer_state(module, tensors)
        for s in opt.state.values():  # ZeRO: one entry per flat partition
            s["step"] = torch.full_like(s["step"], adam_steps) if torch.is_tensor(s["step"]) else adam_steps


class TorchGroup:
    """The ranks of a ``torch.distributed`` process group (Ray Train sets it up)."""

    def __init__(self, device: torch.device):
        self.device, self.rank, self.world = device, dist.get_rank(), dist.get_world_size()

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        t = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(metrics, (t / self.world).tolist()))

    def any(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, value: str) -> list[str]:
        out: list[str | None] = [None] * self.world
        dist.all_gather_object(out, value)
        return out  # type: ignore[return-value]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the process group cleanly (without this, two-process gloo runs often crash at exit)."""
        dist.barrier()
        dist.destroy_process_group()
