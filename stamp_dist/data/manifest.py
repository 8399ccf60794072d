"""The per-class shard format's index: ``manifest.json`` beside ``<split>/<class>-<n>.tar`` shards.

Layout of a dataset directory::

    manifest.json
    train/00000-0000.tar       # class 0, shard 0: samples {key}.png|jpg + {key}.cls
    train/00000-0000.tar.idx   # where each sample's image lies in the tar (readers.write_index)
    train/00000-0001.tar
    test/00000-0000.tar

One class per shard file makes N-way episode sampling cheap at ImageNet scale: a task opens only
the shards of its N classes, and the ``.idx`` files let a reader seek to the images it needs.

Format v1: every image is stored at ``image_size``. v2 (written when JPEGs were kept as they came,
at their own size): ``resize`` is set and those images are resized and centre-cropped when read
(``readers.eval_crop``). v1 datasets still read; a reader that only knows v1 refuses v2 by its format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ..atomic import read_json, write_json
from ..errors import StampError
from ..records import MAX_CLASSES, MAX_IMAGE_SIZE, is_int, stats_problem

FORMAT_V1 = "stamp_dist/per-class-shards/v1"
FORMAT = "stamp_dist/per-class-shards/v2"
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
    # v2: images not stored at image_size (original JPEGs) get their shorter side resized to this, then the
    # centre image_size square, when read; None (v1): every image is stored at image_size
    resize: int | None = None
    format: str = FORMAT_V1

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise StampError(f"dataset has no '{name}' split; it has: {', '.join(self.splits)}")
        return self.splits[name]

    def to_json(self) -> dict:
        """v1 stays byte-identical to what earlier versions wrote (a pretrained backbone's run key hashes it)."""
        d = asdict(self)
        resize = d.pop("resize")
        return d if resize is None else d | {"resize": resize, "format": FORMAT}

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
        if raw.get("format") not in (FORMAT_V1, FORMAT):
            raise StampError(f"{path} is malformed: 'format' is {raw.get('format')!r}, expected {FORMAT!r} "
                             f"(or {FORMAT_V1!r})")
        try:
            splits = {name: SplitInfo(**s) for name, s in raw["splits"].items()}
            m = cls(**{**raw, "splits": splits})
        except KeyError as e:
            raise StampError(f"{path} is malformed: no {e} field; regenerate it with `stamp data convert`") from None
        except (TypeError, AttributeError) as e:
            raise StampError(f"{path} is malformed ({e}); regenerate it with `stamp data convert`") from None
        m._validate(path)
        return m

    def _validate(self, path: Path) -> None:
        """Catch hand-edited or foreign manifests here rather than deep inside a reader."""

        def bad(problem: str) -> StampError:
            return StampError(f"{path} is malformed: {problem}; regenerate it with `stamp data convert`")

        if not isinstance(self.classes, list) or not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise bad("'classes' must be a non-empty list of names")
        if len(self.classes) > MAX_CLASSES:
            raise bad(f"'classes' lists {len(self.classes)} classes, more than the {MAX_CLASSES} supported")
        if not is_int(self.image_size) or not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise bad(f"'image_size' is {self.image_size!r}, expected an integer in [1, {MAX_IMAGE_SIZE}]")
        if (self.format == FORMAT) != (self.resize is not None):
            raise bad(f"'resize' is {self.resize!r} in a {self.format!r} manifest: format v2 has it, v1 does not")
        if self.resize is not None and not (is_int(self.resize) and self.image_size <= self.resize <= MAX_IMAGE_SIZE):
            raise bad(f"'resize' is {self.resize!r}, expected an integer in [image_size, {MAX_IMAGE_SIZE}]")
        if not is_int(self.channels) or self.channels != 3:
            raise bad(f"'channels' is {self.channels!r}; the format stores RGB images: it must be the integer 3")
        if problem := stats_problem({"mean": self.mean, "std": self.std}):
            raise bad(problem)
        if not self.splits:
            raise bad("'splits' is empty")
        n = len(self.classes)
        for name, s in self.splits.items():
            if not (isinstance(s.counts, list) and isinstance(s.shards, list) and len(s.counts) == len(s.shards) == n):
                raise bad(f"split '{name}' must list counts and shard lists for each of the {n} classes")
            if not all(is_int(c) and c >= 0 for c in s.counts):
                raise bad(f"split '{name}' has counts that are not non-negative integers")
            if not all(isinstance(sh, list) and all(isinstance(p, str) for p in sh) for sh in s.shards):
                raise bad(f"split '{name}' has shard lists that are not lists of paths")
            for rel in (p for sh in s.shards for p in sh):
                if not _confined_shard_path(rel):
                    raise bad(f"split '{name}' lists shard {rel!r}: shards must be .tar files given by a relative "
                              "path inside the dataset directory (no absolute paths, no '..')")


def _confined_shard_path(rel: str) -> bool:
    """A shard path stays inside the dataset directory: relative, without ``..``, naming a ``.tar`` file.
    (Lexical: symlinks the user placed inside the dataset directory are followed as they are.)"""
    path = PurePosixPath(rel)
    return (bool(rel) and not path.is_absolute() and "\\" not in rel and ".." not in path.parts
            and path.suffix == ".tar")
