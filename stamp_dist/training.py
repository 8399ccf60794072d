"""The plain supervised loop shared by pretraining and by fine-tuning pruned models.

Data is a uint8 ``[N, 3, H, W]`` tensor in memory (``readers.load_split``) or, for a split larger than
``runtime.data_memory_mb``, a ``readers.ShardDataset`` whose batches ``DataLoader`` workers read from the
shards (``readers.open_split``); the batches, their order and the augmentation are the same either way,
since indices and random numbers are drawn here, never in a worker. Each batch is augmented as uint8,
moved to the device and normalised there. SGD with momentum and a per-step
cosine learning-rate schedule. All randomness (shuffling, augmentation) comes from one
``torch.Generator`` seeded from ``seed``, so a run is reproducible on CPU, also across a resume.

What to train for (epochs, SGD settings, seed, augmentation) is one ``Schedule``, built from the
config section of the stage in one place (``Schedule.pretraining`` / ``Schedule.finetuning``).
Checkpoints (``fit(checkpoint=Checkpointing(...))``) hold model, optimizer, scheduler and generator
state after each finished epoch (``stamp_dist.checkpoint``: safetensors + JSON, no pickle).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import load_state, save_state
from .config import FinetuneConfig, PretrainConfig
from .data.readers import Normalization, ShardDataset
from .devices import bound_host_allocator
from .errors import StampError
from .progress import progress

Images = torch.Tensor | ShardDataset  # uint8 [N, 3, H, W] in memory, or read from the shards per batch
Split = tuple[Images, torch.Tensor, Normalization]  # (images, labels, input statistics)


@dataclass(frozen=True)
class Schedule:
    """How ``fit`` trains. ``augment``: random crops, plus horizontal flips if ``flip`` (off for data where a
    mirror image changes the meaning, such as digits); ``backbone_lr`` scales the learning rate of every
    parameter but the head (``model.fc``)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    augment: bool = True
    flip: bool = True
    backbone_lr: float = 1.0

    @classmethod
    def pretraining(cls, c: PretrainConfig) -> "Schedule":
        return cls(c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.seed, c.augment)

    @classmethod
    def finetuning(cls, c: FinetuneConfig, seed: int, epochs: int | None = None) -> "Schedule":
        """``finetune.*`` with the caller's seed (the bench cell's, the prune job's) and epoch count
        (None: ``finetune.epochs``)."""
        return cls(c.epochs if epochs is None else epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, seed,
                   c.augment, c.flip, c.backbone_lr)


@dataclass(frozen=True)
class Checkpointing:
    """Where ``fit`` saves its state after every epoch, and the settings (JSON-able) a resumed run must match."""

    directory: Path
    meta: dict


@dataclass
class TrainState:
    """What a checkpoint holds besides the epoch count and history, and what one epoch advances."""

    model: nn.Module
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # every random choice of the loop (shuffling, augmentation)


