"""A backbone on disk: ``backbone.safetensors`` (its state dict, nothing pickled) + ``backbone.json`` (what
rebuilds it: architecture, width, classes, image size, normalisation; the weights' sha256).

`stamp pretrain` writes one; a generator artifact holds a copy of its own. Both are read here, in the models
layer, so that the meta-trainer and the artifact code read a backbone without importing a stage.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_file, read_json, write_json
from ..errors import StampError
from ..integrity import HASH_KEY, load_tensors, save_tensors
from ..records import check_record
from .backbones import Backbone, build_backbone

WEIGHTS, META = "backbone.safetensors", "backbone.json"


def save_backbone(directory: str | Path, model: Backbone, meta: dict) -> None:
    """Write ``backbone.safetensors`` + ``backbone.json`` (``meta`` must hold backbone, width, num_classes);
    the record holds the weights' sha256."""
    directory = Path(directory)
    (directory / META).unlink(missing_ok=True)  # the record goes last: weights without a record are never trusted
    with atomic_file(directory / WEIGHTS) as tmp:
        digest = save_tensors(model.state_dict(), tmp, f"the {meta['backbone']} backbone")
    write_json(directory / META, {**meta, HASH_KEY: digest})


REQUIRED = {"backbone": str, "width": int, "num_classes": int, "image_size": int, "mean": list, "std": list}


def load_backbone(directory: str | Path, fix: str = "re-run `stamp pretrain`") -> tuple[Backbone, dict]:
    """Rebuild a pretrained backbone from ``backbone.json`` + ``backbone.safetensors`` (hash-checked, strict),
    in eval mode. ``fix`` ends every error message (what the user should do about a damaged backbone)."""
    directory = Path(directory)
    meta = read_json(directory / META, "backbone record")
    check_record(meta, REQUIRED, directory / META, fix)
    try:
        model = build_backbone(meta["backbone"], meta["num_classes"], meta["width"], meta["image_size"])
    except (StampError, RuntimeError) as e:
        raise StampError(f"{directory / META}: {e}; {fix}") from None
    state = load_tensors(directory / WEIGHTS, "backbone weights", meta.get(HASH_KEY), fix)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise StampError(f"{directory / WEIGHTS} does not match {META} ({str(e).splitlines()[0]}); {fix}") from None
    return model.eval(), meta
