"""The per-class shard format's index: ``manifest.json`` beside ``<split>/<class>-<n>.tar`` shards.

Layout of a dataset directory::

    manifest.json
    train/00000-0000.tar   # class 0, shard 0: samples {key}.png + {key}.cls
    train/00000-0001.tar
    test/00000-0000.tar

One class per shard file makes N-way episode sampling cheap at ImageNet scale: a task opens only
the shards of its N classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import read_json, write_json
from ..errors import StampError

FORMAT = "stamp_dist/per-class-shards/v1"
MANIFEST = "manifest.json"


@dataclass
class SplitInfo:
    counts: list[int]  # images per class
    shards: list[list[str]]  # per class: shard paths relative to the dataset directory


@dataclass
class Manifest:
    classes: list[str]
    image_size: int
    splits: dict[str, SplitInfo]
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per channel, in [0, 1]
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    channels: int = 3
    source: str = ""
    format: str = FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise StampError(f"dataset has no '{name}' split; it has: {', '.join(self.splits)}")
        return self.splits[name]

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / MANIFEST, self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        """Read and validate ``directory/manifest.json``; every problem names the file."""
        path = Path(directory) / MANIFEST
        if not Path(directory).is_dir():
            raise StampError(f"dataset directory not found: {directory}")
        if not path.is_file():
            raise StampError(
                f"{path} is missing: {directory} is not a stamp_dist dataset. "
                "Create one with `stamp data convert` or `stamp data demo`."
            )
        raw = read_json(path, "manifest")
        if not isinstance(raw, dict):
            raise StampError(f"{path} is malformed: expected a JSON object")
        if raw.get("format") != FORMAT:
            raise StampError(f"{path} is malformed: 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
        try:
            splits = {name: SplitInfo(**s) for name, s in raw["splits"].items()}
            m = cls(**{**raw, "splits": splits})
        except (KeyError, TypeError, AttributeError) as e:
            raise StampError(f"{path} is malformed ({e}); regenerate it with `stamp data convert`") from None
        n = len(m.classes)
        for name, s in m.splits.items():
            if len(s.counts) != n or len(s.shards) != n:
                raise StampError(
                    f"{path} is malformed: split '{name}' lists {len(s.counts)} counts and "
                    f"{len(s.shards)} shard lists for {n} classes"
                )
        return m
