"""Running the cells of `stamp bench` (cached ones are read, not re-run): ``run_bench``."""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..choices import Method
from ..config import StampConfig, to_dict
from ..devices import pick_device
from ..downstream import Target
from ..errors import StampError
from ..finetune import finetune_model
from ..measure import count_macs_params, latency_report
from ..meta.artifact import load_generator
from ..methods import METHODS, Finetuned, Job, Source
from ..training import Schedule
from .plan import Cell, cell_key, plan_cells, store, stored
from .record import CellRecord
from .samples import TargetData, pruning_batch, split_sample


# --- the shared context ------------------------------------------------------------------------------


class Bench:
    """What every cell shares: the reference backbone with its channel groups and MACs model and the
    generator (loaded only when a method uses it: ``source``), the targets' data, and two memos: the dense
    fine-tune of the current (target, regime, seed) — ``dense`` and ``train_prune``'s first stage are
    the same run — and latency per architecture."""

    def __init__(self, cfg: StampConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.source = Source.load(cfg.pretrain.out, device, cfg.runtime.micro_batch)
        if any(METHODS[m].uses_generator for m in cfg.bench.methods):
            generator = load_generator(cfg.meta.out, device, cfg.runtime.micro_batch)
            if generator.info["backbone"]["fingerprint"] != self.source.fingerprint:
                raise StampError(f"the generator in {cfg.meta.out} was meta-trained on another backbone than "
                                 f"{cfg.pretrain.out}; compare methods from one backbone (re-run `stamp meta-train`)")
            self.source.generator = generator
        self.dense_macs, self.dense_params = count_macs_params(self.source.net.backbone, self.source.net.input_size)
        self._data: dict[str, TargetData] = {}
        self._dense: dict[tuple, Finetuned] = {}
        self._latency: dict[tuple, dict] = {}

    def data(self, target: str) -> TargetData:
        if target not in self._data:
            self._data[target] = TargetData.load(target)
        return self._data[target]

    def key(self, cell: Cell) -> dict:
        return cell_key(cell, self.cfg, self.source)

    def job(self, cell: Cell, sample: Target, batch: Target, evaluation: tuple) -> Job:
        return Job(sample, batch, cell.budget, cell.seed, self.cfg,
                   lambda epochs: self.dense_finetune(cell, sample, batch, evaluation, epochs))

    def finetune(self, model: torch.nn.Module, cell: Cell, sample: Target, evaluation: tuple) -> dict:
        return finetune_model(model, (sample.x, sample.y), evaluation, self.source.net.norm,
                              Schedule.finetuning(self.cfg.finetune, cell.seed, cell.epochs), self.device)

    def dense_finetune(self, cell: Cell, sample: Target, batch: Target, evaluation: tuple,
                       epochs: int | None = None) -> Finetuned:
        """The dense network with a prototype head, fine-tuned on the sample for ``epochs`` (None: the regime's)
        (a copy). Run once per (target, regime, seed, epochs); only the latest (target, regime, seed) is kept, as
        cells come ordered by those."""
        run = cell if epochs is None else replace(cell, epochs=epochs)
        same = (cell.target, cell.train_per_class, cell.seed)
        key = (*same, run.epochs)
        if key not in self._dense:
            dense = METHODS[Method.DENSE].prune(self.source, self.job(cell, sample, batch, evaluation))
            self._dense = {k: v for k, v in self._dense.items() if k[:3] == same} | {
                key: Finetuned(dense, self.finetune(dense.model, run, sample, evaluation))}
        return copy.deepcopy(self._dense[key])

    def latency(self, model: torch.nn.Module, kept: list[int]) -> dict:
        """Latency depends only on the architecture (kept channels per group, head size): measured once."""
        arch = (*kept, model.fc.out_features)
        if arch not in self._latency:
            self._latency[arch] = latency_report(model, self.source.net.input_size)
        return self._latency[arch]


# --- one cell ----------------------------------------------------------------------------------------


def kept_channels(model: torch.nn.Module, bench: Bench) -> list[int]:
    """Channels left per group, read from each group's first out-member of the (pruned) model."""
    return [_out_channels(model.get_submodule(g.name)) for g in bench.source.net.groups]


def _out_channels(module: torch.nn.Module) -> int:
    for attr in ("out_channels", "out_features", "num_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise StampError(f"cannot read the channel count of a {type(module).__name__}")


def run_cell(bench: Bench, cell: Cell) -> CellRecord:
    sample, evaluation = split_sample(bench.data(cell.target), cell.train_per_class, cell.seed,
                                      bench.cfg.bench.eval_per_class)
    batch = pruning_batch(sample, bench.cfg.prune.samples_per_class, cell.seed, bench.device)
    torch.manual_seed(cell.seed)
    method = METHODS[cell.method]
    if method.prunes:
        pruned = method.prune(bench.source, bench.job(cell, sample, batch, evaluation))
        result = bench.finetune(pruned.model, cell, sample, evaluation)
    else:  # the dense reference is the fine-tune train_prune starts from: run once
        dense = bench.dense_finetune(cell, sample, batch, evaluation)
        pruned, result = dense.pruned, dense.result
    model, stages = pruned.model, {**pruned.seconds, "finetune": result["seconds"]}
    macs, params = count_macs_params(model, bench.source.net.input_size)
    kept = kept_channels(model, bench)
    to_model = sum(v for k, v in stages.items() if k != "finetune")
    return CellRecord(
        target=cell.target_name, train_per_class=cell.train_per_class, epochs=cell.epochs,
        method=cell.method, budget=cell.budget, seed=cell.seed,
        top1=result["top1"], top1_before_finetune=result["top1_before"],
        params=params, macs=macs, macs_ratio=macs / bench.dense_macs,
        params_ratio=params / bench.dense_params, kept=kept,
        latency_ms=bench.latency(model, kept),
        seconds=stages, seconds_to_prune=to_model, seconds_to_finetune=result["seconds"],
        seconds_total=to_model + result["seconds"],
        train_images=len(sample.y), eval_images=len(evaluation[1]),
        key=bench.key(cell),
    )


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class BenchRun:
    """The cells of one `stamp bench` run (cached ones included) and what the report needs besides."""

    cells: list[CellRecord]
    groups: list[dict]  # [{"name", "channels"}] of the backbone's channel groups
    machine: dict
    meta_training_seconds: float | None  # the one-off STAMP cost, when the meta run recorded it
    config: dict
    generator: dict | None = None  # what STAMP ran with (generator_record), when it was compared


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def meta_training_seconds(meta_out: str | Path) -> float | None:
    """Wall time of the meta-training run, from its ``metrics.jsonl`` (a cumulative ``elapsed_s`` or
    per-step ``seconds``); None when the run did not record it."""
    log = Path(meta_out) / "metrics.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if rows and "elapsed_s" in rows[-1]:
        return float(rows[-1]["elapsed_s"])
    if rows and all("seconds" in r for r in rows):
        return float(sum(r["seconds"] for r in rows))
    return None


def generator_record(bench: Bench) -> dict | None:
    """The generator STAMP's cells used, as it was meta-trained (its own meta config, not ``cfg.meta``'s,
    which only names where it lives), and the downstream settings applied to it."""
    gen, p = bench.source.generator, bench.cfg.prune
    if gen is None:
        return None
    return {"path": str(gen.path), "id": bench.source.generator_id, "step": gen.info.get("step"),
            "meta": gen.info["meta"], "allocation": gen.stamp.allocation_for(p.allocation), "selection": p.selection,
            "adapt_steps": p.adapt_steps, "adapt_lr": p.adapt_lr}


def _work(cell: Cell, data: TargetData) -> float:
    """Relative cost of a cell for the ETA: its fine-tuning images (per fine-tune: train_prune runs two) plus
    a fixed share for scoring and measuring."""
    counts = data.manifest.split("train").counts
    n = sum(counts) if cell.train_per_class == 0 else sum(min(c, cell.train_per_class) for c in counts)
    return cell.epochs * n * METHODS[cell.method].fine_tunes + 1000


def run_bench(cfg: StampConfig, device: str | torch.device | None = None) -> BenchRun:
    """Run (or read from the cache) every cell of ``cfg.bench``; see the package docstring."""
    if cfg.bench.num_threads:
        torch.set_num_threads(cfg.bench.num_threads)
    device = pick_device(cfg.runtime.device) if device is None else torch.device(device)
    cells = plan_cells(cfg)
    bench = Bench(cfg, device)
    out = Path(cfg.bench.out)
    results: list[CellRecord | None] = [None] * len(cells)
    todo, stale = [], 0
    for i, cell in enumerate(cells):
        cached = stored(cell, out)
        if cached is not None and cached.get("key") == bench.key(cell):
            results[i] = CellRecord.from_json(cached)
            continue
        stale += cached is not None
        todo.append(i)
    print(f"bench: {len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to run "
          f"({stale} of them cached with other settings) → {out}", flush=True)
    work = {i: _work(cells[i], bench.data(cells[i].target)) for i in todo}
    remaining, done_work, t0 = sum(work.values()), 0.0, time.perf_counter()
    for n, i in enumerate(todo, 1):
        cell = cells[i]
        t = time.perf_counter()
        result = run_cell(bench, cell)
        store(cell, out, result)
        results[i] = result
        done_work += work[i]
        remaining -= work[i]
        eta = (time.perf_counter() - t0) / done_work * remaining
        print(f"[{n}/{len(todo)}] {cell.label()}: top-1 {result.top1:.3f}, MACs {result.macs_ratio:.3f}, "
              f"{time.perf_counter() - t:.1f} s (ETA {_duration(eta)})", flush=True)
    groups = [{"name": g.name, "channels": g.channels} for g in bench.source.net.groups]
    return BenchRun(results, groups, machine_info(device), meta_training_seconds(cfg.meta.out), to_dict(cfg),
                    generator_record(bench))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
