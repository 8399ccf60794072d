"""The device a run computes on and its precision, from ``runtime.device`` / ``runtime.precision`` (base layer:
every stage and the meta-training loop read it, on either backend)."""

from __future__ import annotations

import contextlib

import torch

from .errors import StampError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StampError("runtime.device is 'cuda' but no CUDA GPU is available; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """``runtime.precision: bf16`` → bf16 autocast (matmuls and convolutions in bf16, weights and the
    optimizer in fp32); ``fp32`` → nothing. Inputs such as images and frozen-backbone features stay fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
