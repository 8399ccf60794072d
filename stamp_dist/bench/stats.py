"""The rows of the benchmark report and the numbers it judges them by.

Aggregation: the cells of one (target, regime, method, budget) form a *row*; top-1 is reported as
mean ± sample standard deviation over the seeds (ddof = 1; no spread with one seed), every other
number as the mean over the seeds. "Within noise": two rows differ beyond noise when their mean top-1
differ by more than twice the standard error of the difference, ``2·√(s₁²/n₁ + s₂²/n₂)``; a row with
one seed has no standard error, so no noise judgement is made for it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from ..choices import Method
from ..methods import METHODS, Family
from .plan import regime_name
from .record import CellRecord

ROW_KEY = ("target", "train_per_class", "method", "budget")


def _family(family: Family) -> tuple[Method, ...]:
    return tuple(name for name, m in METHODS.items() if m.family is family)


NOT_PRUNING = _family(Family.REFERENCE)
ONE_SHOT = _family(Family.SCORE)  # the informed one-shot baselines STAMP is paired against
TRAINED = _family(Family.TRAINED)  # the methods STAMP's total time is compared with
STAMP, RANDOM = Method.STAMP, Method.RANDOM  # the report's subject and the floor it is paired against
DENSE = Method.DENSE  # the ceiling: how far random channels are below it is all a pruning method can win
MEANS = ("top1_before_finetune", "macs_ratio", "params", "macs", "seconds_to_prune", "seconds_to_finetune",
         "seconds_total", "train_images", "eval_images")  # cell fields a row reports as the mean over seeds


# --- rows ----------------------------------------------------------------------------------------------


def aggregate(cells: list[CellRecord]) -> list[dict]:
    """One row per (target, regime, method, budget), ordered target → regime → budget (dense first) →
    method, each in the order the cells first name them."""
    groups: dict[tuple, list[CellRecord]] = defaultdict(list)
    for c in cells:
        groups[tuple(getattr(c, k) for k in ROW_KEY)].append(c)
    order = {k: _first_seen(getattr(c, k) for c in cells) for k in ("target", "train_per_class", "method")}
    rows = []
    for key, cs in groups.items():
        acc = np.array([c.top1 for c in cs])
        rows.append({
            **dict(zip(ROW_KEY, key)), "epochs": cs[0].epochs, "seeds": [c.seed for c in cs],
            "top1_mean": float(acc.mean()), "top1_std": float(acc.std(ddof=1)) if len(cs) > 1 else None,
            **{k: float(np.mean([getattr(c, k) for c in cs])) for k in MEANS},
            "latency_ms": {k: float(np.mean([c.latency_ms[k] for c in cs])) for k in cs[0].latency_ms},
            "kept": np.mean([c.kept for c in cs], axis=0).tolist(),
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


def paired_delta(cells: list[CellRecord], method: str, other: str, setting: tuple,
                 other_budget: float | None = None) -> dict | None:
    """``method`` − ``other`` top-1 in one (target, regime, budget) setting, paired by seed: the two cells of a
    seed share the sample, the fine-tuning order and the evaluation images, so the seed-to-seed spread
    cancels. Mean, its standard error over seeds, and beyond noise (|mean| > 2 SE; None with one seed).
    ``other_budget``: ``other``'s cells are at that budget instead (the dense network's is 1)."""
    target, regime, budget = setting
    mine = {c.seed: c.top1 for c in cells if (c.target, c.train_per_class, c.budget, c.method) == (*setting, method)}
    theirs = {c.seed: c.top1 for c in cells if (c.target, c.train_per_class, c.method) == (target, regime, other)
              and c.budget == (budget if other_budget is None else other_budget)}
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    d = np.array([mine[s] - theirs[s] for s in seeds])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    return {"other": other, "delta": float(d.mean()), "se": se, "seeds": seeds,
            "beyond_noise": None if se is None else bool(abs(d.mean()) > 2 * se)}


def room(cells: list[CellRecord], setting: tuple) -> dict | None:
    """Dense − random channels in ``setting``, paired by seed (the dense cells are at budget 1)."""
    d = paired_delta(cells, RANDOM, DENSE, setting, other_budget=1.0)
    return None if d is None else d | {"other": RANDOM, "delta": -d["delta"]}


def stamp_paired(cells: list[CellRecord], rows: list[dict]) -> list[dict]:
    """Per setting with STAMP: STAMP − random channels and STAMP − the one-shot baseline with the best mean
    in that setting (picked after the fact, which favours the baseline), both paired by seed; and the room,
    dense − random channels (``room``): a pruned network that does not beat the dense one is ahead of random
    channels by at most that much, so where the room is within noise there is about as little to win."""
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
                    "vs_best_one_shot": paired_delta(cells, STAMP, best, setting) if best else None,
                    "room": room(cells, setting)})
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


def time_ratios(cells: list[CellRecord]) -> dict[str, dict]:
    """Total time to the final model of STAMP over that of each method that trains on the target (train_prune,
    learn_gates): the ratio of the mean totals over the (target, regime, budget, seed) cells both methods ran;
    overall and per regime."""
    by = {(c.method, c.target, c.train_per_class, c.budget, c.seed): c.seconds_total for c in cells}
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


def time_table(rows: list[dict]) -> dict[tuple, tuple[float, float, float]]:
    """Mean (to pruned model, fine-tune, total) seconds per (method, regime), methods in row order."""
    acc: dict[tuple, list] = defaultdict(list)
    for r in rows:
        acc[(r["method"], r["train_per_class"])].append((r["seconds_to_prune"], r["seconds_to_finetune"],
                                                         r["seconds_total"]))
    table = {k: tuple(np.mean(v, axis=0).tolist()) for k, v in acc.items()}
    methods = _first_seen(r["method"] for r in rows)
    return dict(sorted(table.items(), key=lambda kv: (methods[kv[0][0]], kv[0][1] == 0, kv[0][1])))

