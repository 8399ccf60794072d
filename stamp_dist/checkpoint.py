"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

Used for resumable checkpoints (model + optimizer + RNG). A checkpoint directory is replaced
atomically, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, read_json, restore_interrupted, write_json

_TENSOR = "__tensor__"


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor inside a nested dict/list with a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}  # keeps int keys (optimizer state)
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Save a nested dict of tensors, numbers, strings (e.g. model/optimizer state dicts, RNG states)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "s", tensors)
    with atomic_dir(directory, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        write_json(tmp / "state.json", skeleton)


def load_state(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved by ``save_state``, or None when ``directory`` holds no checkpoint."""
    directory = Path(directory)
    restore_interrupted(directory)
    if not (directory / "state.json").is_file():
        return None
    tensors = load_file(str(directory / "state.safetensors"), device=str(device))
    return _join(read_json(directory / "state.json", "checkpoint"), tensors)
