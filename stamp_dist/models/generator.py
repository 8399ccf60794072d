"""Mask generator ``G_ψ`` and the mask distribution it parameterises.

``MaskGenerator`` maps a task embedding ``r`` and a MACs budget ``b`` to per-channel keep-logits
``a_g`` for every channel group ``g``. The module-level functions turn logits into masks and losses:

* ``hard_concrete_sample``: the relaxed training mask ``z`` (Louizos et al. 2018), optionally
  straight-through (hard 0/1 forward, relaxed gradient).
* ``keep_probability``: ``p = sigmoid(a)``, the probability that a channel is kept. It is exactly
  ``P(z > 1/2)`` for a hard-concrete sample at any temperature (and ``P(z = 1)`` for a
  straight-through sample), i.e. the probability that the channel survives when the mask is made
  hard by thresholding, so it is the one probability used for expected MACs, for ranking channels
  when pruning, and for the prior. (The L0-style ``P(z > 0) = sigmoid(a - τ·log(-l/r))`` is not used.)
* ``prior_kl``: the sparsity prior (Bernoulli or Beta-Bernoulli), mean per channel.
* ``budget_penalty``: squared distance of the expected MACs ratio from the budget.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Logits = torch.Tensor | Sequence[torch.Tensor]


class MaskGenerator(nn.Module):
    """``(r, b) → [a_g]``: keep-logits ``[..., C_g]`` for each group size ``C_g`` in ``group_sizes``.

    Architecture (why): a shared trunk reads ``(r, b, log b)`` — the budget is an input, so one
    generator serves every budget and ``log b`` resolves small budgets. Each group has a learned
    embedding ``e_g``; a shared layer maps ``concat(h, e_g)`` to a per-group code ``u_g``, and one
    shared linear read-out maps ``u_g`` to ``C_max`` logits sliced to ``C_g``. A per-channel bias
    (one scalar per real channel) gives every channel its own task-independent prior importance.
    Parameters therefore grow with ``C_max`` and ``Σ C_g`` only linearly and tiny-ly, not with
    ``hidden · Σ C_g`` as separate per-group heads would (ResNet-50 has ~26k prunable channels).

    Every logit is offset by ``logit(√b)`` (see ``forward``), so at initialisation (per-channel bias
    ``logit(init_keep)`` = 0 by default) each channel is kept with probability ≈ √b and the expected
    MACs ratio is ≈ b: pruning starts at the budget, whatever the budget.

    With ``uniform`` each group's logits are centred before the budget offset, so every group keeps
    about the same fraction √b of its channels (``meta.allocation: uniform``) and what is learned is
    only which channels. With ``channel_stats > 0`` the generator also reads, per channel, a vector of statistics of the
    target set at that channel (``meta/set_inputs.py``): one small network shared by every channel
    maps ``(stats_c, u_g)`` to a logit offset, so *how* statistics matter may depend on the group, the
    task and the budget. Its output layer starts at zero: training begins from the plain generator.
    """

    def __init__(
        self,
        group_sizes: Sequence[int],
        embed_dim: int,
        hidden: int = 128,
        group_embed_dim: int = 32,
        init_keep: float = 0.5,
        channel_stats: int = 0,
        stats_hidden: int = 32,
        uniform: bool = False,
    ):
        super().__init__()
        if not group_sizes or min(group_sizes) < 1:
            raise ValueError(f"group_sizes must be non-empty positive channel counts, got {list(group_sizes)}")
        self.group_sizes = [int(c) for c in group_sizes]
        self.embed_dim, self.hidden, self.group_embed_dim = embed_dim, hidden, group_embed_dim
        self.trunk = nn.Sequential(
            nn.Linear(embed_dim + 2, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.group_embed = nn.Parameter(torch.randn(len(self.group_sizes), group_embed_dim))
        self.group_code = nn.Sequential(nn.Linear(hidden + group_embed_dim, hidden), nn.GELU())
        self.readout = nn.Linear(hidden, max(self.group_sizes), bias=False)
        init_logit = math.log(init_keep / (1 - init_keep))
        self.channel_bias = nn.Parameter(torch.full((sum(self.group_sizes),), init_logit))
        self.channel_stats = channel_stats
        self.uniform = uniform
        if channel_stats:
            self.stats_in = nn.Linear(channel_stats, stats_hidden)
            self.stats_context = nn.Linear(hidden, stats_hidden)
            self.stats_out = nn.Linear(stats_hidden, 1)
            nn.init.zeros_(self.stats_out.weight)
            nn.init.zeros_(self.stats_out.bias)
            # Centring removes a shift shared by all channels: the bias gets no gradient, only round-off
            # that Adam would turn into steps of size lr. Frozen at zero (the artifact keeps its key).
            self.stats_out.bias.requires_grad_(not uniform)
        # Flat (group, channel) index of every real channel in the [G, C_max] read-out.
        group_idx = torch.cat([torch.full((c,), g) for g, c in enumerate(self.group_sizes)])
        chan_idx = torch.cat([torch.arange(c) for c in self.group_sizes])
        self.register_buffer("_group_idx", group_idx, persistent=False)
        self.register_buffer("_chan_idx", chan_idx, persistent=False)

    def forward(self, r: torch.Tensor, budget: float | torch.Tensor,
                channel_stats: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``r`` [..., embed_dim], ``budget`` in (0, 1] (scalar or [...]), and with ``channel_stats > 0``
        per-group statistics [..., C_g, S] → list of logits [..., C_g]."""
        if bool(self.channel_stats) != (channel_stats is not None):
            raise ValueError(f"this generator reads {self.channel_stats} channel statistics; "
                             f"got {'none' if channel_stats is None else 'some'}")
        b = torch.as_tensor(budget, dtype=r.dtype, device=r.device).expand(r.shape[:-1]).unsqueeze(-1)
        h = self.trunk(torch.cat([r, b, b.clamp_min(1e-6).log()], dim=-1))  # [..., hidden]
        e = self.group_embed.expand(*h.shape[:-1], -1, -1)  # [..., G, E]
        u = self.group_code(torch.cat([h.unsqueeze(-2).expand(*e.shape[:-1], -1), e], dim=-1))
        logits = self.readout(u)[..., self._group_idx, self._chan_idx] + self.channel_bias  # [..., Σ C_g]
        if channel_stats is not None:
            stats = torch.cat(list(channel_stats), dim=-2)  # [..., Σ C_g, S]
            context = self.stats_context(u)[..., self._group_idx, :]  # [..., Σ C_g, stats_hidden]
            logits = logits + self.stats_out(F.gelu(self.stats_in(stats) + context)).squeeze(-1)
        groups = logits.split(self.group_sizes, dim=-1)
        if self.uniform:  # every group's mean logit is the budget's: the generator only ranks channels within groups
            groups = [a - a.mean(-1, keepdim=True) for a in groups]
        offset = budget_offset(b)
        return [a + offset for a in groups]


