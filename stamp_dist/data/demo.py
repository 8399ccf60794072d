"""The built-in demo datasets: a synthetic reference, a synthetic held-out target and real digits.

``make_demo_data(out, data_cfg)`` writes, as per-class shard datasets::

    out/reference                    synthetic: ``demo_classes`` classes, shape × texture × colour, plus
                                     ``demo_fractal_classes`` fractal classes (data/fractals.py) when set
    out/targets/synthetic_heldout    synthetic: 16 classes of two shapes the reference never shows
    out/targets/digits               real: scikit-learn's ``load_digits`` (8×8 → 32×32), 1,500/297 split
    out/targets/fashion_mnist        real: Fashion-MNIST (28×28 → 32×32), 500 train / 100 test images per class,
                                     written only where Debian's ``dataset-fashion-mnist`` is installed
    out/demo.json                    the data config the directory was made with (the stage cache key)

A synthetic class is one (shape, texture, colour family) combination. Every image draws its own
pose, scale, stretch, position, background, clutter and pixel noise, so a class is recognisable
only from its defining attributes. Images are drawn with numpy on coordinate grids (2× supersampled
for anti-aliasing), a whole class at a time. Each (class, split) has its own random stream seeded
from ``(seed, attributes, split)``, so a class's images do not depend on which other classes exist.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..atomic import atomic_dir, read_json, write_json
from ..errors import StampError
from ..progress import progress
from .convert import IDX_FILES, has_idx, idx_split
from .fractals import IFS, IMAGE_JITTER, SPECIES_JITTER, SPECIES_PER_GENUS, attractor_points, make_genera, perturb, splat
from .manifest import Manifest
from .shards import PerClassShardWriter

IMAGE_SIZE = 32
GENERATOR_VERSION = 1  # bump when the images change, so cached demo directories are not reused
HELDOUT_CLASSES = 16
DIGITS_TEST = 297  # load_digits has 1,797 images: 1,500 train / 297 test

# --- class attributes --------------------------------------------------------------------------
# Shapes are implicit functions of object coordinates (u, v), the object spanning about [-1, 1]².


def _star(u, v):
    r, a = np.hypot(u, v), np.arctan2(v, u)
    return r <= 0.55 + 0.45 * np.cos(5 * a)


def _heart(u, v):
    x, y = 1.15 * u, 1.15 * v + 0.1
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


SHAPES = {
    "disk": lambda u, v: u**2 + v**2 <= 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: (v >= -0.5) & (np.sqrt(3) * np.abs(u) + v <= 1),
    "ring": lambda u, v: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.55**2),
    "cross": lambda u, v: ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.maximum(np.abs(u), np.abs(v)) <= 1),
    "star": _star,
    "crescent": lambda u, v: (u**2 + v**2 <= 1) & ((u - 0.45) ** 2 + v**2 > 0.75**2),
    "ellipse": lambda u, v: u**2 + (v / 0.45) ** 2 <= 1,
    # Held out: the reference never shows these two, so the synthetic target needs new features.
    "heart": _heart,
    "arrow": lambda u, v: ((np.abs(v) <= 0.22) & (u >= -1) & (u <= 0.1)) | ((u >= 0.1) & (np.abs(v) <= 0.75 * (1 - u))),
}
REFERENCE_SHAPES = ["disk", "square", "triangle", "ring", "cross", "star", "crescent", "ellipse"]
HELDOUT_SHAPES = ["heart", "arrow"]
TEXTURES = ["flat", "striped", "checkered", "dotted"]
COLOURS = {"red": (-0.03, 0.03), "yellow": (0.12, 0.17), "green": (0.28, 0.40), "blue": (0.58, 0.68)}  # hue ranges


def _combinations(shapes: list[str]) -> list[tuple[str, str, str]]:
    """(colour, texture, shape) combinations, those with even index sum first.

    The even half is balanced: every shape, texture and colour appears equally often and every
    (shape, texture) pair twice, so the first 64 reference classes use every attribute value."""
    combos = [(c, t, s) for c in COLOURS for t in TEXTURES for s in shapes]
    index = {name: i for names in (list(COLOURS), TEXTURES, shapes) for i, name in enumerate(names)}
    return sorted(combos, key=lambda cts: sum(index[x] for x in cts) % 2)


REFERENCE_COMBOS = _combinations(REFERENCE_SHAPES)  # up to 128 reference classes
HELDOUT_COMBOS = _combinations(HELDOUT_SHAPES)[:HELDOUT_CLASSES]


def class_name(combo: tuple[str, str, str]) -> str:
    return "-".join(combo)


# --- image generator -------------------------------------------------------------------------


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV → RGB in [0, 1]; arrays of any (equal) shape, result has a trailing axis of 3."""
    h = np.mod(h, 1.0) * 6
    k = np.stack([np.mod(5 + h, 6), np.mod(3 + h, 6), np.mod(1 + h, 6)], axis=-1)
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _texture(name: str, x, y, rng, n):
    """Where the second (dark) texture colour shows, as a bool mask; x, y in object pixels."""
    r = _draws(rng, n)
    if name == "flat":
        return np.zeros(x.shape, dtype=bool)
    if name == "striped":
        return np.sin(2 * np.pi * x / r(4.0, 6.0) + r(0, 2 * np.pi)) > 0
    if name == "checkered":
        cell = r(2.5, 3.5)
        return (np.floor(x / cell) + np.floor(y / cell)) % 2 == 1
    if name == "dotted":
        period = r(4.5, 6.0)
        dx, dy = np.mod(x, period) - period / 2, np.mod(y, period) - period / 2
        return dx**2 + dy**2 <= (0.3 * period) ** 2
    raise ValueError(name)


