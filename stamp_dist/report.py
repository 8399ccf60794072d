"""The benchmark report: `stamp bench` cells → ``report.md``, ``report.json`` and PNG plots.

Aggregation: the cells of one (target, regime, method, budget) form a *row*; top-1 is reported as
mean ± sample standard deviation over the seeds (ddof = 1; no spread with one seed), every other
number as the mean over the seeds. "Within noise": two rows differ beyond noise when their mean top-1
differ by more than twice the standard error of the difference, ``2·√(s₁²/n₁ + s₂²/n₂)``; a row with
one seed has no standard error, so no noise judgement is made for it.

Plots (matplotlib, Agg): top-1 vs MACs ratio per target (one panel per regime), time to the final
model per method (one panel per regime), and per-group keep ratios of STAMP vs the best baseline per
target (one panel per budget; only when STAMP cells exist). The demo draws the same kinds of plot
over all its targets in one figure each (``plot_top1``, ``plot_keep_ratios``: STAMP vs every method).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .atomic import atomic_file, write_json
from .bench import BenchRun, regime_name
from .choices import Method
from .methods import METHODS, Family

ROW_KEY = ("target", "train_per_class", "method", "budget")


def _family(family: Family) -> tuple[Method, ...]:
    return tuple(name for name, m in METHODS.items() if m.family is family)


NOT_PRUNING = _family(Family.REFERENCE)
ONE_SHOT = _family(Family.SCORE)  # the informed one-shot baselines STAMP is paired against
TRAINED = _family(Family.TRAINED)  # the methods STAMP's total time is compared with
STAMP, RANDOM = Method.STAMP, Method.RANDOM  # the report's subject and the floor it is paired against
MEANS = ("top1_before_finetune", "macs_ratio", "params", "macs", "seconds_to_prune", "seconds_to_finetune",
         "seconds_total", "train_images", "eval_images")  # cell fields a row reports as the mean over seeds


# --- rows ----------------------------------------------------------------------------------------------


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per (target, regime, method, budget), ordered target → regime → budget (dense first) →
    method, each in the order the cells first name them."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[tuple(c[k] for k in ROW_KEY)].append(c)
    order = {k: _first_seen(c[k] for c in cells) for k in ("target", "train_per_class", "method")}
    rows = []
    for key, cs in groups.items():
        acc = np.array([c["top1"] for c in cs])
        rows.append({
            **dict(zip(ROW_KEY, key)), "epochs": cs[0]["epochs"], "seeds": [c["seed"] for c in cs],
            "top1_mean": float(acc.mean()), "top1_std": float(acc.std(ddof=1)) if len(cs) > 1 else None,
            **{k: float(np.mean([c[k] for c in cs])) for k in MEANS},
            "latency_ms": {k: float(np.mean([c["latency_ms"][k] for c in cs])) for k in cs[0]["latency_ms"]},
            "kept": np.mean([c["kept"] for c in cs], axis=0).tolist(),
        })
    rows.sort(key=lambda r: (order["target"][r["target"]], order["train_per_class"][r["train_per_class"]],
                             -r["budget"], order["method"][r["method"]]))
    return rows


def _first_seen(values) -> dict:
    out: dict = {}
    for v in values:
        out.setdefault(v, len(out))
    return out


def _se(row: dict) -> float | None:
    return None if row["top1_std"] is None else row["top1_std"] / math.sqrt(len(row["seeds"]))


def beyond_noise(a: dict, b: dict) -> bool | None:
    """Whether rows ``a`` and ``b`` differ in mean top-1 beyond noise (None: a row has one seed)."""
    sa, sb = _se(a), _se(b)
    if sa is None or sb is None:
        return None
    return abs(a["top1_mean"] - b["top1_mean"]) > 2 * math.sqrt(sa**2 + sb**2)


def pruning_settings(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows of the pruning methods per (target, regime, budget)."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] not in NOT_PRUNING:
            out[(r["target"], r["train_per_class"], r["budget"])].append(r)
    return out


def stamp_vs_best(rows: list[dict]) -> list[dict]:
    """Per (target, regime, budget): STAMP's top-1 against the best other pruning method."""
    out = []
    for (target, regime, budget), rs in pruning_settings(rows).items():
        stamp = next((r for r in rs if r["method"] == STAMP), None)
        others = [r for r in rs if r["method"] != STAMP]
        if stamp is None or not others:
            continue
        best = max(others, key=lambda r: r["top1_mean"])
        rank = 1 + sum(r["top1_mean"] > stamp["top1_mean"] for r in others)
        out.append({"target": target, "train_per_class": regime, "budget": budget,
                    "stamp_top1": stamp["top1_mean"], "best_baseline": best["method"],
                    "best_baseline_top1": best["top1_mean"], "delta": stamp["top1_mean"] - best["top1_mean"],
                    "beyond_noise": beyond_noise(stamp, best), "stamp_rank": rank, "methods": len(rs)})
    return out