def budget_keep_rate(b: float | torch.Tensor) -> float | torch.Tensor:
    """``√b``: the fraction of every group's channels that, kept uniformly, costs ≈ ``b`` of the MACs
    (a conv's MACs scale with kept in-channels × kept out-channels)."""
    return b**0.5


def prior_keep_rate(configured: float | None, budget: float) -> float:
    """The sparsity prior's keep rate: ``meta.prior_keep`` when set, else the budget's uniform rate √b,
    so the prior pulls every group towards the same kept fraction instead of towards 1/2."""
    return budget_keep_rate(budget) if configured is None else configured


def budget_offset(b: torch.Tensor) -> torch.Tensor:
    """``logit(√b)``, the budget prior added to every keep-logit: with it the expected MACs ratio
    tracks any budget from the first step, and what is learned is which channels deviate from that
    prior for a given task."""
    root = budget_keep_rate(b.clamp(1e-6, 1 - 1e-6))
    return root.log() - (-root).log1p()


def hard_concrete_sample(
    logits: torch.Tensor,
    tau: float,
    generator: torch.Generator | None = None,
    straight_through: bool = False,
    stretch: tuple[float, float] = (-0.1, 1.1),
) -> torch.Tensor:
    """Hard-concrete mask sample in [0, 1] (Louizos et al. 2018).

    ``s = sigmoid((log u - log(1-u) + a) / τ)`` with ``u ~ U(0, 1)``, stretched to ``(l, r)`` and
    clamped, so exact 0s and 1s occur with nonzero probability. ``straight_through=True`` returns the
    hard mask ``1[z > 1/2]`` (kept with probability ``sigmoid(a)``) in the forward pass with the
    gradient of the un-clamped relaxed ``s``, so saturated channels still receive gradient.
    """
    lo, hi = stretch
    # Drawn on the generator's device (a CPU generator with CUDA logits: `stamp prune --adapt-steps` on a GPU).
    where = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=where).to(logits.device)
    u = u.clamp(1e-6, 1 - 1e-6)  # avoid log(0)
    s = torch.sigmoid((u.log() - (-u).log1p() + logits) / tau)
    z = (s * (hi - lo) + lo).clamp(0.0, 1.0)
    if not straight_through:
        return z
    hard = (z > 0.5).to(logits.dtype)
    return hard + (s - s.detach())  # exactly `hard` in the forward pass