def _coverage(mask: np.ndarray) -> np.ndarray:
    """Supersampled ``[n, 64, 64]`` mask → fraction of each output pixel covered, ``[n, 32, 32, 1]``."""
    m = mask.view(np.uint8)
    hits = m[:, 0::2, 0::2] + m[:, 0::2, 1::2] + m[:, 1::2, 0::2] + m[:, 1::2, 1::2]
    return (hits.astype(np.float32) * 0.25)[..., None]


def render_class(combo: tuple[str, str, str], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` images of one (colour, texture, shape) class as uint8 ``[n, 32, 32, 3]``.

    Masks (shape, texture, clutter) are drawn on a 2× supersampled grid and averaged to coverage
    (anti-aliasing); colours are composited at the output size."""
    colour, texture, shape = combo
    r = _draws(rng, n)
    gy, gx = _grid()

    # Pose: radius in pixels, stretch, rotation, centre kept mostly inside the image.
    radius, stretch, angle = r(7.0, 12.0), r(0.85, 1.15), r(0, 2 * np.pi)
    cx = IMAGE_SIZE / 2 + r(-1, 1) * (IMAGE_SIZE / 2 - radius) * 0.7
    cy = IMAGE_SIZE / 2 + r(-1, 1) * (IMAGE_SIZE / 2 - radius) * 0.7
    cos, sin = np.cos(angle), np.sin(angle)
    px = (gx - cx) * cos + (gy - cy) * sin  # object coordinates in pixels (they rotate with the object)
    py = -(gx - cx) * sin + (gy - cy) * cos
    inside = SHAPES[shape](px / (radius * stretch), py * stretch / radius)
    alpha = _coverage(inside)
    dark = _coverage(inside & _texture(texture, px, py, rng, n))

    img = _background(n, rng, gx, gy)

    # Foreground: a hue from the colour family; the texture is a darker shade of the same hue.
    lo, hi = COLOURS[colour]
    fg = _hsv_to_rgb(r(lo, hi), r(0.65, 1.0), r(0.65, 1.0))
    img = img * (1 - alpha) + fg * (alpha - r(0.55, 0.75)[..., None] * dark)

    return _with_noise(img, rng)


def _draws(rng: np.random.Generator, n: int):
    """``r(lo, hi)``: one uniform draw per image, shaped to broadcast over ``[n, H, W]``."""
    return lambda lo, hi: rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Supersample centres (2× per axis), in output pixels: ``gy, gx`` of shape ``[64, 64]``."""
    pix = ((np.arange(2 * IMAGE_SIZE) + 0.5) / 2).astype(np.float32)
    return np.meshgrid(pix, pix, indexing="ij")


def _background(n: int, rng: np.random.Generator, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """A dull colour with a linear light gradient, under a few small bright blobs: ``[n, 32, 32, 3]``."""
    r = _draws(rng, n)
    out_pix = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5 - IMAGE_SIZE / 2
    slope_x, slope_y = r(-0.5, 0.5) / IMAGE_SIZE, r(-0.5, 0.5) / IMAGE_SIZE
    light = 1 + slope_x * out_pix[None, None, :] + slope_y * out_pix[None, :, None]
    img = _hsv_to_rgb(r(0, 1), r(0, 0.35), r(0.15, 0.85)) * light[..., None]
    for _ in range(4):
        bx, by, br = r(0, IMAGE_SIZE), r(0, IMAGE_SIZE), r(1.0, 2.5)
        blob = _coverage((gx - bx) ** 2 + (gy - by) ** 2 <= br**2)
        img = img * (1 - blob) + _hsv_to_rgb(r(0, 1), r(0.3, 1), r(0.3, 1)) * blob
    return img


def _with_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-image Gaussian pixel noise, then uint8."""
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * _draws(rng, len(img))(0.01, 0.06)[..., None]
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def render_fractal(species: IFS, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` images of one fractal class (``species``: its IFS) as uint8 ``[n, 32, 32, 3]``.

    Each image perturbs the maps slightly and draws its pose, a foreground of any hue (colour says
    nothing about a fractal class), the shape classes' background and noise."""
    r = _draws(rng, n)
    points = attractor_points(perturb(species, IMAGE_JITTER, rng, n), rng)
    radius, angle = rng.uniform(9.0, 15.0, n), rng.uniform(0, 2 * np.pi, n)
    centre = IMAGE_SIZE / 2 + rng.uniform(-0.5, 0.5, (n, 2)) * (IMAGE_SIZE / 2 - radius[:, None])
    alpha = splat(points, radius, angle, centre, IMAGE_SIZE)
    gy, gx = _grid()
    img = _background(n, rng, gx, gy)
    fg = _hsv_to_rgb(r(0, 1), r(0.3, 1.0), r(0.7, 1.0))
    return _with_noise(img * (1 - alpha) + fg * alpha, rng)


def _class_rng(seed: int, key: tuple[str, ...], split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("/".join([*key, split]).encode())])


