"""Fine-tune a pruned model on its target: the same plain loop as pretraining (``training.fit``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .atomic import check_writable
from .config import FinetuneConfig, RuntimeConfig
from .data.manifest import Manifest
from .data.readers import Normalization, open_split
from .devices import pick_device
from .errors import StampError
from .pruning.spec import load_pruned, save_pruned
from .training import Images, Schedule, evaluate, fit


def finetune_model(model: torch.nn.Module, train: tuple[Images, torch.Tensor],
                   evaluation: tuple[Images, torch.Tensor], norm: Normalization, schedule: Schedule,
                   device: torch.device, workers: int = 0) -> dict:
    """Train ``model`` in place on ``train`` with ``schedule`` (``Schedule.finetuning``) and score top-1 on
    ``evaluation`` before and after; ``workers`` read streamed splits (``training.batches``)."""
    before = evaluate(model, *evaluation, norm, 2 * schedule.batch_size, device, workers)
    t = time.perf_counter()
    history = fit(model, (*train, norm), None, schedule, device, desc="fine-tune", workers=workers)
    seconds = time.perf_counter() - t
    top1 = evaluate(model, *evaluation, norm, 2 * schedule.batch_size, device, workers)
    return {"top1": top1, "top1_before": before, "seconds": seconds, "epochs": schedule.epochs,
            "train_images": len(train[1]), "eval_images": len(evaluation[1]), "history": history,
            "images_per_s": schedule.epochs * len(train[1]) / seconds if seconds > 0 else 0.0}


def finetune(model_dir: str | Path, data: str | Path, out: str | Path, epochs: int, cfg: FinetuneConfig,
             device: str = "auto", runtime: RuntimeConfig | None = None) -> dict:
    """`stamp finetune`: train on the target's train split (``cfg.train_per_class`` images per class,
    0 = all), score on its test split, and write the fine-tuned model with the result in its spec.
    ``runtime``: where ``data_memory_mb`` and ``data_workers`` come from (None: their defaults)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise StampError(f"fine-tuning needs at least 1 epoch (got --epochs {epochs}); the model would be saved "
                         "unchanged as fine-tuned")
    check_writable(out)
    dev = pick_device(device)
    model, spec = load_pruned(model_dir, dev)
    manifest = Manifest.load(data)
    if manifest.num_classes != spec.num_classes:
        raise StampError(f"{model_dir} was pruned for {spec.num_classes} classes but {data} has "
                         f"{manifest.num_classes}; prune for this target first (`stamp prune --data {data}`)")
    if [3, manifest.image_size, manifest.image_size] != spec.input_size:
        raise StampError(f"{data} holds {manifest.image_size}×{manifest.image_size} images but {model_dir} was pruned "
                         f"for {spec.input_size[1]}×{spec.input_size[2]}; convert the target with "
                         f"`stamp data convert ... --image-size {spec.input_size[1]}`")
    runtime = runtime or RuntimeConfig()
    x, y, _ = open_split(data, "train", cfg.train_per_class or None, runtime.data_memory_mb)
    tx, ty, _ = open_split(data, "test", memory_mb=runtime.data_memory_mb)
    result = finetune_model(model, (x, y), (tx, ty), Normalization(spec.mean, spec.std),
                            Schedule.finetuning(cfg, cfg.seed, epochs), dev, runtime.data_workers)
    spec.report["finetune"] = {k: v for k, v in result.items() if k != "history"} | {"data": str(data)}
    save_pruned(out, model, spec)
    return result
