"""The benchmark report: `stamp bench` cells → ``report.md``, ``report.json`` and PNG plots."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_file, write_json
from .plots import plot_keep_ratio, plot_time, plot_top1_vs_macs
from .run import BenchRun
from .stats import aggregate, discrimination, stamp_paired, stamp_vs_best, time_ratios
from .tables import markdown


def write_report(run: BenchRun, out: str | Path, command: str | None = None) -> dict:
    """Write ``report.md``, ``report.json`` and ``plots/*.png`` under ``out``; returns the JSON content."""
    out = Path(out)
    rows = aggregate(run.cells)
    summary = {"stamp_vs_best": stamp_vs_best(rows), "stamp_paired": stamp_paired(run.cells, rows),
               "discrimination": discrimination(rows),
               "time_ratios": time_ratios(run.cells)}
    plots: dict[str, list[str]] = {"top1_vs_macs": [], "time": [], "keep_ratio": []}
    for target in dict.fromkeys(r["target"] for r in rows):
        name = f"plots/top1_vs_macs_{target}.png"
        plot_top1_vs_macs(rows, target, out / name)
        plots["top1_vs_macs"].append(name)
        name = f"plots/keep_ratio_{target}.png"
        if plot_keep_ratio(rows, run.groups, target, out / name):
            plots["keep_ratio"].append(name)
    plot_time(rows, out / "plots/time_to_model.png")
    plots["time"].append("plots/time_to_model.png")
    report = {"command": command, "machine": run.machine, "meta_training_seconds": run.meta_training_seconds,
              "generator": run.generator, "groups": run.groups, "rows": rows, **summary, "plots": plots,
              "cells": [c.to_json() for c in run.cells], "config": run.config}
    write_json(out / "report.json", report)
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(markdown(run, rows, summary, plots, command) + "\n")
    return report
