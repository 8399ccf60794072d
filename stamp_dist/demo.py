"""`stamp demo`: the whole pipeline on the built-in data, one process, each stage cached.

data → pretrain (reference) → meta-train (generator) → for each held-out target: prune with the
``bench.methods`` (STAMP, random channels and none — dense — by default) at the same budget →
fine-tune on the same few images → table, three-line verdict and two plots beside ``summary.md``
(`stamp bench` writes the full report).
"""

from __future__ import annotations

import time
from pathlib import Path

from .atomic import atomic_file, write_json
from .bench import run_bench
from .bench.plots import plot_keep_ratios, plot_top1
from .bench.stats import aggregate
from .bench.tables import summarize
from .config import StampConfig, to_dict
from .data.demo import FASHION_INSTALL, make_demo_data
from .data.manifest import MANIFEST
from .errors import StampError
from .metatrain import meta_train
from .pretrain import pretrain
from .verdict import verdict

TOP1_PLOT, KEEP_PLOT = "top1_vs_cost.png", "keep_ratios.png"


def present_targets(targets: list[str]) -> list[str]:
    """The targets that exist; a target whose data were not written (Fashion-MNIST without Debian's
    package) is left out with a note, so the demo still runs."""
    present = [t for t in targets if (Path(t) / MANIFEST).is_file()]
    for t in sorted(set(targets) - set(present)):
        hint = f" (install it with `{FASHION_INSTALL}` and run the demo again)" if Path(t).name == "fashion_mnist" else ""
        print(f"note: target {t} is not there{hint}; the table leaves it out")
    if not present:
        raise StampError(f"none of the bench targets exist: {', '.join(targets)}")
    return present


def run_demo(cfg: StampConfig) -> str:
    t0 = time.perf_counter()
    stage = lambda name: print(f"\n=== {name} ({time.perf_counter() - t0:.0f} s elapsed) ===", flush=True)  # noqa: E731
    stage("data")
    make_demo_data(cfg.data.root, cfg.data)
    stage("pretrain")
    pretrain(cfg)
    stage("meta-train")
    meta_train(cfg)
    stage("prune + fine-tune on held-out targets")
    cfg.bench.targets = present_targets(cfg.bench.targets)
    run = run_bench(cfg)
    rows = aggregate(run.cells)
    table, lines = summarize(run.cells), verdict(rows)
    out = Path(cfg.bench.out)
    plot_top1(rows, list(dict.fromkeys((r["target"], r["train_per_class"]) for r in rows)), out / TOP1_PLOT)
    plots = [out / TOP1_PLOT, *([out / KEEP_PLOT] if plot_keep_ratios(rows, run.groups, out / KEEP_PLOT) else [])]
    with atomic_file(out / "summary.md") as tmp:
        tmp.write_text("\n".join([table, "", "Verdict:", "", *[f"- {line}" for line in lines], "",
                                  *[f"![{p.stem}]({p.name})" for p in plots]]) + "\n")
    write_json(out / "summary.json", {"config": to_dict(cfg), "results": [c.to_json() for c in run.cells], "groups": run.groups,
                                      "verdict": lines, "plots": [p.name for p in plots]})
    print("\n".join(["", table, "", "verdict:", *[f"  {line}" for line in lines], "", "plots:",
                     *[f"  {p}" for p in plots], "",
                     f"wall time {time.perf_counter() - t0:.0f} s; results in {out}/summary.md"]))
    return table
