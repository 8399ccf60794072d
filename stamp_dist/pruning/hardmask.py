"""Turn per-channel scores (keep probabilities) into a hard mask that meets a budget: a fraction of the dense
network's MACs or of its measured latency (a ``BudgetCost`` of pruning/budget.py; a ``CostModel`` means MACs).

Two rules, chosen by ``allocation`` in :func:`hard_mask`:

* ``learned`` (:func:`budget_mask`): the scores also decide how many channels each group keeps.
* ``uniform`` (:func:`uniform_ratio_masks`): every group keeps the same fraction of its channels; the
  scores only rank the channels within a group (the rule of the score-based baselines).

Both take any ``BudgetCost``: MACs (exact, bilinear) or measured latency, whose counts are kept on the
latency table's grid (``cost.steps``, combined with ``round_to``): the table is exact there, and measured
latency is neither smooth nor monotone in between, so removal steps that save no time are still taken when
no other step saves any (a later one may).

Why both: a learned allocation can follow what a target needs, but the one STAMP learned from
frozen-feature objectives kept the residual streams, emptied the inner convs and lost up to 15 points
to random channels after fine-tuning on real targets; the uniform rule kept the network's shape and
won there. ``uniform`` is STAMP's default (``meta.allocation``) and every score-based baseline's
rule; measurements in docs/BENCHMARKS.md ("What changed the method") and docs/history/.

``learned`` rule: remove channels in order of increasing keep probability (the least probable channel of any
group goes first; at least one channel, or one ``round_to`` chunk, stays per group) until the MACs
ratio is at most the budget, then put back the removed channels with the most probability per MAC
that still fit, so the result lands just below the budget.

Why not "probability per MAC saved" for the removal order (DESIGN.md §2.6's first suggestion):
a residual stream's channels feed many convs, so each saves many MACs and that rule strips the
stream to one channel even when the generator rates it highly; on the demo ResNet-20 that order
scored below random channels on held-out validation tasks (docs/BENCHMARKS.md, "Per-group keep ratios").
The generator is trained so that its expected MACs under ``p`` match the budget, so ranking by
``p`` alone keeps the masks it was trained with. Within a group every channel costs the same,
so one step costs O(#groups), not O(#channels).
"""

from __future__ import annotations

from numbers import Real
from typing import Sequence

import numpy as np
import torch

from ..choices import ALLOCATIONS
from ..errors import StampError
from .budget import Budgeted, as_budget
from .masking import check_masks

TOLERANCE = 0.02  # the allowed overshoot of the cost ratio when the budget cannot be met exactly


def check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, Real) or not 0 < budget <= 1:
        raise StampError(f"budget must be a ratio in (0, 1] (the fraction of the dense network's MACs or latency to "
                         f"keep), got {budget!r}")


def check_allocation(allocation) -> None:
    if allocation not in ALLOCATIONS:
        raise StampError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")


def hard_mask(scores: Sequence[torch.Tensor], cost: Budgeted, budget: float, round_to: int = 1,
              allocation: str = "learned") -> list[torch.Tensor]:
    """Hard keep masks at ``budget`` from per-channel ``scores`` (keep probabilities for ``learned``)
    under the ``allocation`` rule (module docstring)."""
    check_allocation(allocation)
    rule = budget_mask if allocation == "learned" else uniform_ratio_masks
    return rule(scores, cost, budget, round_to)


def uniform_ratio_masks(scores: Sequence[torch.Tensor], cost: Budgeted, budget: float,
                        round_to: int = 1) -> list[torch.Tensor]:
    """Keep the same fraction of channels in every group (the top-scored ones; at least one, and with
    ``round_to`` a multiple of it in groups that have that many, unless the group stays whole), then
    fill the budget: the fraction is found by bisection so the MACs ratio lands under ``budget``, and
    the MACs that rounding left unused go to the groups with the smallest kept fraction, one channel
    (``round_to`` chunk) at a time, while it fits. So every method lands just under the budget (within
    one channel's MACs, ~0.1% of dense on ResNet-20) rather than up to a few percent below it, which
    gave uniform-ratio baselines less compute than methods with the learned rule. Ranking by score per
    MAC instead would strip the residual stream (its channels feed many convs) to one channel under
    uninformative scores."""
    check_budget(budget)
    _check_round_to(round_to)
    cost = as_budget(cost)
    check_masks(cost.groups, scores)
    sizes = np.array(cost.groups.sizes)
    step = np.lcm(np.where(sizes >= round_to, round_to, 1), cost.steps)

    def counts_at(ratio: float) -> np.ndarray:
        n = np.maximum(1, np.ceil(ratio * sizes))
        rounded = np.minimum(sizes, np.ceil(n / step) * step)
        return np.where(n < sizes, rounded, sizes)  # a whole group stays whole, as in budget_mask

    def cost_of(counts: np.ndarray) -> float:
        return float(cost(torch.from_numpy(counts.astype(np.float64))))

    target = budget * cost.dense
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost_of(counts_at(mid)) <= target else (lo, mid)
    counts = counts_at(lo).astype(np.float64)
    used = cost_of(counts)
    _check_reached(cost, used, budget, round_to)
    while True:
        chunk = np.minimum(step, sizes - counts)
        added = cost.change(counts, chunk, +1)
        ok = (chunk > 0) & (used + added <= target)
        if not ok.any():
            break
        g = int(np.argmin(np.where(ok, counts / sizes, np.inf)))
        counts[g] += chunk[g]
        used += added[g]
    masks = []
    for s, n in zip(scores, counts.astype(int)):
        keep = torch.zeros(len(s), dtype=torch.bool)
        keep[torch.argsort(s.detach().cpu(), descending=True, stable=True)[:n]] = True
        masks.append(keep)
    return masks


