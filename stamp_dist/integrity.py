"""Weights files with a content hash: write safetensors, record their sha256, verify it before loading.

Every artifact's JSON (``generator.json``, ``backbone.json``, ``spec.json``, a checkpoint's
``state.json``) records the sha256 of the file bytes of its ``.safetensors``; a loader compares the
file against it before parsing, so a bit flip, a truncated copy or a swapped file is refused with
a message naming the file, never silently used. Non-finite weights are never written.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import StampError

HASH_KEY = "weights_sha256"  # the key each artifact JSON records the hash under
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest(tensors: dict[str, torch.Tensor], as_fp32: bool = False) -> str:
    """16 hex digits of a sha256 over the tensors' names and bytes, in name order: equal ⇔ the same values.
    ``as_fp32``: floating tensors are hashed as fp32 (numpy holds no bf16)."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().float() if as_fp32 and t.is_floating_point() else t.detach()
        h.update(name.encode())
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, what: str) -> str:
    """Write ``tensors`` to ``path`` (safetensors); returns the file's sha256. Refuses non-finite weights."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    bad = non_finite(tensors)
    if bad:
        raise StampError(f"{what} has non-finite values (NaN or infinity) in {len(bad)} of {len(tensors)} tensors "
                         f"({', '.join(bad[:3])}); it was not saved: training diverged — lower the learning rate")
    save_file(tensors, str(path))
    return sha256_file(path)


def load_tensors(path: str | Path, what: str, expected: str | None, fix: str,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``path`` after checking its sha256 against ``expected`` (the hash its JSON recorded).

    ``expected=None`` (artifacts written before hashes were recorded) loads with a warning. Every
    problem — missing, changed, truncated, not safetensors — is a ``StampError`` naming the file and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise StampError(f"{what} {path} is missing; {fix}")
    if expected is None:
        print(f"warning: {path} has no recorded sha256 (written by an older stamp_dist); its integrity is not "
              "checked", file=sys.stderr)
    elif sha256_file(path) != expected:
        raise StampError(f"{what} {path} does not match the sha256 recorded with it: the file is corrupt, "
                         f"truncated or was replaced; {fix}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StampError(f"{what} {path} is not a readable safetensors file ({e}); {fix}") from None