@dataclass(frozen=True)
class SyntheticClass:
    """One synthetic class: its name, the key that seeds its image stream, and how to draw ``n`` images."""
    name: str
    key: tuple[str, ...]
    render: Callable[[int, np.random.Generator], np.ndarray]


def shape_classes(combos: list[tuple[str, str, str]]) -> list[SyntheticClass]:
    return [SyntheticClass(class_name(c), c, partial(render_class, c)) for c in combos]


def fractal_classes(count: int, seed: int) -> list[SyntheticClass]:
    """``count`` fractal classes named ``ifs<genus>-<species letter>``, ``SPECIES_PER_GENUS`` per genus: with
    ``meta.task_families: name_tokens`` a genus is a fine-grained family, a species letter a coarse one."""
    genera = make_genera(-(-count // SPECIES_PER_GENUS), np.random.default_rng([seed, zlib.crc32(b"ifs-genera")]))
    classes = []
    for i in range(count):
        g, s = divmod(i, SPECIES_PER_GENUS)
        species = perturb(genera[g], SPECIES_JITTER, np.random.default_rng([seed, g, s]))
        name = f"ifs{g:02d}-{chr(ord('a') + s)}"
        classes.append(SyntheticClass(name, (name,), partial(render_fractal, species)))
    return classes


def _write_synthetic(root: Path, classes: list[SyntheticClass], seed: int, per_split: dict[str, int], bar) -> Manifest:
    writer = PerClassShardWriter(root, [c.name for c in classes], IMAGE_SIZE,
                                 source=f"synthetic shapes and fractals (stamp_dist.data.demo v{GENERATOR_VERSION}, "
                                        f"seed {seed})")
    for label, cls in enumerate(classes):
        for split, n in per_split.items():
            for image in cls.render(n, _class_rng(seed, cls.key, split)):
                writer.add(split, label, image)
            bar.update(n)
    return writer.finish()


# --- real data: scikit-learn digits ------------------------------------------------------------


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits`` as uint8 ``[1797, 32, 32, 3]`` (0..16 → 0..255, bilinear 8→32) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
                    for im in small])
    return np.repeat(big[..., None], 3, axis=3), digits.target