def paired_delta(cells: list[dict], method: str, other: str, setting: tuple) -> dict | None:
    """``method`` − ``other`` top-1 in one (target, regime, budget) setting, paired by seed: the two cells of a
    seed share the sample, the fine-tuning order and the evaluation images, so the seed-to-seed spread
    cancels. Mean, its standard error over seeds, and beyond noise (|mean| > 2 SE; None with one seed)."""
    top1 = {(c["method"], c["seed"]): c["top1"] for c in cells
            if (c["target"], c["train_per_class"], c["budget"]) == setting}
    seeds = sorted({s for m, s in top1 if m == method} & {s for m, s in top1 if m == other})
    if not seeds:
        return None
    d = np.array([top1[(method, s)] - top1[(other, s)] for s in seeds])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    return {"other": other, "delta": float(d.mean()), "se": se, "seeds": seeds,
            "beyond_noise": None if se is None else bool(abs(d.mean()) > 2 * se)}


def stamp_paired(cells: list[dict], rows: list[dict]) -> list[dict]:
    """Per setting with STAMP: STAMP − random channels and STAMP − the one-shot baseline with the best mean
    in that setting (picked after the fact, which favours the baseline), both paired by seed."""
    out = []
    for setting, rs in pruning_settings(rows).items():
        methods = {r["method"]: r for r in rs}
        if STAMP not in methods:
            continue
        one_shot = [r for r in rs if r["method"] in ONE_SHOT]
        best = max(one_shot, key=lambda r: r["top1_mean"])["method"] if one_shot else None
        out.append({"target": setting[0], "train_per_class": setting[1], "budget": setting[2],
                    "stamp_top1": methods[STAMP]["top1_mean"],
                    "vs_random": paired_delta(cells, STAMP, RANDOM, setting) if RANDOM in methods else None,
                    "vs_best_one_shot": paired_delta(cells, STAMP, best, setting) if best else None})
    return out


def discrimination(rows: list[dict]) -> dict[str, dict]:
    """Per target: in how many (regime, budget) settings the best and worst pruning method differ
    beyond noise, and which methods are within noise of the best in each setting."""
    out: dict[str, dict] = {}
    for (target, regime, budget), rs in pruning_settings(rows).items():
        t = out.setdefault(target, {"settings": 0, "judged": 0, "separated": 0, "detail": []})
        t["settings"] += 1
        best, worst = max(rs, key=lambda r: r["top1_mean"]), min(rs, key=lambda r: r["top1_mean"])
        separated = beyond_noise(best, worst) if len(rs) > 1 else None
        if separated is not None:
            t["judged"] += 1
            t["separated"] += bool(separated)
        tied = [r["method"] for r in rs if r is best or beyond_noise(r, best) is False]
        t["detail"].append({"train_per_class": regime, "budget": budget, "best": best["method"],
                            "spread": best["top1_mean"] - worst["top1_mean"], "separated": separated,
                            "within_noise_of_best": tied if separated is not None else None})
    for t in out.values():
        t["discriminates"] = t["separated"] > 0 if t["judged"] else None
    return out


def time_ratios(cells: list[dict]) -> dict[str, dict]:
    """Total time to the final model of STAMP over that of each method that trains on the target (train_prune,
    learn_gates): the ratio of the mean totals over the (target, regime, budget, seed) cells both methods ran;
    overall and per regime."""
    by = {(c["method"], c["target"], c["train_per_class"], c["budget"], c["seed"]): c["seconds_total"] for c in cells}
    out = {}
    for other in TRAINED:
        pairs = defaultdict(list)
        for (m, target, regime, budget, seed), t in by.items():
            if m == STAMP and (other, target, regime, budget, seed) in by:
                pairs[regime].append((t, by[(other, target, regime, budget, seed)]))
        if pairs:
            ratio = lambda ps: float(np.mean([a for a, _ in ps]) / np.mean([b for _, b in ps]))  # noqa: E731
            out[other] = {"overall": ratio([p for ps in pairs.values() for p in ps]),
                          "per_regime": {regime_name(k): ratio(ps) for k, ps in pairs.items()}}
    return out


