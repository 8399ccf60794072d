"""The published generator artifact and the versioned store that holds it.

An artifact directory is self-contained (what `stamp prune` needs, nothing pickled)::

    generator.safetensors   set encoder + mask generator weights
    generator.json          format, backbone identity, group layout, meta config, step, metrics
    backbone.safetensors    the frozen reference backbone (same format as `stamp pretrain` writes)
    backbone.json

A run directory keeps versions ``generators/v000100/`` … with ``latest.json`` / ``best.json``
pointers and the last K versions (the best is never deleted). ``resolve`` accepts an artifact
directory or a run directory (then it picks ``best``).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, read_json, restore_interrupted, write_json
from ..config import MetaConfig
from ..errors import StampError
from ..models.backbones import Backbone
from ..pruning.groups import ChannelGroups, discover_groups
from ..pruning.macs import CostModel
from .objective import Stamp
from .set_inputs import LEGACY_STATS

FORMAT = "stamp_dist/generator/v1"


def backbone_fingerprint(backbone: Backbone) -> str:
    """A hash of the backbone's weights: a generator is only valid for the exact backbone it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def group_layout(groups: ChannelGroups) -> list[dict]:
    return [{"name": g.name, "channels": g.channels} for g in groups]


def save_generator(directory: str | Path, stamp: Stamp, backbone: Backbone, backbone_meta: dict,
                   groups: ChannelGroups, meta_cfg: dict, step: int, metrics: dict) -> None:
    from ..pretrain import save_backbone

    info = {
        "format": FORMAT,
        "backbone": {**{k: backbone_meta[k] for k in ("backbone", "width", "image_size", "mean", "std")},
                     "fingerprint": backbone_fingerprint(backbone)},
        "groups": group_layout(groups),
        "meta": meta_cfg,
        "step": step,
        "metrics": metrics,
    }
    with atomic_dir(directory, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in stamp.state_dict().items()},
                  str(tmp / "generator.safetensors"))
        save_backbone(tmp, backbone, backbone_meta)
        write_json(tmp / "generator.json", info)


@dataclass
class Generator:
    """A loaded artifact: everything needed to prune for a new target."""

    stamp: Stamp
    backbone: Backbone
    backbone_meta: dict
    groups: ChannelGroups
    cost: CostModel
    info: dict
    path: Path


def resolve(path: str | Path) -> Path:
    """An artifact directory, or a run directory's ``best`` (else ``latest``) version."""
    path = Path(path)
    restore_interrupted(path)
    if (path / "generator.json").is_file():
        return path
    for pointer in ("best.json", "latest.json"):
        for root in (path, path / "generators"):
            if (root / pointer).is_file():
                version = root / read_json(root / pointer, "generator pointer")["version"]
                restore_interrupted(version)
                return version
    raise StampError(
        f"{path} holds no generator artifact (generator.json) and no run with best.json/latest.json; "
        "pass the directory written by `stamp meta-train`"
    )


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    from ..pretrain import load_backbone

    path = resolve(path)
    info = read_json(path / "generator.json", "generator artifact")
    if info.get("format") != FORMAT:
        raise StampError(f"{path}/generator.json has format {info.get('format')!r}, expected {FORMAT!r}")
    backbone, backbone_meta = load_backbone(path)
    if backbone_fingerprint(backbone) != info["backbone"]["fingerprint"]:
        raise StampError(f"{path}: backbone weights do not match the generator's fingerprint; the artifact is corrupt")
    backbone = backbone.to(device).eval().requires_grad_(False)
    size = info["backbone"]["image_size"]
    groups = discover_groups(backbone, torch.zeros(1, 3, size, size, device=device))
    if group_layout(groups) != info["groups"]:
        raise StampError(f"{path}: the backbone's channel groups differ from the generator's group layout")
    # Generators saved before ``meta.channel_stats`` / ``meta.stats`` existed were built without statistics /
    # with the first two.
    legacy = {"channel_stats": False, "stats": list(LEGACY_STATS), "allocation": "learned"}
    stamp = Stamp(backbone.feature_dim, groups.sizes, MetaConfig(**{**legacy, **info["meta"]}))
    stamp.load_state_dict(load_file(str(path / "generator.safetensors"), device=str(device)))
    cost = CostModel(backbone, groups, (3, size, size))
    return Generator(stamp.to(device).eval(), backbone, backbone_meta, groups, cost, info, path)


class GeneratorStore:
    """Versioned artifacts of one run with ``latest``/``best`` pointers, keeping the last ``keep`` versions."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.root = Path(run_dir) / "generators"
        self.keep = keep

    def pointer(self, name: str) -> dict | None:
        path = self.root / f"{name}.json"
        return read_json(path, "generator pointer") if path.is_file() else None

    def publish(self, step: int, score: float, save) -> Path:
        """``save(directory)`` writes one artifact; then pointers move and old versions are pruned."""
        version = f"v{step:06d}"
        save(self.root / version)
        write_json(self.root / "latest.json", {"version": version, "step": step, "score": score})
        best = self.pointer("best")
        if best is None or score >= best["score"]:
            write_json(self.root / "best.json", {"version": version, "step": step, "score": score})
        protected = {version, (self.pointer("best") or {}).get("version")}
        versions = sorted(p for p in self.root.glob("v[0-9]*") if p.is_dir())
        for old in versions[: max(0, len(versions) - self.keep)]:
            if old.name not in protected:
                shutil.rmtree(old)
        return self.root / version
