"""The device a run computes on and its precision, from ``runtime.device`` / ``runtime.precision`` (base layer:
every stage and the meta-training loop read it, on either backend)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

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


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout frozen backbones compute in: channels_last (NHWC) on CUDA, where cuDNN's convolutions are faster
    in it (benchmarks/gpu_check.py measures both); NCHW on the CPU, where a masked meta-step ran slower in NHWC."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# glibc's mallopt parameter (malloc.h) and the fixed value set for it: blocks of 128 KiB and more are
# mmap'ed, so freeing them returns the memory to the system.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 128 * 1024


@functools.cache
def bound_host_allocator() -> bool:
    """Fix glibc's mmap threshold (what ``MALLOC_MMAP_THRESHOLD_=131072`` does, at run time), so that
    micro-batched work keeps its peak memory independent of the episode or target size; returns whether it
    was set (glibc on Linux only).

    By default glibc raises the threshold after the first large frees, so later activation-sized blocks
    come from the heap, where freed chunks are kept and fragment: a CPU meta-step's peak then grew with
    the episode (docs/DISTRIBUTED.md, "Episode memory"). CUDA tensors live in CUDA's caching allocator
    and are not affected."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
