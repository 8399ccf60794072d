"""Set encoder ``E_φ``: a two-level Set Transformer (Lee et al. 2019) over a labelled sample set.

Input: frozen-backbone features of a task's support set, grouped by class (N classes × K_i images).
Level 1 encodes each class's images (ISAB → ISAB → PMA(1)) into a class embedding; level 2
encodes the N class embeddings (SAB → PMA(1)) into the task embedding ``r``. Both levels are
permutation invariant (attention + pooling by attention), so ``r`` depends neither on the order of
images within a class nor on the order of classes, and any N ≥ 1 and K_i ≥ 1 work. Classes with
different K_i are padded and the padding is masked out of every attention over the set, so a class
gets the same embedding whether it is encoded alone or padded beside larger classes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

# One task: a tensor [N, K, D] or a list of N tensors [K_i, D].
TaskFeatures = torch.Tensor | Sequence[torch.Tensor]


class MAB(nn.Module):
    """Multihead attention block: ``H = LN(Q + MHA(Q, Y, Y)); out = LN(H + rFF(H))``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, y: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """``q`` [B, Lq, dim] attends to ``y`` [B, Ly, dim]; ``pad`` [B, Ly] is True at padded keys."""
        h = self.ln1(q + self.attn(q, y, y, key_padding_mask=pad, need_weights=False)[0])
        return self.ln2(h + self.ff(h))


class SAB(nn.Module):
    """Set attention block: self-attention over the set, ``MAB(X, X)``. O(L²)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mab = MAB(dim, heads)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.mab(x, x, pad)


class ISAB(nn.Module):
    """Induced set attention block: attend through ``m`` learned inducing points. O(L·m)."""

    def __init__(self, dim: int, heads: int, num_inducing: int):
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(1, num_inducing, dim) / dim**0.5)
        self.mab_in = MAB(dim, heads)
        self.mab_out = MAB(dim, heads)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        h = self.mab_in(self.inducing.expand(x.shape[0], -1, -1), x, pad)  # summary of the valid elements
        return self.mab_out(x, h)  # padded rows get values too; later blocks mask them out as keys


class PMA(nn.Module):
    """Pooling by multihead attention: ``k`` learned seeds attend to ``rFF(X)`` → [B, k, dim]."""

    def __init__(self, dim: int, heads: int, num_seeds: int = 1):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(1, num_seeds, dim) / dim**0.5)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.mab = MAB(dim, heads)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.mab(self.seeds.expand(x.shape[0], -1, -1), self.ff(x), pad)


def pad_sets(sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack sets ``[L_i, D]`` into ``[B, max L, D]`` plus a padding mask (True = padding; None if
    all sets have the same size)."""
    sizes = [len(s) for s in sets]
    if min(sizes) < 1:
        raise ValueError("every set (class / task) needs at least one element")
    if len(set(sizes)) == 1:
        return torch.stack(list(sets)), None
    x = nn.utils.rnn.pad_sequence(list(sets), batch_first=True)
    pad = torch.arange(x.shape[1], device=x.device)[None, :] >= torch.tensor(sizes, device=x.device)[:, None]
    return x, pad


class SetEncoder(nn.Module):
    """Two-level permutation-invariant encoder: per-class feature sets → task embedding ``r`` [dim]."""

    def __init__(self, feature_dim: int, dim: int = 128, heads: int = 4, num_inducing: int = 16):
        super().__init__()
        self.feature_dim, self.dim = feature_dim, dim
        # LayerNorm first: backbones differ a lot in feature scale (post-ReLU, 64 vs 2048 dims).
        self.embed = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, dim))
        self.within = nn.ModuleList([ISAB(dim, heads, num_inducing), ISAB(dim, heads, num_inducing)])
        self.within_pool = PMA(dim, heads)
        self.across = SAB(dim, heads)
        self.across_pool = PMA(dim, heads)

    def encode_classes(self, features: TaskFeatures) -> torch.Tensor:
        """Level 1: class embeddings [N, dim] from [N, K, D] or a list of [K_i, D]."""
        if isinstance(features, torch.Tensor):
            if features.dim() != 3:
                raise ValueError(f"expected class features [N, K, D], got shape {tuple(features.shape)}")
            x, pad = features, None
        else:
            x, pad = pad_sets(features)
        x = self.embed(x)
        for block in self.within:
            x = block(x, pad)
        return self.within_pool(x, pad).squeeze(1)

    def _pool_tasks(self, classes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Level 2: class-embedding sets [N_t, dim] → task embeddings [T, dim]."""
        x, pad = pad_sets(classes)
        return self.across_pool(self.across(x, pad), pad).squeeze(1)

    def forward(self, features: TaskFeatures) -> torch.Tensor:
        """One task's support features ([N, K, D] or a list of [K_i, D]) → task embedding ``r`` [dim]."""
        return self._pool_tasks([self.encode_classes(features)])[0]

    def forward_batch(self, tasks: Sequence[TaskFeatures]) -> torch.Tensor:
        """Several tasks (any N and K each) → [T, dim]; equal to ``forward`` on each task alone.
        All classes of all tasks go through level 1 in one padded batch."""
        classes = [c for task in tasks for c in (task if isinstance(task, torch.Tensor) else task)]
        emb = self.encode_classes(classes)
        sizes = [len(task) for task in tasks]
        return self._pool_tasks(list(torch.split(emb, sizes)))
