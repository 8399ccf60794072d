"""`stamp meta-train`: the one meta-training loop (``meta/trainer.py``) in this process
(``runtime.backend=local``) or on Ray Train + DeepSpeed workers (``runtime.backend=ray``:
``distributed/``), under one run lock.

A stage of its own, above both backends, so that the meta layer never imports the distributed one
(which imports Ray on load: a local run does not).
"""

from __future__ import annotations

from pathlib import Path

from .config import StampConfig
from .meta.trainer import MetaTrainer
from .runlog import run_lock


def meta_train(cfg: StampConfig) -> Path:
    """Train (or resume) and return the run's generator store."""
    with run_lock(cfg.meta.out, "meta.out"):
        if cfg.runtime.backend == "ray":
            from .distributed.launch import meta_train_ray  # Ray only for a Ray run

            return meta_train_ray(cfg)
        return MetaTrainer(cfg).run()
