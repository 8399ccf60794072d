"""What a budget is a fraction of: one small protocol, "a differentiable cost of the per-group kept counts".

A ``BudgetCost`` has a ``kind`` (``macs`` | ``latency``: ``choices.BUDGET_KINDS``), the channel ``groups``
it is a function of, its ``dense`` value (every channel kept), ``cost(counts)`` (a float64 tensor of
kept counts ``n_g``, differentiable, so that expected counts under keep probabilities give an expected
cost), ``change(counts, chunk, sign)``: |Δcost| when each group alone loses (``sign=-1``) or regains
(``+1``) ``chunk[g]`` channels, the step of the hard-mask rules (pruning/hardmask.py), and ``steps``: per
group, the multiple of channels the rules keep (1 for MACs; the measured grid's step for latency, where
the model is exact at the grid's counts and kernels are not smooth in between).

Two implementations: ``MacsBudget`` (the exact bilinear MACs form of ``macs.py``) and the measured
``LatencyModel`` of ``latency.py``. The objective, learn-gates and the hard-mask rules take either.
"""

from __future__ import annotations

from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch

from .groups import ChannelGroups
from .macs import CostModel
from .masking import check_masks


@runtime_checkable
class BudgetCost(Protocol):
    kind: str
    groups: ChannelGroups
    dense: float
    steps: np.ndarray

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        ...

    def change(self, counts: np.ndarray, chunk: np.ndarray, sign: int) -> np.ndarray:
        ...


class MacsBudget:
    """The MACs of ``CostModel`` as a ``BudgetCost`` (exact: a bilinear form of the counts)."""

    kind = "macs"
    unit = "MACs"

    def __init__(self, cost: CostModel):
        self.groups, self.form, self.dense = cost.groups, cost.macs_form, cost.dense_macs
        self.steps = np.ones(len(cost.groups), dtype=np.int64)

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        return self.form(counts)

    def change(self, counts: np.ndarray, chunk: np.ndarray, sign: int) -> np.ndarray:
        grad = self.form.grad_matrix @ np.append(counts, 1.0)
        return chunk * grad + sign * chunk**2 * self.form.self_coef


Budgeted = Union[BudgetCost, CostModel]


def as_budget(cost: Budgeted) -> BudgetCost:
    """A ``CostModel`` means its MACs (what every caller passed before budgets had kinds)."""
    return MacsBudget(cost) if isinstance(cost, CostModel) else cost


def kept_counts(groups: ChannelGroups, keep: Sequence[torch.Tensor]) -> torch.Tensor:
    """``n_g = Σ keep_g`` (float64; expected counts for keep probabilities, differentiable)."""
    check_masks(groups, keep)
    return torch.stack([k.to(torch.float64).sum() for k in keep])


def cost_ratio(cost: Budgeted, keep: Sequence[torch.Tensor]) -> torch.Tensor:
    """(Expected) cost of the keep vectors as a fraction of the dense network's; differentiable."""
    b = as_budget(cost)
    return b(kept_counts(b.groups, keep)) / b.dense
