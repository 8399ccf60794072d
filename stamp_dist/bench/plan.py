"""The cells of a bench config, the key each result depends on, and the cache of finished cells on disk:
one JSON file per cell under ``bench.out/<target>/tpc<N>/`` holding its key (the format older runs wrote)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import write_json
from ..config import StampConfig, bench_regimes
from ..methods import METHODS, Source
from ..pruning.hardmask import check_budget
from .record import CellRecord


@dataclass(frozen=True)
class Cell:
    target: str  # target dataset directory
    train_per_class: int  # the data regime (0 = whole train split)
    epochs: int  # fine-tune epochs of this regime
    seed: int
    method: str
    budget: float  # a fraction of the dense network's MACs (or latency); 1.0 for dense
    budget_kind: str = "macs"  # prune.budget_kind ("macs" for dense: its cells serve both kinds)

    @property
    def target_name(self) -> str:
        return Path(self.target).name

    def path(self, out: str | Path) -> Path:
        kind = "" if self.budget_kind == "macs" else f"_{self.budget_kind}"
        name = f"{self.method}_b{self.budget:g}{kind}_s{self.seed}.json"
        return Path(out) / self.target_name / f"tpc{self.train_per_class}" / name

    def label(self) -> str:
        kind = "" if self.budget_kind == "macs" else f" {self.budget_kind}"
        return (f"{self.method} | {self.target_name} | b={self.budget:g}{kind} | {regime_name(self.train_per_class)} "
                f"| seed {self.seed}")


def regime_name(train_per_class: int) -> str:
    return "full data" if train_per_class == 0 else f"{train_per_class}/class"


def plan_cells(cfg: StampConfig) -> list[Cell]:
    """Every cell of the config, ordered target → regime → seed → method → budget."""
    b = cfg.bench
    regimes = bench_regimes(b)
    epochs = list(b.epochs) if b.epochs is not None else [cfg.finetune.epochs] * len(regimes)
    counts = list(b.seed_counts) if b.seed_counts is not None else [len(b.seeds)] * len(regimes)
    cells = []
    for target in b.targets:
        for per_class, e, n in zip(regimes, epochs, counts):
            for seed in b.seeds[:n]:
                for method in b.methods:
                    prunes = METHODS[method].prunes
                    kind = cfg.prune.budget_kind if prunes else "macs"
                    for budget in b.budgets if prunes else [1.0]:
                        check_budget(budget)
                        cells.append(Cell(target, per_class, e, seed, method, float(budget), kind))
    return cells



def cell_key(cell: Cell, cfg: StampConfig, source: Source) -> dict:
    """Everything the cell's result depends on (see the package docstring)."""
    f, b = cfg.finetune, cfg.bench
    cell_fields = asdict(cell)
    if cell.budget_kind == "macs":  # the keys of MACs cells stay those written before budgets had kinds
        del cell_fields["budget_kind"]
    else:
        cell_fields["latency_batch"] = cfg.prune.latency_batch
    key = {**cell_fields, "backbone": source.fingerprint, "eval_per_class": b.eval_per_class,
           "pruning_batch_per_class": cfg.prune.samples_per_class,
           "finetune": {k: getattr(f, k) for k in ("batch_size", "lr", "backbone_lr", "momentum", "weight_decay",
                                                   "augment", "flip")}}
    return key | METHODS[cell.method].cache_key(cfg, source)


def stored(cell: Cell, out: Path) -> dict | None:
    """The JSON stored for ``cell`` under ``out``, or None: a plain dict, so that a file of another run or
    format is compared by its key (and re-run) rather than refused."""
    path = cell.path(out)
    return json.loads(path.read_text()) if path.is_file() else None


def store(cell: Cell, out: Path, record: CellRecord) -> None:
    write_json(cell.path(out), record.to_json())
