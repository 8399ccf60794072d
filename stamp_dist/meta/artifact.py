"""The published generator artifact and the versioned store that holds it.

An artifact directory is self-contained (what `stamp prune` needs, nothing pickled)::

    generator.safetensors   set encoder + mask generator weights
    generator.json          format, backbone identity, group layout, the module's settings (``stamp``:
                            ``StampSettings``), the run's meta config (for reports), step, metrics
    backbone.safetensors    the frozen reference backbone (same format as `stamp pretrain` writes)
    backbone.json

A run directory keeps versions ``generators/v000100/`` … with ``latest.json`` / ``best.json``
pointers and the last K versions (the best is never deleted). ``resolve`` accepts an artifact
directory or a run directory (then it picks ``best``).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..atomic import atomic_dir, read_json, restore_interrupted, write_json
from ..choices import ALLOCATIONS, BUDGET_KINDS, CHANNEL_STATS, PRIORS
from ..config import MetaConfig
from ..errors import StampError
from ..integrity import HASH_KEY, load_tensors, save_tensors
from ..ranges import check_numbers
from ..records import check_record
from ..models.saved import save_backbone
from ..pruning.groups import ChannelGroups
from ..pruning.prunable import PrunableBackbone
from .objective import Stamp, StampSettings
from .set_inputs import LEGACY_STATS

FORMAT = "stamp_dist/generator/v2"
V1 = "stamp_dist/generator/v1"  # held no settings of its own, only the run's meta config: still read (_settings)
WEIGHTS = "generator.safetensors"
VERSION = re.compile(r"v\d{6}")  # a version directory's name (GeneratorStore.publish)


def group_layout(groups: ChannelGroups) -> list[dict]:
    return [{"name": g.name, "channels": g.channels} for g in groups]


def save_generator(directory: str | Path, stamp: Stamp, net: PrunableBackbone, meta_cfg: dict, step: int,
                   metrics: dict) -> None:
    info = {
        "format": FORMAT,
        "backbone": {**{k: net.record[k] for k in ("backbone", "width", "image_size", "mean", "std")},
                     "fingerprint": net.fingerprint()},
        "groups": group_layout(net.groups),
        "stamp": asdict(stamp.settings),
        "meta": meta_cfg,
        "step": step,
        "metrics": metrics,
    }
    with atomic_dir(directory, overwrite=True) as tmp:
        info[HASH_KEY] = save_tensors(stamp.state_dict(), tmp / WEIGHTS, f"the generator of step {step}")
        save_backbone(tmp, net.backbone, net.record)
        write_json(tmp / "generator.json", info)


@dataclass
class Generator:
    """A loaded artifact: everything needed to prune for a new target."""

    stamp: Stamp
    net: PrunableBackbone  # the backbone it was trained on (its copy in the artifact)
    info: dict  # generator.json as read
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
                version = root / _version(read_json(root / pointer, "generator pointer"), root / pointer)
                restore_interrupted(version)
                return version
    raise StampError(
        f"{path} holds no generator artifact (generator.json) and no run with best.json/latest.json; "
        "pass the directory written by `stamp meta-train`"
    )


def _version(pointer: Any, path: Path) -> str:
    """The version directory a ``latest``/``best`` pointer names (``v`` + 6 digits, never a path elsewhere)."""
    fix = "delete it (the next publish rewrites it) or pass a version directory"
    check_record(pointer, {"version": str, "step": int, "score": (int, float)}, path, fix)
    if not VERSION.fullmatch(pointer["version"]):
        raise StampError(f"generator pointer {path} names version {pointer['version']!r}, not a name like v000100; "
                         f"{fix}")
    return pointer["version"]


def _settings(info: dict, path: Path, fix: str) -> StampSettings:
    """The module's settings, checked: its own record (``stamp``) from v2 on. A v1 artifact held only the
    run's meta config, whose keys they are; generators saved before ``meta.channel_stats`` / ``meta.stats`` /
    ``meta.allocation`` existed were built without statistics / with the first two / with the learned allocation,
    and those saved before ``meta.budget_kind`` were trained for MACs (the settings' default)."""
    if info["format"] != V1:
        check_record(info, {"stamp": dict}, path, fix)
    legacy = {"channel_stats": False, "stats": list(LEGACY_STATS), "allocation": "learned"}
    try:
        raw = info["stamp"] if info["format"] != V1 else \
            asdict(StampSettings.of(SimpleNamespace(**{**asdict(MetaConfig()), **legacy, **info["meta"]})))
        cfg = OmegaConf.merge(OmegaConf.structured(StampSettings), raw)
        check_numbers(OmegaConf.create({"meta": cfg}))  # the ranges of the meta.* keys they come from
        settings: StampSettings = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except (OmegaConfBaseException, TypeError, StampError) as e:
        raise StampError(f"{path}: its STAMP settings are invalid ({str(e).splitlines()[0]}); {fix}") from None
    if (settings.encoder_dim % settings.encoder_heads or settings.allocation not in ALLOCATIONS
            or settings.prior not in PRIORS or not set(settings.stats) <= set(CHANNEL_STATS)
            or settings.budget_kind not in BUDGET_KINDS):
        raise StampError(f"{path}: its STAMP settings are invalid (encoder_dim a multiple of encoder_heads, allocation, "
                         f"prior, stats and budget_kind among the choices of meta.*); {fix}")
    return settings


def load_generator(path: str | Path, device: str | torch.device = "cpu", micro_batch: int = 0) -> Generator:
    """A generator artifact (or a run's best one) on ``device``; ``micro_batch``: see ``runtime.micro_batch``."""
    path = resolve(path)
    record = path / "generator.json"
    fix = (f"the generator artifact {path} is damaged: copy it again, or publish a new one with `stamp meta-train` "
           "(a run directory picks its best version)")
    info = read_json(record, "generator artifact")
    if not isinstance(info, dict) or info.get("format") not in (FORMAT, V1):
        found = info.get("format") if isinstance(info, dict) else None
        raise StampError(f"{record} has format {found!r}, expected {FORMAT!r} (or {V1!r})")
    check_record(info, {"backbone": dict, "groups": list, "meta": dict, "step": int}, record, fix)
    check_record(info["backbone"], {"fingerprint": str, "image_size": int}, record, fix)
    net = PrunableBackbone.load(path, device, fix, micro_batch=micro_batch)
    if net.fingerprint() != info["backbone"]["fingerprint"]:
        raise StampError(f"{path}: backbone weights do not match the generator's fingerprint; {fix}")
    if group_layout(net.groups) != info["groups"]:
        raise StampError(f"{path}: the backbone's channel groups differ from the generator's group layout; {fix}")
    stamp = Stamp(net.backbone.feature_dim, net.groups.sizes, _settings(info, record, fix))
    weights = load_tensors(path / WEIGHTS, "generator weights", info.get(HASH_KEY), fix, device)
    try:
        stamp.load_state_dict(weights)
    except RuntimeError as e:
        raise StampError(f"{path / WEIGHTS} does not match {record} ({str(e).splitlines()[0]}); {fix}") from None
    return Generator(stamp.to(device).eval(), net, info, path)


class GeneratorStore:
    """Versioned artifacts of one run with ``latest``/``best`` pointers, keeping the last ``keep`` versions."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.root = Path(run_dir) / "generators"
        self.keep = keep

    def pointer(self, name: str) -> dict | None:
        path = self.root / f"{name}.json"
        if not path.is_file():
            return None
        pointer = read_json(path, "generator pointer")
        _version(pointer, path)
        return pointer

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