def digits_split(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/test indices (each sorted, so shards keep the original order)."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST, stratify=labels, random_state=seed)
    return {"train": np.sort(train), "test": np.sort(test)}


def _write_digits(root: Path, seed: int) -> Manifest:
    images, labels = digits_images()
    writer = PerClassShardWriter(root, [str(d) for d in range(10)], IMAGE_SIZE,
                                 source="scikit-learn load_digits (real handwritten digits, 8x8 upsampled to 32x32)")
    for split, idx in digits_split(labels, seed).items():
        for i in idx:
            writer.add(split, int(labels[i]), images[i])
    return writer.finish()


# --- real data: Fashion-MNIST (Debian's dataset-fashion-mnist) ------------------------------------

FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]
# A seeded, class-balanced subset: the bench never uses more (50/class to prune and fine-tune on, 50/class
# to score), and decoding all 70,000 images would cost the demo ~40 s for nothing.
FASHION_PER_CLASS = {"train": 500, "test": 100}
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"


def _write_fashion_mnist(root: Path, seed: int, source: Path) -> Manifest:
    writer = PerClassShardWriter(root, FASHION_CLASSES, IMAGE_SIZE,
                                 source=f"Fashion-MNIST ({source}; real photos of clothing, 28x28 upsampled to 32x32)")
    rng = np.random.default_rng(seed)
    for split in IDX_FILES:
        found = idx_split(source, split)
        if found is None:
            raise StampError(f"{source}: no t10k-images/t10k-labels IDX files; the Fashion-MNIST target needs its "
                             "test split too (reinstall dataset-fashion-mnist, or set data.fashion_mnist='')")
        x, y, _ = found
        for label in range(len(FASHION_CLASSES)):
            idx = np.flatnonzero(y == label)
            for i in np.sort(rng.choice(idx, size=min(len(idx), FASHION_PER_CLASS[split]), replace=False)):
                writer.add(split, label, x[i])
    return writer.finish()


def add_fashion_mnist(out: Path, seed: int, source: str | Path) -> Path | None:
    """Write ``out/targets/fashion_mnist`` from the IDX files in ``source`` (``data.fashion_mnist``) if they
    exist and the target is not there yet; returns its path, or None (saying so) when they are absent."""
    path = out / LAYOUT_REAL["fashion_mnist"]
    if path.is_dir():
        return path
    if not has_idx(source):
        where = f"{source} has no train-images-idx3-ubyte[.gz]" if str(source) else "data.fashion_mnist is empty"
        print(f"note: Fashion-MNIST is not available ({where}), so the demo runs without that real target; "
              f"install it with `{FASHION_INSTALL}` and run again to add it")
        return None
    t0 = time.perf_counter()
    with atomic_dir(path) as tmp:
        m = _write_fashion_mnist(tmp, seed, Path(source))
    counts = "  ".join(f"{sum(m.split(s).counts):>6} {s}" for s in ("train", "test"))
    print(f"  {LAYOUT_REAL['fashion_mnist']:<27} {m.num_classes:>3} classes  {counts}  "
          f"({time.perf_counter() - t0:.1f} s, real: Fashion-MNIST)")
    return path


# --- the demo directory ------------------------------------------------------------------------

