"""Measured latency as a differentiable function of the per-group kept counts (a ``BudgetCost``: budget.py).

MACs miss what makes a pruned network fast or slow on real hardware: memory-bound elementwise layers (BN,
activations), per-layer overheads, kernel efficiency. Like HALP and NetAdapt we measure instead:

* **Per-layer table.** Every leaf-layer call of the forward pass (``groups.calls``: convs, BNs,
  activations, pooling, the head) is timed alone, eval mode, no grad, at the run's batch size, over a grid
  of kept in/out channel counts: the multiples of ``C // DIVISIONS`` up to the ``C`` prunable channels of
  its input and output (one axis when in and out are the same channels — BN, activations, depthwise — or
  are not pruned). Identical layer configurations are timed once; inputs rotate through more memory than
  the caches hold, as inside the network. Times are NOT smoothed: on this CPU a 16→16 3×3 conv took 3×
  longer than a 15→15 one (oneDNN picks another kernel), so latency is not monotone in the counts.
* **Prediction.** A call's time is the bilinear interpolation of its table at its current in/out counts
  (linear in the group counts, so differentiable in expected counts under keep probabilities, the surrogate
  that training uses); the network's raw prediction is the sum over calls. It is exact (up to calibration)
  on the grid, and the hard-mask rules keep grid counts at a latency budget (``LatencyModel.steps``): in
  between, kernels are not smooth.
* **Calibration.** Isolated layers miss what the whole network adds (residual adds, Python dispatch,
  caches), so the dense network and ``CALIBRATION_MASKS`` random masks (per-group keep fractions uniform
  in [0.1, 1], physically pruned through surgery.py) are timed end to end, and ``measured ≈ a · compute +
  b · memory + offset`` (the raw sums over convs/linears and over the other layers) is fitted by least squares
  of the relative error (networks timed in interleaved rounds, fastest counts: ``networks_ms``).
  The masks are drawn from a seed the benchmark's validation masks do not use (benchmarks/latency_model.py
  reports the error on those).

The table is measured once per backbone, device, thread count and batch size and cached as JSON next to
the backbone (``latency-<device>[-t<threads>]-b<batch>.json``, written atomically). It records the
architecture's fingerprint (module types, hyper-parameters and shapes and the channel layout of every
call, not the weights), the device's name, the torch version, the thread count, the batch and input size;
a table that disagrees with the run on any of them is refused with an error naming the file and the fix
(delete it to re-measure), never silently reused or overwritten.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import platform
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..atomic import read_json, write_json
from ..errors import StampError
from ..measure import latency_ms, time_ms
from ..progress import progress
from .groups import ChannelGroups, Parts
from .macs import _trace_shapes
from .surgery import prune_model

FORMAT = "stamp_dist/latency/v1"
DIVISIONS = 8  # a group of C channels keeps a multiple of C // DIVISIONS (or all): the table's grid
CALIBRATION_MASKS = 12
CALIBRATION_SEED = 12345  # the calibration masks' seed (validation masks must use others)
MIN_TIME_S = 0.002  # a timed sample runs the op enough times to last at least this long
COLD_BYTES = 64 * 2**20  # CPU layer timings cycle through this many bytes of inputs (larger than the caches)
REPEATS = 7  # timed samples per layer point and calibration network; the fastest counts (measure.time_ms)
ROUNDS = 3  # interleaved rounds of timing whole networks (networks_ms)


# --- what a table is valid for --------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def architecture_fingerprint(model: nn.Module, groups: ChannelGroups, input_size: Sequence[int]) -> str:
    """A hash of the structure latency depends on: every leaf module's type and hyper-parameters (its repr),
    parameter and buffer shapes, the channel layout of every call, the input size. Not the weights."""
    h = hashlib.sha256(json.dumps(list(input_size)).encode())
    for name, m in model.named_modules():
        if next(m.children(), None) is None:
            shapes = [(n, list(t.shape)) for n, t in [*m.named_parameters(recurse=False),
                                                      *m.named_buffers(recurse=False)]]
            h.update(f"{name}|{m!r}|{shapes}\n".encode())
    for c in groups.calls:
        h.update(f"{c.name}|{c.inputs}|{c.outputs}\n".encode())
    return h.hexdigest()[:16]


def timing_clock(device: torch.device) -> str:
    """``cpu`` (process CPU time) for a single-threaded CPU forward: it is the latency of an idle machine even
    on a busy one (on the project's shared 2-core machine wall time ran 3× over it under load, and varied ±50%
    between runs); ``wall`` otherwise (more threads, CUDA)."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def environment(model: nn.Module, groups: ChannelGroups, input_size: Sequence[int], batch: int,
                device: torch.device) -> dict:
    """What a table must agree on with the run that reads it."""
    return {"architecture": architecture_fingerprint(model, groups, input_size), "device_type": device.type,
            "device": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "batch": batch, "input_size": list(input_size), "clock": timing_clock(device)}


