"""Measured model costs: MACs and params (Torch-Pruning's counter) and wall-clock latency."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp


def count_macs_params(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, int]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    return int(macs), int(params)


@torch.no_grad()
def latency_ms(model: nn.Module, input_size: tuple[int, int, int], batch: int = 64, repeats: int = 20,
               warmup: int = 3) -> float:
    """Median wall time of one eval-mode forward pass of ``batch`` images, in milliseconds."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(batch, *input_size, device=device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    model.train(was_training)
    return float(np.median(times) * 1000)