# --- markdown --------------------------------------------------------------------------------------------


def _top1(r: dict) -> str:
    spread = "" if r["top1_std"] is None else f" ± {100 * r['top1_std']:.1f}"
    return f"{100 * r['top1_mean']:.1f}{spread}"


def _latency(r: dict) -> str:
    lat = r["latency_ms"]
    cpu = f"{lat['cpu_b1']:.2f} / {lat['cpu_b64']:.1f}"
    return cpu + (f" (GPU {lat['cuda_b1']:.2f} / {lat['cuda_b64']:.2f})" if "cuda_b1" in lat else "")


def summarize(cells: list[dict]) -> str:
    """One markdown table of every row (the demo's summary)."""
    lines = ["| target | method | regime | budget | top-1 % (mean ± std) | seeds | params | MACs ratio "
             "| latency b1 / b64 (ms) | time to pruned model (s) | fine-tune (s) | total (s) |",
             "|" + "---|" * 12]
    for r in aggregate(cells):
        lines.append(f"| {r['target']} | {r['method']} | {regime_name(r['train_per_class'])} | {r['budget']:g} "
                     f"| {_top1(r)} | {len(r['seeds'])} | {r['params'] / 1e3:.0f}k | {r['macs_ratio']:.3f} "
                     f"| {_latency(r)} | {r['seconds_to_prune']:.2f} | {r['seconds_to_finetune']:.1f} "
                     f"| {r['seconds_total']:.1f} |")
    return "\n".join(lines)