def augment(images: torch.Tensor, generator: torch.Generator, flip: bool = True, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding and (if ``flip``) random horizontal flips, on uint8."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    rows = dy + torch.arange(h)  # [b, h]: source row of every output row
    cols = dx + torch.arange(w)
    if flip:
        mirror = torch.rand(b, 1, generator=generator) < 0.5
        cols = torch.where(mirror, cols.flip(1), cols)
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [b, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def batches(images: Images, indices: list[torch.Tensor], workers: int = 0) -> Iterator[torch.Tensor]:
    """The uint8 images at each of ``indices``, in order: indexed in memory, or read by a ``DataLoader`` with
    ``workers`` processes (0: this one) from the shards."""
    if isinstance(images, torch.Tensor):
        return (images[idx] for idx in indices)
    loader = DataLoader(images, batch_sampler=[idx.tolist() for idx in indices], num_workers=workers,
                        collate_fn=_stack_images)
    return iter(loader)


def _stack_images(items: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    return torch.stack([x for x, _ in items])  # labels stay with the caller, who drew the indices


def train_epoch(state: TrainState, train: Split, schedule: Schedule, device: torch.device,
                bar=None, workers: int = 0) -> tuple[float, float]:
    """One pass over the shuffled data; returns (mean loss, accuracy) on the augmented batches.
    The scheduler steps after every batch; ``bar`` (a progress bar) advances per image."""
    images, labels, norm = train
    model, generator, batch_size = state.model, state.generator, schedule.batch_size
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    # BatchNorm cannot train on a single sample: a last batch of one is dropped
    chunks = [idx for idx in order.split(batch_size) if len(idx) >= 2]
    loss_sum, correct, seen = 0.0, 0, 0
    for idx, x in zip(chunks, batches(images, chunks, workers)):
        if schedule.augment:
            x = augment(x, generator, flip=schedule.flip)
        x = norm(x.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        y = labels[idx].to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        state.opt.step()
        state.scheduler.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
        if bar is not None:
            bar.update(len(idx))
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.inference_mode()
def evaluate(model: nn.Module, images: Images, labels: torch.Tensor, norm: Normalization,
             batch_size: int, device: torch.device, workers: int = 0) -> float:
    """Top-1 accuracy (eval mode, no augmentation)."""
    model.eval()
    correct = 0
    chunks = list(torch.arange(len(labels)).split(batch_size))
    for idx, x in zip(chunks, batches(images, chunks, workers)):
        x = norm(x.to(device)).contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1).cpu() == labels[idx]).sum())
    return correct / max(len(labels), 1)


# --- checkpoints (stamp_dist.checkpoint: safetensors + JSON, replaced atomically) ------------


def save_checkpoint(at: Checkpointing, state: TrainState, epoch: int, history: list[dict]) -> None:
    save_state(at.directory, {"epoch": epoch, "history": history, "meta": at.meta, "model": state.model.state_dict(),
                              "optimizer": state.opt.state_dict(), "scheduler": state.scheduler.state_dict(),
                              "generator": state.generator.get_state()})


def load_checkpoint(at: Checkpointing, state: TrainState) -> tuple[int, list[dict]] | None:
    """Restore what ``save_checkpoint`` saved; returns (epochs done, history), or None without a checkpoint."""
    saved = load_state(at.directory)
    if saved is None:
        return None
    if saved["meta"] != at.meta:
        diff = sorted(k for k in set(at.meta) | set(saved["meta"]) if at.meta.get(k) != saved["meta"].get(k))
        raise StampError(f"checkpoint {at.directory} belongs to a run with different settings ({', '.join(diff)}); "
                         "remove it or write this run elsewhere")
    state.model.load_state_dict(saved["model"], strict=True)
    state.opt.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.generator.set_state(saved["generator"])
    return saved["epoch"], saved["history"]


# --- the loop ----------------------------------------------------------------------------------


def fit(model: nn.Module, train: Split, test: Split | None, schedule: Schedule, device: torch.device,
        checkpoint: Checkpointing | None = None, desc: str = "train", workers: int = 0) -> list[dict]:
    """Train ``model`` for ``schedule.epochs`` epochs; returns the per-epoch history (a list of metric dicts).
    ``workers``: ``DataLoader`` processes reading a split streamed from its shards (``runtime.data_workers``).

    With ``checkpoint`` the state is saved after every epoch and a later call resumes from the last
    finished one, if its settings match; the cosine schedule follows the current ``epochs``, so a
    finished run can be extended."""
    images, labels, norm = train
    if isinstance(images, ShardDataset):
        # every batch decodes and frees image-sized buffers: with glibc's adaptive threshold they would pile
        # up in the heap and the peak would creep up with the split (docs/DISTRIBUTED.md)
        bound_host_allocator()
    epochs, batch_size, lr = schedule.epochs, schedule.batch_size, schedule.lr
    model.to(device, memory_format=torch.channels_last)  # NHWC convolutions: ~25% faster on CPU (oneDNN) and GPU
    steps_per_epoch = sum(1 for s in range(0, len(labels), batch_size) if len(labels) - s >= 2)
    total_steps = max(epochs * steps_per_epoch, 1)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    head = list(model.fc.parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    groups = [{"params": rest, "lr": lr * schedule.backbone_lr}, {"params": head, "lr": lr}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    state = TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine),
                       torch.Generator().manual_seed(schedule.seed))
    start, history = 0, []
    resumed = load_checkpoint(checkpoint, state) if checkpoint is not None else None
    if resumed is not None:
        start, history = resumed
        if start > epochs:
            raise StampError(f"checkpoint {checkpoint.directory} has {start} epochs, more than the {epochs} asked "
                             "for; remove it or ask for at least that many epochs")
        for group in opt.param_groups:  # re-derive the LR in case ``epochs`` (the schedule's length) changed
            group["lr"] = group["initial_lr"] * cosine(state.scheduler.last_epoch)
        print(f"{desc}: resuming from {checkpoint.directory} after epoch {start}", file=sys.stderr)

    bar = progress(total=epochs * len(labels), initial=start * len(labels), desc=desc, unit="img", unit_scale=True)
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            loss, acc = train_epoch(state, train, schedule, device, bar, workers)
            if not math.isfinite(loss):  # before the checkpoint: the last good one stays
                raise StampError(f"{desc} diverged in epoch {epoch + 1}: the training loss is {loss}; lower the "
                                 f"learning rate (now {lr}) and run again")
            metrics = {"epoch": epoch + 1, "train_loss": round(loss, 5), "train_acc": round(acc, 5),
                       "lr_end": state.scheduler.get_last_lr()[0]}
            if test is not None:
                metrics["test_top1"] = round(evaluate(model, test[0], test[1], norm, 2 * batch_size, device,
                                                      workers), 5)
            metrics["seconds"] = round(time.perf_counter() - t0, 2)
            history.append(metrics)
            bar.set_postfix({k: v for k, v in metrics.items() if k in ("train_loss", "train_acc", "test_top1")},
                            refresh=False)
            if checkpoint is not None:
                save_checkpoint(checkpoint, state, epoch + 1, history)
    finally:
        bar.close()
    return history