LAYOUT = {"reference": "reference", "synthetic_heldout": "targets/synthetic_heldout", "digits": "targets/digits"}
# Targets added on their own when their source is installed (not part of the cache key in demo.json).
LAYOUT_REAL = {"fashion_mnist": "targets/fashion_mnist"}


def _demo_key(data_cfg) -> dict:
    key = {"generator_version": GENERATOR_VERSION, "seed": int(data_cfg.seed),
           "demo_classes": int(data_cfg.demo_classes), "demo_train_per_class": int(data_cfg.demo_train_per_class),
           "demo_test_per_class": int(data_cfg.demo_test_per_class)}
    # Only when used, so directories made before fractal classes existed keep their key.
    fractals = int(data_cfg.demo_fractal_classes)
    return key | ({"demo_fractal_classes": fractals} if fractals else {})


def make_demo_data(out: str | Path, data_cfg) -> dict[str, Path]:
    """Write (or reuse) the demo datasets under ``out``; returns their paths by name."""
    out = Path(out)
    key = _demo_key(data_cfg)
    paths = {name: out / rel for name, rel in LAYOUT.items()}
    if not 1 <= key["demo_classes"] <= len(REFERENCE_COMBOS):
        raise StampError(f"data.demo_classes is {key['demo_classes']}; the synthetic reference offers 1 to "
                         f"{len(REFERENCE_COMBOS)} classes")
    if min(key["demo_train_per_class"], key["demo_test_per_class"]) < 1:
        raise StampError("data.demo_train_per_class and data.demo_test_per_class must be at least 1")

    if out.exists() and any(out.iterdir()):
        stored = read_json(out / "demo.json", "demo record") if (out / "demo.json").is_file() else None
        if stored == key:
            print(f"demo data in {out} is up to date (made with the same config); reusing it")
            return _with_real_targets(out, paths, data_cfg)
        what = "was made with a different data config" if stored else "is not a demo data directory"
        raise StampError(f"{out} already exists and {what} (found {stored}, want {key}); "
                         "remove it or pass another output path")

    t0 = time.perf_counter()
    per_split = {"train": key["demo_train_per_class"], "test": key["demo_test_per_class"]}
    reference = (shape_classes(REFERENCE_COMBOS[: key["demo_classes"]])
                 + fractal_classes(key.get("demo_fractal_classes", 0), key["seed"]))
    synthetic = (len(reference) + len(HELDOUT_COMBOS)) * sum(per_split.values())
    # all or nothing: an interrupted run leaves no ``out``
    with atomic_dir(out, overwrite=True) as tmp, progress(total=synthetic, desc="synthetic images", unit="img",
                                                          unit_scale=True) as bar:
        manifests = {
            "reference": _write_synthetic(tmp / LAYOUT["reference"], reference, key["seed"], per_split, bar),
            "synthetic_heldout": _write_synthetic(tmp / LAYOUT["synthetic_heldout"], shape_classes(HELDOUT_COMBOS),
                                                  key["seed"], per_split, bar),
            "digits": _write_digits(tmp / LAYOUT["digits"], key["seed"]),
        }
        write_json(tmp / "demo.json", key)

    print(f"wrote demo data to {out} in {time.perf_counter() - t0:.1f} s:")
    for name, m in manifests.items():
        counts = "  ".join(f"{sum(m.split(s).counts):>6} {s}" for s in ("train", "test"))
        print(f"  {LAYOUT[name]:<27} {m.num_classes:>3} classes  {counts}")
    paths = _with_real_targets(out, paths, data_cfg)
    print("  note: reference and synthetic_heldout are synthetic (procedural shape × texture × colour images); "
          "digits and fashion_mnist are real (handwritten digits, photos of clothing; upsampled).")
    return paths


def _with_real_targets(out: Path, paths: dict[str, Path], data_cfg) -> dict[str, Path]:
    fashion = add_fashion_mnist(out, int(data_cfg.seed), data_cfg.fashion_mnist)
    return paths | ({"fashion_mnist": fashion} if fashion is not None else {})
