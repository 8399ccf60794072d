"""The markdown of the benchmark report: tables of the rows and the page around them."""

from __future__ import annotations

from .plan import regime_name
from .record import CellRecord
from .run import BenchRun
from .stats import NOT_PRUNING, ONE_SHOT, TRAINED, aggregate, time_table


def _top1(r: dict) -> str:
    spread = "" if r["top1_std"] is None else f" ± {100 * r['top1_std']:.1f}"
    return f"{100 * r['top1_mean']:.1f}{spread}"


def _latency(r: dict) -> str:
    lat = r["latency_ms"]
    cpu = f"{lat['cpu_b1']:.2f} / {lat['cpu_b64']:.1f}"
    return cpu + (f" (GPU {lat['cuda_b1']:.2f} / {lat['cuda_b64']:.2f})" if "cuda_b1" in lat else "")


def summarize(cells: list[CellRecord]) -> str:
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


def markdown(run: BenchRun, rows: list[dict], summary: dict, plots: dict[str, list[str]],
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
              "best one-shot method (" + ", ".join(ONE_SHOT) + ") is the one with the best mean in that setting. "
              "Room = dense − random channels, paired the same way: a pruned network is ahead of random channels by "
              "at most this much unless it beats the unpruned one.", ""]
    if summary["stamp_paired"]:
        lines += ["| target | regime | budget | STAMP top-1 % | Δ vs random | best one-shot | Δ vs it | room |",
                  "|" + "---|" * 8]
        for s in summary["stamp_paired"]:
            r, b = s["vs_random"], s["vs_best_one_shot"]
            lines.append(f"| {s['target']} | {regime_name(s['train_per_class'])} | {s['budget']:g} "
                         f"| {100 * s['stamp_top1']:.1f} | {_paired(r)} | {b['other'] if b else '—'} | {_paired(b)} "
                         f"| {_paired(s['room'])} |")
        ahead = [s for s in summary["stamp_paired"] if s["vs_random"] and s["vs_random"]["beyond_noise"]
                 and s["vs_random"]["delta"] > 0]
        behind = [s for s in summary["stamp_paired"] if s["vs_random"] and s["vs_random"]["beyond_noise"]
                  and s["vs_random"]["delta"] < 0]
        no_room = [s for s in summary["stamp_paired"] if s["room"] and s["room"]["beyond_noise"] is False]
        lines += ["", f"Against random channels, STAMP is ahead beyond noise in {len(ahead)} and behind beyond noise "
                      f"in {len(behind)} of {len(summary['stamp_paired'])} settings. In {len(no_room)} of them even the "
                      "dense network is not ahead of random channels beyond noise (room): what a pruning method can "
                      "win there, short of beating the unpruned network, is about as large as the noise."]
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
    for (method, regime), (prune, ft, total) in time_table(rows).items():
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
