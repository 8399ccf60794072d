"""Checks for the JSON records stamp_dist reads back from disk (manifests, backbone, generator and
pruning records): required keys with their types, and the sizes a loader allocates from, bounded
before anything is allocated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import StampError
from .ranges import RANGES

MAX_IMAGE_SIZE = 1024  # pixels per side: ImageNet pipelines use 224-512; a larger claim is damage, not data
MAX_CLASSES = 1_000_000  # classes of a dataset or classifier head (ImageNet-21k has ~21,800)

# Sizes a record may hold and their bounds, shared by every record that has them.
SIZES: dict[str, tuple[int, int]] = {
    "image_size": (1, MAX_IMAGE_SIZE),
    "num_classes": (1, MAX_CLASSES),
    "width": (int(RANGES["model.width"].lo), int(RANGES["model.width"].hi)),
}


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def stats_problem(record: dict) -> str | None:
    """What is wrong with a record's per-channel ``mean`` and ``std`` (3 finite numbers each, std > 0), or None."""
    for key in ("mean", "std"):
        v = record.get(key)
        if not isinstance(v, list) or len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                              for x in v):
            return f"'{key}' must be 3 numbers"
        if not all(math.isfinite(x) for x in v):
            return f"'{key}' is {v}: every value must be a finite number"
    if min(record["std"]) <= 0:
        return "'std' must be positive"
    return None


def check_record(record: Any, required: dict[str, type], path: Path, fix: str) -> None:
    """``record`` (read from ``path``) has every ``required`` key with its type; its sizes are within
    ``SIZES`` and its ``mean``/``std`` (when required) are valid. Problems end with ``fix``."""
    if not isinstance(record, dict):
        raise StampError(f"{path} is malformed (expected a JSON object); {fix}")
    bad = [k for k, t in required.items()
           if not isinstance(record.get(k), t) or (t is int and not is_int(record.get(k)))]
    if bad:
        raise StampError(f"{path} is malformed (missing or of the wrong type: {', '.join(bad)}); {fix}")
    for key, (lo, hi) in SIZES.items():
        if key in required and not lo <= record[key] <= hi:
            raise StampError(f"{path}: '{key}' is {record[key]}, outside [{lo}, {hi}]; {fix}")
    if "mean" in required and (problem := stats_problem(record)):
        raise StampError(f"{path}: {problem}; {fix}")
