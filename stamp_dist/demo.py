"""`stamp demo`: the whole pipeline on the built-in data, one process, each stage cached.

data → pretrain (reference) → meta-train (generator) → for each held-out target: prune with the
``bench.methods`` (STAMP, random channels and none — dense — by default) at the same budget →
fine-tune on the same few images → table (`stamp bench` writes the full report with plots).
"""

from __future__ import annotations

import time
from pathlib import Path

from .atomic import atomic_file, write_json
from .bench import run_bench
from .config import StampConfig, to_dict
from .data.demo import make_demo_data
from .meta.trainer import meta_train
from .pretrain import pretrain
from .report import summarize


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
    results = run_bench(cfg).cells
    table = summarize(results)
    out = Path(cfg.bench.out)
    with atomic_file(out / "summary.md") as tmp:
        tmp.write_text(table + "\n")
    write_json(out / "summary.json", {"config": to_dict(cfg), "results": results})
    print(f"\n{table}\n\nwall time {time.perf_counter() - t0:.0f} s; results in {out}")
    return table
