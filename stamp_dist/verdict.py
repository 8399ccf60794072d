"""The demo's three-line verdict: who won where, by how much, and whether beyond noise.

One *duel* per (target, regime, budget) setting with at least two pruning methods: STAMP against the
best other method where STAMP ran, else the best method against the runner-up. Noise is judged by
``bench.stats.beyond_noise`` (the report's rule; never judged with one seed). Works for any targets,
methods, regimes and budgets a bench config holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bench.plan import regime_name
from .bench.stats import NOT_PRUNING, STAMP, beyond_noise, pruning_settings

FOCUS = STAMP  # the method the verdict is about, when it ran
LISTED = 4  # settings named per line; the rest are counted


@dataclass(frozen=True)
class Duel:
    target: str
    train_per_class: int
    budget: float
    winner: str
    winner_top1: float
    loser: str
    loser_top1: float
    beyond_noise: bool | None  # None: a row has one seed

    @property
    def margin(self) -> float:
        """Top-1 points (0-100 scale) between winner and loser."""
        return 100 * (self.winner_top1 - self.loser_top1)

    def where(self) -> str:
        return f"{self.target} ({regime_name(self.train_per_class)}, budget {self.budget:g})"

    def text(self) -> str:
        noise = {True: "beyond noise", False: "within noise", None: "not judged (1 seed)"}[self.beyond_noise]
        return (f"{self.where()}: {self.winner} {100 * self.winner_top1:.1f} % vs {self.loser} "
                f"{100 * self.loser_top1:.1f} %, {self.margin:.1f} points, {noise}")


def duels(rows: list[dict]) -> list[Duel]:
    """One duel per setting of ``bench.stats.aggregate`` rows (settings with a single pruning method have none)."""
    out = []
    for (target, regime, budget), rs in pruning_settings(rows).items():
        ranked = sorted(rs, key=lambda r: -r["top1_mean"])
        if len(ranked) < 2:
            continue
        focus = next((r for r in ranked if r["method"] == FOCUS), None)
        a, b = ranked[0], ranked[1]
        if focus is not None and focus is not a:
            b = focus
        out.append(Duel(target, regime, budget, a["method"], a["top1_mean"], b["method"], b["top1_mean"],
                        beyond_noise(a, b)))
    return out


def _listing(ds: list[Duel]) -> str:
    ds = sorted(ds, key=lambda d: -d.margin)
    more = f"; and {len(ds) - LISTED} more" if len(ds) > LISTED else ""
    return "; ".join(d.text() for d in ds[:LISTED]) + more


def verdict(rows: list[dict]) -> list[str]:
    """Three lines on ``bench.stats.aggregate`` rows: where the focus method (or each setting's best) won, where
    it lost, and the noise judgement with the unpruned reference (one line when nothing compares)."""
    ds = duels(rows)
    if not ds:
        return ["No setting has two pruning methods to compare: no verdict."]
    judged = [d for d in ds if d.beyond_noise is not None]
    beyond = sum(bool(d.beyond_noise) for d in judged)
    several = len({r["train_per_class"] for r in rows}) > 1
    dense = [f"{r['target']}" + (f" ({regime_name(r['train_per_class'])})" if several else "")
             + f" {100 * r['top1_mean']:.1f} %" for r in rows if r["method"] in NOT_PRUNING]
    noise = (f"Beyond noise in {beyond} of {len(judged)} judged settings (the means differ by more than 2 "
             "standard errors over the seeds: stamp_dist/bench/stats.py)")
    if len(judged) < len(ds):
        noise += f"; {len(ds) - len(judged)} with one seed not judged"
    noise += f". Unpruned reference: {', '.join(dense)}." if dense else "."
    if any(FOCUS in (d.winner, d.loser) for d in ds):
        won = [d for d in ds if d.winner == FOCUS]
        lost = [d for d in ds if d.loser == FOCUS]
        return [f"{FOCUS} is best in {len(won)} of {len(ds)} settings" + (f": {_listing(won)}." if won else "."),
                f"{FOCUS} is behind in {len(lost)}" + (f": {_listing(lost)}." if lost else "."), noise]
    winners = ", ".join(dict.fromkeys(d.winner for d in ds))
    return [f"Best pruning method per setting ({FOCUS} did not run): {winners}.",
            f"Best vs runner-up: {_listing(ds)}.", noise]
