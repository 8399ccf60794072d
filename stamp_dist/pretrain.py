"""Pretrain the backbone on the reference dataset (``stamp pretrain``).

Output, in ``pretrain.out``::

    backbone.safetensors   the trained state dict
    backbone.json          what ``models.saved.load_backbone`` needs to rebuild it, plus metrics and the run's settings
    checkpoint/            state after the last finished epoch; a re-run resumes from it

A re-run with the same settings returns the finished artifact at once; with more epochs it resumes
from the checkpoint and extends the run. Other changed settings are an error (never a silent retrain).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from .atomic import read_json
from .config import to_dict
from .data.manifest import MANIFEST
from .data.readers import Normalization, open_split
from .devices import pick_device
from .errors import StampError
from .models.backbones import build_backbone
from .models.saved import META, WEIGHTS, save_backbone
from .pruning import check_prunable, discover_groups
from .training import Checkpointing, Schedule, fit

def _run_key(cfg) -> dict:
    """Settings that determine the trained weights, except ``epochs`` (a run may be extended)."""
    manifest = Path(cfg.data.reference) / MANIFEST
    if not manifest.is_file():
        raise StampError(f"reference dataset {cfg.data.reference} not found (no {MANIFEST}); "
                         "create it with `stamp data demo` or `stamp data convert`")
    p = to_dict(cfg.pretrain)
    weights = Path(cfg.model.weights) if cfg.model.weights else None
    if weights is not None and not weights.is_file():
        raise StampError(f"model.weights: {weights} not found; give a state dict file, or model.weights='' to start "
                         "from random weights")
    # the starting weights only when given, so the runs made before model.weights keep their key
    start = {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()} if weights else {}
    return {"backbone": cfg.model.backbone, "width": cfg.model.width, **start,
            "reference_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
            **{k: p[k] for k in ("batch_size", "lr", "momentum", "weight_decay", "seed", "augment")}}


def _differences(a: dict, b: dict) -> str:
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def pretrain(cfg) -> Path:
    """Train (or resume, or reuse) the backbone of ``cfg.model`` on ``cfg.data.reference``; returns ``pretrain.out``."""
    out, pc = Path(cfg.pretrain.out), cfg.pretrain
    key = _run_key(cfg)
    if (out / META).is_file():
        done = read_json(out / META, "backbone record")
        if done.get("run") != key:
            raise StampError(f"{out} holds a backbone pretrained with other settings "
                             f"({_differences(done.get('run') or {}, key)}); remove it or set pretrain.out elsewhere")
        if done["epochs"] == pc.epochs and (out / WEIGHTS).is_file():
            print(f"pretrained backbone in {out} is up to date (held-out top-1 {done['test_top1']:.4f}); reusing it")
            return out

    t0 = time.perf_counter()
    if pc.num_threads > 0:
        torch.set_num_threads(pc.num_threads)
    device = pick_device(cfg.runtime.device)
    budget = cfg.runtime.data_memory_mb
    x, y, manifest = open_split(cfg.data.reference, "train", memory_mb=budget)
    tx, ty, _ = open_split(cfg.data.reference, "test", memory_mb=budget)
    norm = Normalization.of(manifest)
    train, test = (x, y, norm), (tx, ty, norm)
    torch.manual_seed(pc.seed)  # the initial weights
    model = build_backbone(cfg.model.backbone, manifest.num_classes, cfg.model.width, manifest.image_size,
                           cfg.model.weights or None)
    # a network the pruning code cannot follow fails here, before any training or output
    size = (1, 3, manifest.image_size, manifest.image_size)
    check_prunable(model, discover_groups(model, torch.zeros(size)))
    print(f"pretraining {cfg.model.backbone} on {cfg.data.reference}: {manifest.num_classes} classes, "
          f"{len(train[1])} train / {len(test[1])} held-out images, {pc.epochs} epochs on {device}")

    history = fit(model, train, test, Schedule.pretraining(pc), device, Checkpointing(out / "checkpoint", key),
                  desc="pretrain", workers=cfg.runtime.data_workers)

    top1 = history[-1]["test_top1"]
    meta = {"backbone": cfg.model.backbone, "width": cfg.model.width, "num_classes": manifest.num_classes,
            "classes": manifest.classes, "image_size": manifest.image_size, "mean": manifest.mean, "std": manifest.std,
            "reference": str(cfg.data.reference), "epochs": pc.epochs, "test_top1": top1, "history": history,
            "seed": pc.seed, "device": str(device), "wall_seconds": round(time.perf_counter() - t0, 3),
            "train_seconds": round(sum(h["seconds"] for h in history), 1), "run": key}
    save_backbone(out, model, meta)
    print(f"pretrained {cfg.model.backbone}: held-out top-1 {top1:.4f} after {pc.epochs} epochs "
          f"({meta['train_seconds']:.0f} s training) → {out / WEIGHTS}")
    return out
