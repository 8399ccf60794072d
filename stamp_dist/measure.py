"""Measured model costs: MACs and params (Torch-Pruning's counter) and wall-clock latency."""

from __future__ import annotations

import copy
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


LATENCY_BATCHES = {1: 50, 64: 10}  # batch size → timed repeats (a batch-64 pass on CPU takes ~10-40 ms)


def latency_report(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, float]:
    """Median eval-mode latency (ms) at batch 1 and 64 on the CPU, and also on CUDA when a GPU is
    present, whatever device ``model`` is on (it is measured on a copy): ``{"cpu_b1": …, "cpu_b64": …,
    "cuda_b1": …, "cuda_b64": …}``. CPU numbers use the current ``torch.get_num_threads()``."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    source = next(model.parameters()).device
    out = {}
    for device in devices:
        m = model if source.type == device else copy.deepcopy(model).to(device)
        for batch, repeats in LATENCY_BATCHES.items():
            out[f"{device}_b{batch}"] = latency_ms(m, input_size, batch, repeats)
    return out
