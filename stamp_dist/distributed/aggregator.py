"""The checkpoint aggregator: one named Ray actor that publishes rank 0's generator weights.

It holds the frozen backbone and the group layout once, loads each received state into its own
STAMP module and writes a new version through ``GeneratorStore`` — every artifact directory is
built under a temporary name and renamed into place (``save_generator``), the ``latest``/``best``
pointers are replaced atomically, and only the last ``meta.keep_last`` versions (plus the best) are
kept. What it writes is exactly what a local run publishes, so `stamp prune` takes the run
directory and picks ``best``.
"""

from __future__ import annotations

import torch

from ..config import from_dict
from ..meta.artifact import GeneratorStore
from ..meta.trainer import MetaModel


class Aggregator:
    def __init__(self, cfg: dict):
        self.cfg = from_dict(cfg)
        self.model = MetaModel.build(self.cfg, torch.device("cpu"))
        self.store = GeneratorStore(self.cfg.meta.out, keep=self.cfg.meta.keep_last)

    def publish(self, step: int, weights: dict[str, dict[str, torch.Tensor]], metrics: dict) -> str:
        """Write generator version ``step`` (``weights`` from ``MetaModel.weights``, scored by ``val_acc``)."""
        for name, module in self.model.trained.items():
            module.load_state_dict(weights[name])
        return str(self.model.publish(self.store, step, self.cfg.meta, metrics))
