"""The PNG plots of the benchmark report and the demo (matplotlib, Agg): top-1 vs MACs ratio per target (one panel per regime), time to the final
model per method (one panel per regime), and per-group keep ratios of STAMP vs the best baseline per
target (one panel per budget; only when STAMP cells exist). The demo draws the same kinds of plot
over all its targets in one figure each (``plot_top1``, ``plot_keep_ratios``: STAMP vs every method).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from .plan import regime_name
from .stats import NOT_PRUNING, STAMP, time_table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def plot_top1_vs_macs(rows: list[dict], target: str, path: Path) -> None:
    """Mean top-1 (± std) against the achieved MACs ratio for one target, one panel per regime."""
    plot_top1(rows, [(target, regime) for regime in dict.fromkeys(r["train_per_class"] for r in rows
                                                                  if r["target"] == target)], path)


def plot_top1(rows: list[dict], panels: list[tuple[str, int]], path: Path) -> None:
    """Mean top-1 (± std over seeds) against the achieved MACs ratio, one panel per (target, regime), at
    most three panels a line; the unpruned reference is a dashed line. Methods with the same per-group
    rule land on the same MACs ratio, so each method's points are shifted sideways by a few percent
    (its own offset) to keep them all visible."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in NOT_PRUNING]
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4.2 * nrows), squeeze=False)
    for ax, (target, regime) in zip(axes.flat, panels):
        at = [r for r in rows if r["target"] == target and r["train_per_class"] == regime]
        for r in at:
            if r["method"] in NOT_PRUNING:
                ax.axhline(100 * r["top1_mean"], color="gray", linestyle="--", linewidth=1,
                           label=f"{r['method']} (unpruned)")
        for i, method in enumerate(methods):
            pts = sorted((r for r in at if r["method"] == method), key=lambda r: r["macs_ratio"])
            if not pts:
                continue
            shift = 1 + 0.025 * (i - (len(methods) - 1) / 2)
            style = dict(marker="*", markersize=13, linewidth=2.5, color="black") if method == STAMP else \
                dict(marker="o", markersize=5, linewidth=1, color=colors[(2 * i) % 20 + (2 * i) // 20])
            ax.errorbar([shift * r["macs_ratio"] for r in pts], [100 * r["top1_mean"] for r in pts],
                        yerr=[100 * (r["top1_std"] or 0) for r in pts], label=method, capsize=3, **style)
        ax.set_xscale("log")
        ticks = sorted({round(r["budget"], 3) for r in at if r["method"] not in NOT_PRUNING})
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        lo, hi = min(ticks, default=1.0), max(ticks, default=1.0)
        ax.set_xlim(lo / 1.35, hi * 1.35)  # room for the sideways shifts when there is a single budget
        ax.set_xlabel("MACs ratio (of the dense network)")
        ax.set_ylabel("top-1 after fine-tuning (%)")
        seeds = sorted({s for r in at for s in r["seeds"]})
        ax.set_title(f"{target}, {regime_name(regime)}, {len(seeds)} seed{'s' * (len(seeds) > 1)}")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat[:len(panels)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95),
               title="mean ± std over seeds", title_fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_time(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    table = time_table(rows)
    regimes = list(dict.fromkeys(k[1] for k in table))
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4), squeeze=False, sharey=True)
    for ax, regime in zip(axes[0], regimes):
        items = [(m, v) for (m, r), v in table.items() if r == regime]
        names = [m for m, _ in items]
        prune = np.array([v[0] for _, v in items])
        ft = np.array([v[1] for _, v in items])
        ax.bar(names, prune, label="to pruned model", color="tab:orange")
        ax.bar(names, ft, bottom=prune, label="fine-tune", color="tab:blue")
        ax.set_title(regime_name(regime))
        ax.tick_params(axis="x", rotation=60)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("time to the final model (s, mean)")
    axes[0][0].legend(fontsize=8)
    _save(fig, path)


def plot_keep_ratio(rows: list[dict], groups: list[dict], target: str, path: Path) -> bool:
    """STAMP's per-group keep ratio (mean over regimes and seeds) next to the best other pruning method's
    at each budget of one target; returns False (nothing written) without STAMP rows."""
    budgets = sorted({r["budget"] for r in rows if r["target"] == target and r["method"] == STAMP}, reverse=True)
    return _keep_ratio_figure(rows, groups, [(target, b) for b in budgets], path, best_only=True)


def plot_keep_ratios(rows: list[dict], groups: list[dict], path: Path) -> bool:
    """STAMP's per-group keep ratio next to every other pruning method's, one panel per (target, budget)
    where STAMP ran; returns False (nothing written) without STAMP rows."""
    panels = list(dict.fromkeys((r["target"], r["budget"]) for r in rows if r["method"] == STAMP))
    return _keep_ratio_figure(rows, groups, panels, path, best_only=False)


def _keep_ratio_figure(rows: list[dict], groups: list[dict], panels: list[tuple[str, float]], path: Path,
                       best_only: bool) -> bool:
    """Grouped bars of kept / channels per group, STAMP first, then the other pruning methods of the panel
    (``best_only``: just the one with the best mean top-1); each method's mean over regimes and seeds."""
    if not panels:
        return False
    plt = _pyplot()
    sizes = np.array([g["channels"] for g in groups], dtype=float)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.6 * len(groups)), 4.2 * len(panels)), squeeze=False)
    for ax, (target, budget) in zip(axes[:, 0], panels):
        by_method: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r["target"] == target and r["budget"] == budget and r["method"] not in NOT_PRUNING:
                by_method[r["method"]].append(r)
        others = sorted((m for m in by_method if m != STAMP),
                        key=lambda m: -np.mean([r["top1_mean"] for r in by_method[m]]))
        methods = [STAMP, *others[:1]] if best_only else [STAMP, *others]
        width = 0.8 / len(methods)
        x = np.arange(len(groups))
        for i, method in enumerate(methods):
            ratio = np.mean([r["kept"] for r in by_method[method]], axis=0) / sizes
            label = f"{method} (top-1 {100 * np.mean([r['top1_mean'] for r in by_method[method]]):.1f} %)"
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, ratio, width=width, label=label,
                   color="black" if method == STAMP else None)
        ax.set_xticks(x, [g["name"] for g in groups], rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_xlabel("channel group")
        ax.set_ylabel("kept / channels")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{target}, budget {budget:g} of dense MACs (mean over regimes and seeds)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1))
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path)
    return True

