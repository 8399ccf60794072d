"""Formula-driven reference classes: fractals of random iterated function systems (FractalDB-style).

Kataoka et al. (ACCV 2020) showed that pretraining on images of random IFS attractors transfers to
real images. Here they widen the demo's reference beyond shapes: a *genus* is a random IFS of 2-4
contractive affine maps; its *species* (the classes) perturb the genus's maps, so a task inside one
genus needs fine detail and a task across genera coarse form. Every image perturbs its species'
maps a little more and draws its own pose, colours, background and noise.

Images are rendered by the chaos game, vectorised over the images of a class: ``POINTS`` chains per
image iterate ``STEPS`` times, and the visited points are splatted on a 2× supersampled grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POINTS, BURN_IN, STEPS = 256, 8, 40
SPECIES_PER_GENUS = 8
SPECIES_JITTER, IMAGE_JITTER = 0.12, 0.03  # relative perturbation of the maps per species, per image
MIN_FILL = 0.12  # a genus whose attractor covers less of its box is dust, not a form: drawn again


@dataclass(frozen=True)
class IFS:
    """``K`` affine maps ``x -> A[k] x + b[k]``; the chaos game picks map ``k`` with probability ∝ |det A[k]|."""
    A: np.ndarray  # [K, 2, 2]
    b: np.ndarray  # [K, 2]


def _rotation(t: np.ndarray) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def random_ifs(rng: np.random.Generator) -> IFS:
    """Maps ``R(a) diag(s) R(b)`` with singular values in [0.3, 0.8] (contractive, so the attractor exists)."""
    k = int(rng.integers(2, 5))
    sv = rng.uniform(0.3, 0.8, (k, 2)) * rng.choice([-1.0, 1.0], (k, 2))
    A = _rotation(rng.uniform(0, 2 * np.pi, k)) @ (sv[:, :, None] * np.eye(2)) @ _rotation(rng.uniform(0, 2 * np.pi, k))
    return IFS(A, rng.uniform(-1, 1, (k, 2)))


def perturb(ifs: IFS, scale: float, rng: np.random.Generator, n: int | None = None) -> IFS:
    """``ifs`` with every parameter moved by ``scale`` × N(0, 1) (``n`` copies stacked on a leading axis)."""
    shape = () if n is None else (n,)
    return IFS(ifs.A + scale * rng.standard_normal(shape + ifs.A.shape),
               ifs.b + scale * rng.standard_normal(shape + ifs.b.shape))


def attractor_points(ifs: IFS, rng: np.random.Generator) -> np.ndarray:
    """Chaos-game points of a stack of ``n`` IFS (``A`` [n, K, 2, 2]), normalised to [-1, 1]², ``[n, P·S, 2]``."""
    n, k = ifs.A.shape[:2]
    # Perturbed maps may expand a little; rescale any map whose largest singular value exceeds 0.9.
    top = np.linalg.norm(ifs.A, ord=2, axis=(-2, -1))
    A = ifs.A * np.minimum(1.0, 0.9 / top)[..., None, None]
    det = np.abs(np.linalg.det(A)) + 1e-3
    cdf = np.cumsum(det / det.sum(-1, keepdims=True), -1)  # [n, K]
    # The six map coefficients as flat [n·K] arrays: gathering scalars is much cheaper than [2, 2] blocks.
    coef = [c.astype(np.float32).ravel() for c in (A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1],
                                                   ifs.b[..., 0], ifs.b[..., 1])]
    x, y = (rng.uniform(-1, 1, (n, POINTS)).astype(np.float32) for _ in range(2))
    base = (np.arange(n) * k)[:, None]
    out = []
    for step in range(BURN_IN + STEPS):
        u = rng.random((n, POINTS, 1), dtype=np.float32)
        pick = base + np.minimum((u > cdf[:, None, :]).sum(-1), k - 1)  # [n, P] indices into coef
        a, b, c, d, e, f = (v[pick] for v in coef)
        x, y = a * x + b * y + e, c * x + d * y + f
        if step >= BURN_IN:
            out.append(np.stack([x, y], -1))
    pts = np.concatenate(out, axis=1)
    lo, hi = pts.min(1, keepdims=True), pts.max(1, keepdims=True)
    centre, half = (lo + hi) / 2, (hi - lo).max(-1, keepdims=True) / 2 + 1e-6
    return (pts - centre) / half


def fill_rate(ifs: IFS, rng: np.random.Generator, size: int = 32) -> float:
    """Fraction of a ``size``² grid over the attractor's box that the attractor touches."""
    pts = attractor_points(perturb(ifs, 0.0, rng, 1), rng)[0]
    cells = np.clip(((pts + 1) / 2 * size).astype(int), 0, size - 1)
    return len(np.unique(cells[:, 0] * size + cells[:, 1])) / size**2


def make_genera(count: int, rng: np.random.Generator) -> list[IFS]:
    """``count`` random IFS whose attractors fill at least ``MIN_FILL`` of their box."""
    genera: list[IFS] = []
    while len(genera) < count:
        ifs = random_ifs(rng)
        if fill_rate(ifs, rng) >= MIN_FILL:
            genera.append(ifs)
    return genera


def splat(points: np.ndarray, radius: np.ndarray, angle: np.ndarray, centre: np.ndarray, size: int) -> np.ndarray:
    """Point density of ``points`` ([n, M, 2] in [-1, 1]²) posed in a ``size``² image, ``[n, size, size, 1]`` in [0, 1].

    Drawn on a 2× supersampled grid and averaged back (anti-aliasing); intensity is the log of the hit count,
    normalised per image, so thin filaments stay visible next to dense cores."""
    n = len(points)
    c, s = (f(angle)[:, None] * radius[:, None] for f in (np.cos, np.sin))
    px, py = points[..., 0], points[..., 1]
    gx = np.clip(((c * px - s * py + centre[:, :1]) * 2).astype(np.int64), 0, 2 * size - 1)
    gy = np.clip(((s * px + c * py + centre[:, 1:]) * 2).astype(np.int64), 0, 2 * size - 1)
    flat = (np.arange(n)[:, None] * (2 * size) ** 2 + gy * 2 * size + gx).ravel()
    hits = np.bincount(flat, minlength=n * (2 * size) ** 2).reshape(n, 2 * size, 2 * size).astype(np.float32)
    hits = hits[:, 0::2, 0::2] + hits[:, 0::2, 1::2] + hits[:, 1::2, 0::2] + hits[:, 1::2, 1::2]
    density = np.log1p(hits)
    return (density / np.maximum(density.max((1, 2), keepdims=True), 1e-6))[..., None]