def overview_table(rows: list[dict], before_finetune: bool = False) -> str:
    """Top-1 % (mean ± std) with one column per method and one line per (target, regime, budget); the
    dense reference (no budget) is repeated on every budget line of its regime. ``before_finetune``:
    the mean top-1 of the pruned model with its prototype head, before any fine-tuning, instead."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| target | regime | budget | " + " | ".join(methods) + " |", "|" + "---|" * (3 + len(methods))]
    at = {(r["target"], r["train_per_class"], r["method"], r["budget"]): r for r in rows}
    settings = dict.fromkeys((r["target"], r["train_per_class"], r["budget"]) for r in rows
                             if r["method"] not in NOT_PRUNING)
    for target, regime, budget in settings:
        cells = [at.get((target, regime, m, 1.0 if m in NOT_PRUNING else budget)) for m in methods]
        value = (lambda r: r["top1_before_finetune"]) if before_finetune else (lambda r: r["top1_mean"])
        text = (lambda r: f"{100 * r['top1_before_finetune']:.1f}") if before_finetune else _top1
        best = max((value(r) for r in cells if r is not None and r["method"] not in NOT_PRUNING), default=None)
        shown = ["–" if r is None else (f"**{text(r)}**" if value(r) == best and r["method"] not in NOT_PRUNING
                                        else text(r)) for r in cells]
        lines.append(f"| {target} | {regime_name(regime)} | {budget:g} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _regime_table(rows: list[dict]) -> list[str]:
    lines = ["| method | budget | top-1 % | top-1 % before fine-tune | MACs ratio | params "
             "| latency b1 / b64 (ms) | to pruned model (s) | fine-tune (s) | total (s) |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']:g} | {_top1(r)} | {100 * r['top1_before_finetune']:.1f} "
                     f"| {r['macs_ratio']:.3f} | {r['params'] / 1e3:.0f}k | {_latency(r)} "
                     f"| {r['seconds_to_prune']:.2f} | {r['seconds_to_finetune']:.1f} | {r['seconds_total']:.1f} |")
    return lines


def _markdown(run: BenchRun, rows: list[dict], summary: dict, plots: dict[str, list[str]],
              command: str | None) -> str:
    cfg, m = run.config, run.machine
    b, f = cfg["bench"], cfg["finetune"]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ", no GPU"
    lines = [
        "# Benchmark report", "",
        f"Command: `{command}`" if command else "", "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPU cores{gpu}; torch {m['torch']}, "
        f"{m['torch_threads']} intra-op thread(s), device `{m['device']}`.", "",
        f"Every method starts from the same reference-pretrained backbone (`{cfg['pretrain']['out']}`), keeps at "
        f"most the budget's fraction of the dense MACs by removing channels through the same surgery path, and is "
        f"fine-tuned on the same sample with the same schedule (SGD, batch {f['batch_size']}, lr {f['lr']} for the head "
        f"and {f['lr'] * f.get('backbone_lr', 1.0):g} for the rest, momentum {f['momentum']}, "
        f"weight decay {f['weight_decay']}, cosine, crops "
        f"{'on' if f['augment'] else 'off'}, flips {'on' if f['flip'] else 'off'}) and the same seeds. Top-1 is "
        f"scored on images of the target outside the sample (at most {b['eval_per_class'] or 'all'} per class). "
        f"One-shot pruners (STAMP's encoder, SNIP, GraSP, Taylor) read {cfg['prune']['samples_per_class']} images "
        "per class of the sample; train-then-prune, learn-gates and every fine-tune use the whole sample.", "",
        "Times: *to pruned model* = scoring / encoding / gate training + channel surgery + head (for train-then-prune "
        "also its first, dense fine-tune); *total* = that + the final fine-tune. "
        "**STAMP's meta-training is a one-off cost amortised over every target and budget, and is not in any "
        "cell**: " + (f"this generator's meta-training took {run.meta_training_seconds:.0f} s."
                      if run.meta_training_seconds is not None else
                      f"the meta run (`{cfg['meta']['out']}/metrics.jsonl`) does not record its wall time."), "",
    ]
    if run.generator:
        g, gm = run.generator, run.generator["meta"]
        lines += [f"STAMP: generator `{g['path']}` (step {g['step']} of a {gm['steps']}-step meta-training run, "
                  f"meta-batch {gm['meta_batch']}, task families `{gm['task_families']}`), masks with "
                  f"`prune.allocation: {g['allocation']}`, {g['adapt_steps']} adaptation steps.", ""]
    lines += ["## Overview: top-1 % after fine-tuning (mean ± std over seeds; bold: best pruning method)", "",
              overview_table(rows), "",
              "Before fine-tuning (mean top-1 % of each pruned network with its prototype head, no training: the "
              "quality of the kept channels' features alone):", "", overview_table(rows, before_finetune=True), ""]
    for target in dict.fromkeys(r["target"] for r in rows):
        lines += [f"## {target}", ""]
        for regime in dict.fromkeys(r["train_per_class"] for r in rows if r["target"] == target):
            rs = [r for r in rows if r["target"] == target and r["train_per_class"] == regime]
            seeds = sorted({s for r in rs for s in r["seeds"]})
            lines += [f"### {regime_name(regime)} — {rs[0]['epochs']} fine-tune epochs, seeds {seeds}, "
                      f"{rs[0]['train_images']:.0f} training images", "", *_regime_table(rs), ""]
        lines += [f"![top-1 vs MACs, {target}]({p})" for p in plots["top1_vs_macs"] if f"_{target}." in p] + [""]

    lines += ["## STAMP against the best other pruning method", ""]
    if summary["stamp_vs_best"]:
        lines += ["| target | regime | budget | STAMP top-1 % | best other method | its top-1 % | Δ (points) "
                  "| beyond noise | STAMP's rank |", "|" + "---|" * 9]
        for s in summary["stamp_vs_best"]:
            noise = {True: "yes", False: "no", None: "n/a (1 seed)"}[s["beyond_noise"]]
            lines.append(f"| {s['target']} | {regime_name(s['train_per_class'])} | {s['budget']:g} "
                         f"| {100 * s['stamp_top1']:.1f} | {s['best_baseline']} | {100 * s['best_baseline_top1']:.1f} "
                         f"| {100 * s['delta']:+.1f} | {noise} | {s['stamp_rank']} of {s['methods']} |")
        wins = [s for s in summary["stamp_vs_best"] if s["delta"] > 0]
        lines += ["", f"STAMP has the best mean top-1 in {len(wins)} of {len(summary['stamp_vs_best'])} settings."]
    else:
        lines.append("No STAMP cells in this run.")
    lines += [""]

    lines += ["## STAMP against random channels and the best one-shot method, paired by seed", "",
              "Δ = STAMP − the other method, top-1 points, mean ± standard error over the seeds both ran (each "
              "seed: the same sample, fine-tuning order and test images); * = beyond noise (|Δ| > 2 SE). The "
              "best one-shot method (" + ", ".join(ONE_SHOT) + ") is the one with the best mean in that setting.", ""]
    if summary["stamp_paired"]:
        lines += ["| target | regime | budget | STAMP top-1 % | Δ vs random | best one-shot | Δ vs it |",
                  "|" + "---|" * 7]
        for s in summary["stamp_paired"]:
            r, b = s["vs_random"], s["vs_best_one_shot"]
            lines.append(f"| {s['target']} | {regime_name(s['train_per_class'])} | {s['budget']:g} "
                         f"| {100 * s['stamp_top1']:.1f} | {_paired(r)} | {b['other'] if b else '—'} | {_paired(b)} |")
        ahead = [s for s in summary["stamp_paired"] if s["vs_random"] and s["vs_random"]["beyond_noise"]
                 and s["vs_random"]["delta"] > 0]
        behind = [s for s in summary["stamp_paired"] if s["vs_random"] and s["vs_random"]["beyond_noise"]
                  and s["vs_random"]["delta"] < 0]
        lines += ["", f"Against random channels, STAMP is ahead beyond noise in {len(ahead)} and behind beyond noise "
                      f"in {len(behind)} of {len(summary['stamp_paired'])} settings."]
    else:
        lines.append("No STAMP cells in this run.")
    lines += [""]

    lines += ["## Can each target tell the methods apart?", ""]
    for target, d in summary["discrimination"].items():
        if d["discriminates"] is None:
            verdict = "not judged (every setting has one seed)"
        elif d["discriminates"]:
            verdict = (f"discriminates: best and worst pruning method differ beyond noise in {d['separated']} of "
                       f"{d['judged']} settings with several seeds")
        else:
            verdict = (f"**cannot discriminate**: in all {d['judged']} settings with several seeds every pruning "
                       "method is within noise of every other")
        lines += [f"- **{target}**: {verdict}."]
        for s in d["detail"]:
            tied = s["within_noise_of_best"]
            tied = "" if tied is None else f"; within noise of the best: {', '.join(tied)}"
            lines += [f"  - {regime_name(s['train_per_class'])}, budget {s['budget']:g}: best {s['best']}, "
                      f"spread {100 * s['spread']:.1f} points{tied}"]
    lines += [""]

    lines += ["## Time to the final model", "", "Mean over targets, budgets and seeds (seconds):", "",
              "| method | regime | to pruned model | fine-tune | total |", "|---|---|---|---|---|"]
    for (method, regime), (prune, ft, total) in _time_table(rows).items():
        lines.append(f"| {method} | {regime_name(regime)} | {prune:.2f} | {ft:.1f} | {total:.1f} |")
    lines += [""]
    for other, ratios in summary["time_ratios"].items():
        per = ", ".join(f"{k}: {v:.2f}" for k, v in ratios["per_regime"].items())
        lines.append(f"- Total time of STAMP / {other}: **{ratios['overall']:.2f}** overall ({per}).")
    if not summary["time_ratios"]:
        lines.append(f"- No STAMP cells with matching {' / '.join(TRAINED)} cells: no time ratios.")
    lines += ["", *[f"![time to the final model]({p})" for p in plots["time"]], ""]
    if plots["keep_ratio"]:
        lines += ["## Per-group keep ratios: STAMP vs the best baseline", "",
                  *[f"![keep ratios]({p})" for p in plots["keep_ratio"]], ""]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def _paired(d: dict | None) -> str:
    if d is None:
        return "—"
    if d["se"] is None:
        return f"{100 * d['delta']:+.1f} (1 seed)"
    return f"{100 * d['delta']:+.1f} ± {100 * d['se']:.1f}{' *' if d['beyond_noise'] else ''}"


def _time_table(rows: list[dict]) -> dict[tuple, tuple[float, float, float]]:
    acc: dict[tuple, list] = defaultdict(list)
    for r in rows:
        acc[(r["method"], r["train_per_class"])].append((r["seconds_to_prune"], r["seconds_to_finetune"],
                                                         r["seconds_total"]))
    table = {k: tuple(np.mean(v, axis=0).tolist()) for k, v in acc.items()}
    methods = _first_seen(r["method"] for r in rows)
    return dict(sorted(table.items(), key=lambda kv: (methods[kv[0][0]], kv[0][1] == 0, kv[0][1])))


# --- plots -----------------------------------------------------------------------------------------------


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
    table = _time_table(rows)
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


# --- the whole report ------------------------------------------------------------------------------------


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
              "cells": run.cells, "config": run.config}
    write_json(out / "report.json", report)
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(_markdown(run, rows, summary, plots, command) + "\n")
    return report
