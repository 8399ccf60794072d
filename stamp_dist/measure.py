"""Measured model costs: MACs and params (Torch-Pruning's counter) and wall-clock latency."""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2,
            min_time: float = 0.0, stat: str = "median", clock: str = "wall") -> float:
    """Median (``stat="min"``: fastest) time of ``fn()`` in ms over ``repeats`` samples, after ``warmup``
    calls. With ``min_time`` (seconds) a sample runs ``fn`` enough times to last that long (fast ops would
    otherwise be timer noise). The minimum suits a machine shared with other work: contention only adds time.
    ``clock``: ``wall`` (``perf_counter``), or ``cpu``: the process's CPU time, which excludes the time other
    processes hold the cores — the latency of an idle machine, measured on a busy one, for a single-threaded
    CPU forward (with more threads it sums them, so it is not a latency)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    number = 1
    if min_time > 0:
        sync()
        t = now()
        fn()
        sync()
        number = max(1, math.ceil(min_time / max(now() - t, 1e-7)))
    samples = []
    for _ in range(repeats):
        sync()
        t = now()
        for _ in range(number):
            fn()
        sync()
        samples.append((now() - t) / number)
    return float((np.min(samples) if stat == "min" else np.median(samples)) * 1000)


@torch.no_grad()
def latency_ms(model: nn.Module, input_size: tuple[int, int, int], batch: int = 64, repeats: int = 20,
               warmup: int = 3, stat: str = "median", clock: str = "wall") -> float:
    """Median (or ``stat="min"``: fastest) time of one eval-mode forward pass of ``batch`` images, in ms
    (``clock``: see ``time_ms``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(batch, *input_size, device=device)
    try:
        return time_ms(lambda: model(x), device, repeats, warmup, stat=stat, clock=clock)
    finally:
        model.train(was_training)


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