def table_path(directory: str | Path, env: dict) -> Path:
    threads = f"-t{env['threads']}" if env["threads"] else ""
    return Path(directory) / f"latency-{env['device_type']}{threads}-b{env['batch']}.json"


# --- measuring ----------------------------------------------------------------------------------------


def _total(parts: Parts, counts: dict[int, int] | None = None) -> int:
    return sum(n if g is None or counts is None else counts[g] for g, n in parts)


def _prunable(parts: Parts) -> int:
    return sum(n for g, n in parts if g is not None)


def grid_step(channels: int) -> int:
    """The step of a group's (or a tensor's prunable channels') grid of kept counts."""
    return max(1, channels // DIVISIONS)


def grid_points(channels: int) -> list[int]:
    """Kept counts on the grid: the multiples of ``grid_step`` below ``channels``, and ``channels``."""
    step = grid_step(channels)
    return [*range(step, channels, step), channels]


def _grid(parts: Parts) -> list[int]:
    """Total channel counts at which a tensor of ``parts`` is timed: its fixed channels plus the grid points of
    its prunable ones."""
    fixed, free = _total(parts) - _prunable(parts), _prunable(parts)
    return [fixed + n for n in grid_points(free)] if free else [fixed]


def _layer(module: nn.Module, name: str, n_in: int, n_out: int, full_in: int, full_out: int) -> nn.Module:
    """``module`` with ``n_in`` input and ``n_out`` output channels (random weights: latency does not depend
    on them)."""
    if (n_in, n_out) == (full_in, full_out):
        return module
    if isinstance(module, _ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups != 1 and not depthwise:
            raise StampError(f"{name}: a grouped convolution's channels are in a pruned group")
        return type(module)(n_in, n_out, module.kernel_size, module.stride, module.padding, module.dilation,
                            groups=n_in if depthwise else 1, bias=module.bias is not None,
                            padding_mode=module.padding_mode)
    if isinstance(module, nn.Linear):
        return nn.Linear(n_in, n_out, bias=module.bias is not None)
    if isinstance(module, _BatchNorm):
        return type(module)(n_out, affine=module.affine, track_running_stats=module.track_running_stats)
    if next(iter(module.parameters(recurse=False)), None) is None:
        return module  # parameter-free (activations, pooling, dropout): channel-agnostic
    raise StampError(f"{name}: cannot time a pruned {type(module).__name__} layer for a latency budget (convs, "
                     "linears, batch norms and parameter-free layers are supported); use budget_kind macs")


def _measure_calls(model: nn.Module, groups: ChannelGroups, input_size: Sequence[int], batch: int,
                   device: torch.device) -> list[dict]:
    traced = _trace_shapes(model, input_size)
    points = []  # (call index, i, j, n_in, n_out)
    entries = []
    for ci, ((name, module, in_shape, out_shape), call) in enumerate(zip(traced, groups.calls)):
        tied = call.inputs == call.outputs
        xs = _grid(call.inputs)
        ys = [1] if tied else _grid(call.outputs)
        entries.append({"name": name, "compute": isinstance(module, (_ConvNd, nn.Linear)),
                        "inputs": [list(p) for p in call.inputs],
                        "outputs": [list(p) for p in call.outputs], "tied": tied, "xs": xs, "ys": ys,
                        "ms": [[0.0] * len(ys) for _ in xs]})
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                points.append((ci, i, j, x, x if tied else y))
    memo: dict[str, float] = {}
    with torch.no_grad(), progress(len(points), desc="latency table", unit="layer") as bar:
        for ci, i, j, n_in, n_out in points:
            name, module, in_shape, out_shape = traced[ci]
            full_in, full_out = _total(groups.calls[ci].inputs), _total(groups.calls[ci].outputs)
            layer = _layer(module, name, n_in, n_out, full_in, full_out)
            shape = (batch, n_in, *in_shape[2:])
            key = f"{layer!r}|{type(layer).__name__}|{shape}"
            if key not in memo:
                layer = layer.to(device).eval()
                xs = itertools.cycle(_cold_inputs(shape, device))
                memo[key] = time_ms(lambda: layer(next(xs)), device, REPEATS, min_time=MIN_TIME_S, stat="min",
                                    clock=timing_clock(device))
            entries[ci]["ms"][i][j] = memo[key]
            bar.update(1)
    return entries


def _cold_inputs(shape: tuple, device: torch.device) -> list[torch.Tensor]:
    """Enough random inputs to cycle through that each call reads its input from memory, not from the cache, as
    a layer of the network does (timed on one hot input, BN and ReLU ran 2.5-3.5× faster than inside ResNet-20)."""
    count = 1 if device.type == "cuda" else max(2, min(16, math.ceil(COLD_BYTES / (4 * math.prod(shape)))))
    return [torch.randn(shape, device=device) for _ in range(count)]


def random_masks(groups: ChannelGroups, rng: np.random.Generator, low: float = 0.1,
                 on_grid: bool = True) -> list[torch.Tensor]:
    """Keep the first ``round(f_g · C_g)`` channels of every group, ``f_g ~ U[low, 1]``, rounded to the nearest
    grid point (``on_grid``; the counts a latency budget's hard masks keep) or to at least one channel."""
    masks = []
    for c in groups.sizes:
        n = rng.uniform(low, 1.0) * c
        step = grid_step(c) if on_grid else 1
        keep = torch.zeros(c, dtype=torch.bool)
        keep[:min(c, max(step, step * round(n / step)))] = True
        masks.append(keep)
    return masks


def networks_ms(nets: Sequence[nn.Module], input_size: Sequence[int], batch: int, rounds: int | None = None,
                desc: str = "latency") -> list[float]:
    """Each network's latency (ms, eval, no grad) as the table counts it: the fastest of ``REPEATS`` passes, in
    ``rounds`` interleaved rounds (the fastest round counts), so that a burst of other work on the machine hits
    every network alike instead of one."""
    best = [math.inf] * len(nets)
    rounds = ROUNDS if rounds is None else rounds
    with progress(rounds * len(nets), desc=desc, unit="network") as bar:
        for _ in range(rounds):
            for k, net in enumerate(nets):
                best[k] = min(best[k], latency_ms(net, tuple(input_size), batch, repeats=REPEATS, warmup=2,
                                                  stat="min", clock=timing_clock(next(net.parameters()).device)))
                bar.update(1)
    return best


def measure_table(model: nn.Module, groups: ChannelGroups, input_size: Sequence[int], batch: int,
                  env: dict) -> dict:
    """A latency table (module docstring) for ``model`` on its own device."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    table = {"format": FORMAT, "environment": env, "divisions": DIVISIONS, "calls": [],
             "calibration": {"scales": [1.0, 1.0], "offset": 0.0}}
    table["calls"] = _measure_calls(model, groups, input_size, batch, device)
    uncalibrated = LatencyModel(groups, table)
    rng = np.random.default_rng(CALIBRATION_SEED)
    masks = [[torch.ones(c, dtype=torch.bool) for c in groups.sizes]] + \
        [random_masks(groups, rng) for _ in range(CALIBRATION_MASKS)]
    raw = np.array([uncalibrated.raw(torch.tensor([float(k.sum()) for k in keep], dtype=torch.float64)).tolist()
                    for keep in masks])
    nets = [model if all(bool(k.all()) for k in keep) else prune_model(model, groups, keep) for keep in masks]
    measured = networks_ms(nets, input_size, batch, desc="latency calibration")
    scales, offset = calibrate(raw, np.array(measured))
    table["calibration"] = {"scales": scales, "offset": offset, "raw_ms": raw.tolist(), "measured_ms": measured}
    table["dense_ms"] = measured[0]
    table["seconds"] = time.perf_counter() - t0
    return table


def calibrate(raw: np.ndarray, measured: np.ndarray) -> tuple[list[float], float]:
    """``measured ≈ a · compute + b · memory + offset`` over networks' raw (compute, memory) sums, by least
    squares of the *relative* error (what a budget is judged by; plain least squares lets the dense network
    dominate): inside a network, memory-bound layers (BN, activations, pooling) slow down more against their
    isolated timing than convs do. Positive scales, else one scale for both (``measured ≈ s · total +
    offset``), else a plain ratio (noise swamped the spread of the calibration networks)."""
    def fit(x: np.ndarray) -> np.ndarray:
        a = np.column_stack([x, np.ones(len(x))]) / measured[:, None]
        return np.linalg.lstsq(a, np.ones(len(x)), rcond=None)[0]

    if len(raw) >= 4:
        a, b, c = fit(raw)
        if a > 0 and b > 0:
            return [float(a), float(b)], float(c)
    total = raw.sum(1)
    if len(set(total.tolist())) > 1:
        scale, offset = fit(total[:, None])
        if scale > 0:
            return [float(scale)] * 2, float(offset)
    return [float(measured.sum() / total.sum())] * 2, 0.0


# --- the model ----------------------------------------------------------------------------------------


def _axis(entries: list[dict], key: str, width: int) -> torch.Tensor:
    """Grid points per call, padded to ``width`` strictly increasing points (the padding is never reached:
    counts do not exceed the full size; the table repeats its edge values there)."""
    rows = [list(e[key]) + [e[key][-1] + k for k in range(1, width - len(e[key]) + 1)] for e in entries]
    return torch.tensor(rows, dtype=torch.float64)


def _bracket(grid: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the grid cell holding ``value`` (edge cells extend beyond the grid) and the weight of its upper
    point; ``grid`` [C, P], ``value`` [..., C]."""
    i = (grid[:, 1:-1] <= value.detach().unsqueeze(-1)).sum(-1)
    g = grid.expand(*value.shape, grid.shape[1])
    lo, hi = g.gather(-1, i.unsqueeze(-1)).squeeze(-1), g.gather(-1, (i + 1).unsqueeze(-1)).squeeze(-1)
    return i, (value - lo) / (hi - lo)


class LatencyModel:
    """Calibrated, interpolated latency (ms) of the network for per-group kept counts (module docstring)."""

    kind = "latency"
    unit = "latency"

    def __init__(self, groups: ChannelGroups, table: dict, path: Path | None = None):
        self.groups, self.table, self.path = groups, table, path
        entries = table["calls"]
        if [e["name"] for e in entries] != [c.name for c in groups.calls]:
            raise StampError(f"latency table {path}: its layer calls differ from the network's; delete it to "
                             "re-measure")
        one = len(groups)
        width = max(2, *(len(e["xs"]) for e in entries), *(len(e["ys"]) for e in entries))

        def coefficients(parts_of) -> torch.Tensor:
            a = torch.zeros(len(entries), one + 1, dtype=torch.float64)
            for r, e in enumerate(entries):
                for g, n in parts_of(e):
                    a[r, one if g is None else g] += n if g is None else 1
            return a

        self.a_in = coefficients(lambda e: e["inputs"])
        # tied calls vary along x only: their y is the constant 1 (their ys grid is [1])
        self.a_out = coefficients(lambda e: [(None, 1)] if e["tied"] else e["outputs"])
        self.xs, self.ys = _axis(entries, "xs", width), _axis(entries, "ys", width)
        ms = np.zeros((len(entries), width, width))
        for r, e in enumerate(entries):
            t = np.array(e["ms"], dtype=np.float64)
            t = np.pad(t, ((0, width - t.shape[0]), (0, width - t.shape[1])), mode="edge")
            ms[r] = t
        self.ms = torch.from_numpy(ms).reshape(len(entries), width * width)
        self.width = width
        self.steps = np.array([grid_step(c) for c in groups.sizes], dtype=np.int64)
        self.compute = torch.tensor([bool(e["compute"]) for e in entries])
        self.scales = torch.tensor(table["calibration"]["scales"], dtype=torch.float64)
        self.offset = float(table["calibration"]["offset"])
        self.dense = float(self(torch.tensor(groups.sizes, dtype=torch.float64)))

    def raw(self, counts: torch.Tensor) -> torch.Tensor:
        """Sums of the interpolated per-call times for counts ``[..., G]`` (float64), uncalibrated: ``[..., 2]``,
        the compute-bound calls (convs, linears) and the others."""
        device = counts.device
        ext = torch.cat([counts.to(torch.float64), counts.new_ones(*counts.shape[:-1], 1, dtype=torch.float64)], -1)
        n_in, n_out = ext @ self.a_in.to(device).T, ext @ self.a_out.to(device).T
        i, wx = _bracket(self.xs.to(device), n_in)
        j, wy = _bracket(self.ys.to(device), n_out)
        ms = self.ms.to(device).expand(*n_in.shape, self.ms.shape[1])

        def at(di: int, dj: int) -> torch.Tensor:
            return ms.gather(-1, ((i + di) * self.width + j + dj).unsqueeze(-1)).squeeze(-1)

        t = (at(0, 0) * (1 - wx) * (1 - wy) + at(1, 0) * wx * (1 - wy) + at(0, 1) * (1 - wx) * wy
             + at(1, 1) * wx * wy)
        compute = self.compute.to(device)
        return torch.stack([(t * compute).sum(-1), (t * ~compute).sum(-1)], -1)

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        """Predicted latency (ms) of one forward pass at the table's batch size; differentiable in ``counts``."""
        return self.raw(counts) @ self.scales.to(counts.device) + self.offset

    @torch.no_grad()
    def change(self, counts: np.ndarray, chunk: np.ndarray, sign: int) -> np.ndarray:
        base = torch.from_numpy(np.asarray(counts, dtype=np.float64))
        moved = base.unsqueeze(0) + sign * torch.diag(torch.from_numpy(np.asarray(chunk, dtype=np.float64)))
        return (sign * (self(moved) - self(base))).numpy()


def latency_model(model: nn.Module, groups: ChannelGroups, input_size: Sequence[int], batch: int,
                  directory: str | Path | None = None) -> LatencyModel:
    """The latency model of ``model`` on its device at ``batch``: read from ``directory``'s table when there is
    one (checked: module docstring), else measured (with progress) and, with ``directory``, saved there."""
    device = next(model.parameters()).device
    env = environment(model, groups, input_size, batch, device)
    path = table_path(directory, env) if directory is not None else None
    if path is not None and path.is_file():
        table = read_json(path, "latency table")
        check_table(table, env, path)
        return LatencyModel(groups, table, path)
    table = measure_table(model, groups, input_size, batch, env)
    if path is not None:
        write_json(path, table)
    return LatencyModel(groups, table, path)


def check_table(table, env: dict, path: Path) -> None:
    fix = f"delete {path} to re-measure"
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("environment"), dict):
        raise StampError(f"latency table {path} is not a {FORMAT} table; {fix}")
    stored = table["environment"]
    what = {"architecture": "another backbone architecture", "device": "another device", "device_type":
            "another device type", "torch": "another torch version", "threads": "another thread count",
            "batch": "another batch size", "input_size": "another input size", "clock": "another clock"}
    for key, label in what.items():
        if stored.get(key) != env[key]:
            raise StampError(f"latency table {path} was measured for {label} ({key} {stored.get(key)!r}; this run: "
                             f"{env[key]!r}): it is stale or belongs to another backbone or machine; {fix}")
    for key in ("calls", "calibration"):
        if key not in table:
            raise StampError(f"latency table {path} has no {key!r}; {fix}")