def _check_reached(cost, used: float, budget: float, round_to: int) -> None:
    if used > budget * cost.dense + TOLERANCE * cost.dense:
        least = "one channel" if round_to == 1 else f"{round_to} channels"
        raise StampError(f"{cost.unit} budget {budget:g} is unreachable: keeping {least} per group already costs "
                         f"{used / cost.dense:.3f} of the dense {cost.unit}; raise the budget")


def _check_round_to(round_to) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise StampError(f"round_to must be a positive integer, got {round_to!r}")


def budget_mask(probs: Sequence[torch.Tensor], cost: Budgeted, budget: float,
                round_to: int = 1) -> list[torch.Tensor]:
    """Hard keep masks (one bool ``[C_g]`` per group) with cost ratio (MACs or latency) at most ``budget`` (within
    ``TOLERANCE`` above it only when one channel per group already costs more), keeping at least one
    channel per group and, with ``round_to``, a multiple of ``round_to`` channels in every group that
    has at least ``round_to``."""
    check_budget(budget)
    _check_round_to(round_to)
    cost = as_budget(cost)
    check_masks(cost.groups, probs)
    p = [np.asarray(x.detach().cpu().double().numpy()) for x in probs]
    if not all(np.isfinite(x).all() for x in p):
        raise StampError("keep probabilities contain NaN or infinity")

    sizes = np.array(cost.groups.sizes)
    order = [np.argsort(x, kind="stable") for x in p]  # least probable first; stable → deterministic
    cum = np.zeros((len(p), sizes.max() + 1))  # cum[g, j]: sum of the j lowest probabilities of g
    for g, x in enumerate(p):
        cum[g, 1:sizes[g] + 1] = np.cumsum(x[order[g]])
    step = np.lcm(np.where(sizes >= round_to, round_to, 1), cost.steps)
    counts = sizes.astype(np.float64)
    removed = np.zeros(len(p), dtype=np.int64)
    rows = np.arange(len(p))
    target = budget * cost.dense
    used = cost.dense

    def change(chunk: np.ndarray, sign: int) -> np.ndarray:
        return cost.change(counts, chunk, sign)

    while used > target:
        rem = counts % step
        chunk = np.where(rem == 0, step, rem)  # down to the next multiple of round_to
        saved = change(chunk, -1)
        removable = counts - chunk >= step
        ok = removable & (saved > 0)
        if not ok.any():
            # measured latency is not monotone in the counts (a kernel can be slower at fewer channels): when no
            # removal saves time now, keep removing, as one further may; MACs never get here while removable
            ok = removable
            if not ok.any():
                break
        score = (cum[rows, removed + chunk.astype(int)] - cum[rows, removed]) / chunk  # mean keep probability
        g = int(np.argmin(np.where(ok, score, np.inf)))
        removed[g] += int(chunk[g])
        counts[g] -= chunk[g]
        used -= saved[g]

    _check_reached(cost, used, budget, round_to)

    while True:  # put back the most probable removed chunks that still fit under the budget
        chunk = np.minimum(step, removed)
        added = change(chunk, +1)
        ok = (chunk > 0) & (used + added <= target)
        if not ok.any():
            break
        gain = (cum[rows, removed] - cum[rows, np.maximum(removed - chunk, 0)]) / np.where(ok, added, 1)
        g = int(np.argmax(np.where(ok, gain, -np.inf)))
        removed[g] -= int(chunk[g])
        counts[g] += chunk[g]
        used += added[g]

    masks = []
    for g, x in enumerate(probs):
        mask = torch.ones(sizes[g], dtype=torch.bool)
        mask[torch.from_numpy(order[g][:removed[g]])] = False
        masks.append(mask.to(x.device))
    return masks
