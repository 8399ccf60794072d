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
from .data.demo import FASHION_INSTALL, make_demo_data
from .data.manifest import MANIFEST
from .errors import StampError
from .meta.trainer import meta_train
from .pretrain import pretrain
from .report import summarize


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
    results = run_bench(cfg).cells
    table = summarize(results)
    out = Path(cfg.bench.out)
    with atomic_file(out / "summary.md") as tmp:
        tmp.write_text(table + "\n")
    write_json(out / "summary.json", {"config": to_dict(cfg), "results": results})
    print(f"\n{table}\n\nwall time {time.perf_counter() - t0:.0f} s; results in {out}")
    return table
