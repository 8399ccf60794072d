"""How the comparison of pruning methods depends on the length of the fine-tune: reads the cells of
`stamp bench` runs that differ only in ``bench.epochs`` and prints, per (target, regime, budget, epochs),
the mean top-1 of dense / random channels / STAMP, STAMP − random and dense − random ("room") paired by seed
over the seeds all three ran; writes a PNG of top-1 against epochs.

    # one bench run per epoch count (cells cached; see docs/BENCHMARKS.md, "Thirty epochs were too few")
    stamp bench -c configs/bench.yaml 'bench.methods=[dense,random,stamp]' 'bench.epochs=[60]' \\
        'bench.train_per_class=[10]' bench.out=runs/bench-e60 ...
    python benchmarks/finetune_epochs.py runs/bench-e30 runs/bench-e60 runs/bench-e120 --plot epochs.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from stamp_dist.bench.plots import _pyplot, _save
from stamp_dist.bench.record import CellRecord
from stamp_dist.bench.stats import DENSE, RANDOM, STAMP, paired_delta, room
from stamp_dist.errors import EXIT_USER_ERROR, StampError


def read_cells(dirs: list[Path]) -> list[CellRecord]:
    """Every cell under ``dirs``; a cell found in two directories (same target, regime, epochs, method, budget
    and seed) counts once, the first."""
    cells: dict[tuple, CellRecord] = {}
    for d in dirs:
        if not d.is_dir():
            raise StampError(f"{d} is not a directory; give the bench.out directories of `stamp bench` runs")
        for path in sorted(d.glob("*/tpc*/*.json")):
            c = CellRecord.from_json(json.loads(path.read_text()))
            cells.setdefault((c.target, c.train_per_class, c.epochs, c.method, c.budget, c.seed), c)
    if not cells:
        raise StampError(f"no bench cells under {', '.join(map(str, dirs))} (expected <out>/<target>/tpc<N>/*.json)")
    return list(cells.values())


def rows(cells: list[CellRecord]) -> list[dict]:
    """One row per (target, regime, budget, epochs) where dense, random and STAMP share at least two seeds."""
    by_epochs: dict[int, list[CellRecord]] = defaultdict(list)
    for c in cells:
        by_epochs[c.epochs].append(c)
    out = []
    for epochs, group in sorted(by_epochs.items()):
        dense = {(c.target, c.train_per_class, c.seed): c.top1 for c in group if c.method == DENSE}
        settings = sorted({(c.target, c.train_per_class, c.budget) for c in group if c.method == RANDOM})
        for target, regime, budget in settings:
            mine = [c for c in group if (c.target, c.train_per_class) == (target, regime)
                    and (c.method == DENSE or c.budget == budget)
                    and (target, regime, c.seed) in dense]
            seeds = {c.seed for c in mine if c.method == RANDOM} & {c.seed for c in mine if c.method == STAMP}
            shared = [c for c in mine if c.seed in seeds]
            if len(seeds) < 2:
                continue
            mean = {m: 100 * float(np.mean([c.top1 for c in shared if c.method == m])) for m in (DENSE, RANDOM, STAMP)}
            setting = (target, regime, budget)
            out.append({"target": target, "train_per_class": regime, "budget": budget, "epochs": epochs,
                        "seeds": sorted(seeds), "mean": mean,
                        "stamp_vs_random": paired_delta(shared, STAMP, RANDOM, setting), "room": room(shared, setting)})
    return out


def _delta(d: dict) -> str:
    return f"{100 * d['delta']:+.1f} ± {100 * d['se']:.1f}{' *' if d['beyond_noise'] else ''}"


def table(rs: list[dict]) -> str:
    lines = ["| target | per class | budget | epochs | n | dense | random | STAMP | STAMP − random | dense − random |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rs, key=lambda r: (r["target"], r["train_per_class"], -r["budget"], r["epochs"])):
        m = r["mean"]
        lines.append(f"| {r['target']} | {r['train_per_class']} | {r['budget']:g} | {r['epochs']} | {len(r['seeds'])} "
                     f"| {m[DENSE]:.1f} | {m[RANDOM]:.1f} | {m[STAMP]:.1f} | {_delta(r['stamp_vs_random'])} "
                     f"| {_delta(r['room'])} |")
    return "\n".join(lines)


def plot(rs: list[dict], path: Path) -> None:
    """Top-1 against fine-tune epochs: a row of panels per target, a column per (regime, budget)."""
    plt = _pyplot()
    targets = sorted({r["target"] for r in rs})
    columns = sorted({(r["train_per_class"], r["budget"]) for r in rs}, key=lambda c: (c[0], -c[1]))
    fig, axes = plt.subplots(len(targets), len(columns), figsize=(3.4 * len(columns), 2.9 * len(targets)),
                             squeeze=False)
    for i, target in enumerate(targets):
        for j, (regime, budget) in enumerate(columns):
            ax = axes[i][j]
            mine = sorted((r for r in rs if (r["target"], r["train_per_class"], r["budget"]) == (target, regime, budget)),
                          key=lambda r: r["epochs"])
            if not mine:
                ax.axis("off")
                continue
            epochs = [r["epochs"] for r in mine]
            for method, style in ((DENSE, "k--"), (RANDOM, "C0o-"), (STAMP, "C3s-")):
                ax.plot(epochs, [r["mean"][method] for r in mine], style, label=method.value, markersize=4)
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(epochs, [str(e) for e in epochs])
            ax.set_title(f"{target}, {regime}/class, budget {budget:g}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(targets) - 1:
                ax.set_xlabel("fine-tune epochs")
            if j == 0:
                ax.set_ylabel("top-1 % (mean over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="bench.out directories of `stamp bench` runs")
    p.add_argument("--plot", type=Path, help="write a PNG of top-1 against epochs here")
    args = p.parse_args()
    rs = rows(read_cells(args.dirs))
    print(table(rs))
    if args.plot:
        plot(rs, args.plot)
        print(f"plot → {args.plot}")


if __name__ == "__main__":
    try:
        main()
    except StampError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
