"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

Used for resumable checkpoints (meta-learned weights, AdamW moments, image pools: ``meta/backend.py``).
A checkpoint directory is replaced atomically, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_dir, read_json, restore_interrupted, write_json
from .errors import StampError
from .integrity import HASH_KEY, load_tensors, save_tensors

_TENSOR = "__tensor__"
FORMAT = "stamp_dist/state/v1"
FILES = ("state.json", "state.safetensors")  # everything a checkpoint directory holds


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
        digest = save_tensors(tensors, tmp / "state.safetensors", "the training state")
        write_json(tmp / "state.json", {"format": FORMAT, HASH_KEY: digest, "state": skeleton})


def load_state(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved by ``save_state``, or None when ``directory`` holds no checkpoint."""
    directory = Path(directory)
    restore_interrupted(directory)
    if not (directory / "state.json").is_file():
        return None
    fix = f"remove {directory} to start the run over (or restore it from a copy)"
    raw = read_json(directory / "state.json", "checkpoint record")
    legacy = isinstance(raw, dict) and "__dict__" in raw  # written before the format had a hash
    if not legacy and not (isinstance(raw, dict) and raw.get("format") == FORMAT and "state" in raw):
        raise StampError(f"checkpoint {directory / 'state.json'} is not a stamp_dist training state; {fix}")
    tensors = load_tensors(directory / "state.safetensors", "checkpoint", None if legacy else raw.get(HASH_KEY), fix,
                           device)
    try:
        return _join(raw if legacy else raw["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise StampError(f"checkpoint {directory / 'state.json'} is damaged ({type(e).__name__}: {e}); {fix}") from None


def check_checkpoint_dir(directory: str | Path) -> None:
    """A training checkpoint holds ``FILES`` and nothing else. Anything more — DeepSpeed's ``.pt`` pickles
    from an older stamp_dist, or a planted file — is refused unread: unpickling runs code."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.relative_to(directory).as_posix() not in FILES:
            raise StampError(
                f"{path} is not part of a stamp_dist training checkpoint (which holds only "
                f"{' and '.join(FILES)}); it was not loaded — a pickled file can run code. A checkpoint "
                f"of an older version (DeepSpeed .pt files) cannot be resumed: remove {directory.parent} to "
                "start the run over")