def keep_probability(logits: torch.Tensor) -> torch.Tensor:
    """``p = sigmoid(a)`` = ``P(z > 1/2)`` under ``hard_concrete_sample`` (any τ, symmetric stretch)."""
    return torch.sigmoid(logits)


def _as_groups(logits: Logits) -> list[torch.Tensor]:
    return [logits] if isinstance(logits, torch.Tensor) else list(logits)


def _bernoulli_kl(logits: torch.Tensor, log_q1: float | torch.Tensor, log_q0: float | torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bern(sigmoid(a)) || Bern(q)) given log q and log(1-q); stable in logit form."""
    p = torch.sigmoid(logits)
    return p * (F.logsigmoid(logits) - log_q1) + (1 - p) * (F.logsigmoid(-logits) - log_q0)


def prior_kl(
    logits: Logits,
    kind: str = "bernoulli",
    prior_keep: float = 0.5,
    alpha: float | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Sparsity prior on the keep probabilities ``p = sigmoid(a)``, as a scalar **mean per channel**
    (total KL / number of channels, also averaged over leading batch dims) so its scale, and so
    ``meta.prior_weight``, does not depend on the network's width.

    ``logits``: one tensor ``[..., C]`` or a list of per-group tensors ``[..., C_g]`` (generator output).

    * ``"bernoulli"``: ``Σ_c KL(Bern(p_c) || Bern(prior_keep))``.
    * ``"beta_bernoulli"`` (Beta-Bernoulli dropout, Lee et al. 2018): the prior is hierarchical per
      group, ``π_g ~ Beta(α, β)``, ``z_c | π_g ~ Bern(π_g)``. The variational posterior is
      ``q(π_g) = Beta(α + Σ_c p_c, β + Σ_c (1 - p_c))`` (the conjugate update with soft counts) times
      ``q(z_c) = Bern(p_c)``, and the KL is exact::

          KL = Σ_g [ KL(Beta(a_g, b_g) || Beta(α, β))
                     + Σ_c ( -H(p_c) - p_c·E[log π_g] - (1 - p_c)·E[log(1 - π_g)] ) ]

      with ``E[log π] = ψ(a_g) - ψ(a_g + b_g)`` and ``E[log(1-π)] = ψ(b_g) - ψ(a_g + b_g)``. It pulls
      each group's mean keep rate towards ``α / (α + β)`` and channels within a group towards a
      shared rate. ``alpha``/``beta`` default to ``2·prior_keep`` / ``2·(1 - prior_keep)``
      (``Beta(1, 1)`` for ``prior_keep = 0.5``).
    * ``"none"``: 0.
    """
    groups = _as_groups(logits)
    count = sum(g.numel() for g in groups)
    if kind == "none":
        return groups[0].new_zeros(())
    if kind == "bernoulli":
        log_q1, log_q0 = math.log(prior_keep), math.log1p(-prior_keep)
        total = sum(_bernoulli_kl(a, log_q1, log_q0).sum() for a in groups)
        return total / count
    if kind == "beta_bernoulli":
        alpha = 2.0 * prior_keep if alpha is None else alpha
        beta = 2.0 * (1.0 - prior_keep) if beta is None else beta
        total = groups[0].new_zeros(())
        for a in groups:
            p = torch.sigmoid(a)
            a_g = alpha + p.sum(-1, keepdim=True)
            b_g = beta + (1 - p).sum(-1, keepdim=True)
            prior = torch.distributions.Beta(a.new_tensor(alpha), a.new_tensor(beta))
            kl_beta = torch.distributions.kl_divergence(torch.distributions.Beta(a_g, b_g), prior)
            e_log_keep = torch.digamma(a_g) - torch.digamma(a_g + b_g)
            e_log_drop = torch.digamma(b_g) - torch.digamma(a_g + b_g)
            total = total + kl_beta.sum() + _bernoulli_kl(a, e_log_keep, e_log_drop).sum()
        return total / count
    raise ValueError(f"unknown prior {kind!r}; valid: bernoulli, beta_bernoulli, none")


def budget_penalty(expected_ratio: torch.Tensor, budget: float | torch.Tensor, one_sided: bool = False) -> torch.Tensor:
    """``(E[MACs ratio] - b)²``; ``one_sided=True`` only penalises exceeding the budget."""
    gap = expected_ratio - budget
    return (gap.clamp_min(0) if one_sided else gap).square().mean()
