"""Exact MACs and parameter counts as differentiable functions of the per-group keep vectors.

Every cost term of the network is ``coef · n_a · n_b`` where ``n_g`` is the number of channels kept
in group ``g`` (a conv: k² · H_out · W_out · n_in · n_out), or has one such factor (BN, ReLU, pooling, a
depthwise conv: k² · H_out · W_out · n_out, its in-channels being its out-channels) or none (fixed
layers, grouped convs). A layer reading a concatenation of groups has one term per part. With soft
keeps ``n_g = Σ keep_g`` and the result is the expected cost under independent Bernoulli keeps (exact
when a term's two factors come from different groups, which holds for every conv of the in-project
backbones).

What is counted matches ``tp.utils.count_ops_and_params`` (batch 1): convs and linears, plus BN
(2 per element), activations (1 per output element) and pooling (1 per input element), so the
budget and the reports agree with Torch-Pruning's numbers for the physically pruned model.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.pooling import _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _AvgPoolNd, _MaxPoolNd

from ..errors import StampError
from .groups import ChannelGroups, Parts
from .masking import check_masks

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU)
_POOLS = (_MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd)


class Bilinear:
    """``f(n) = Σ_t coef_t · ext[a_t] · ext[b_t]`` with ``ext = [n_0 … n_{G-1}, 1]``."""

    def __init__(self, terms: list[tuple[float, int, int]], num_groups: int):
        coef, a, b = zip(*terms) if terms else ((), (), ())
        self.coef = torch.tensor(coef, dtype=torch.float64)
        self.a = torch.tensor(a, dtype=torch.long)
        self.b = torch.tensor(b, dtype=torch.long)
        # ∂f/∂n = grad_matrix @ ext: each term adds coef·ext[b] to ∂/∂n_a and coef·ext[a] to ∂/∂n_b
        m = np.zeros((num_groups + 1, num_groups + 1))
        np.add.at(m, (self.a.numpy(), self.b.numpy()), self.coef.numpy())
        np.add.at(m, (self.b.numpy(), self.a.numpy()), self.coef.numpy())
        self.grad_matrix = m[:num_groups]
        # the n_g² coefficient (nonzero only if one term has both factors in group g)
        self.self_coef = np.diag(m)[:num_groups] / 2

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        ext = torch.cat([counts.to(torch.float64), counts.new_ones(1, dtype=torch.float64)])
        coef = self.coef.to(ext.device)
        return (coef * ext[self.a.to(ext.device)] * ext[self.b.to(ext.device)]).sum()


class CostModel:
    """MACs and params of ``model`` for any per-group keep vectors, at input ``input_size``."""

    def __init__(self, model: nn.Module, groups: ChannelGroups, input_size: Sequence[int] = (3, 32, 32)):
        self.groups = groups
        calls = _trace_shapes(model, input_size)
        if [c[0] for c in calls] != [c.name for c in groups.calls]:
            raise StampError("the model's layer calls differ from those its channel groups were "
                             "discovered on; run discover_groups on this model")
        one = len(groups)  # index of the constant 1 in ``ext``
        macs, params, counted = [], [], set()
        for (name, module, in_shape, out_shape), call in zip(calls, groups.calls):
            fin, fout = _factors(call.inputs, one), _factors(call.outputs, one)
            macs += _macs_terms(module, name, fin, fout, in_shape, out_shape, one)
            if name not in counted:  # parameters once per module, MACs once per call
                params += _param_terms(module, name, fin, fout, one)
                counted.add(name)
        fixed = sum(p.numel() for n, m in model.named_modules() if n not in counted
                    for p in m.parameters(recurse=False))
        self.macs_form = Bilinear(macs, len(groups))
        self.params_form = Bilinear(params + [(float(fixed), one, one)], len(groups))
        dense = torch.tensor(groups.sizes, dtype=torch.float64)
        self.dense_macs = float(self.macs_form(dense))
        self.dense_params = float(self.params_form(dense))

    def _counts(self, keep: Sequence[torch.Tensor]) -> torch.Tensor:
        check_masks(self.groups, keep)
        return torch.stack([k.to(torch.float64).sum() for k in keep])

    def macs(self, keep: Sequence[torch.Tensor]) -> torch.Tensor:
        """(Expected) MACs for keep vectors in [0, 1] (hard masks or probabilities); differentiable."""
        return self.macs_form(self._counts(keep))

    def params(self, keep: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.params_form(self._counts(keep))


def _factors(parts: Parts, one: int) -> list[tuple[int, int]]:
    """A tensor's channel count as ``(index into ext, multiplier)`` terms: a group's kept count per
    group part, the fixed channels as ``(one, count)``."""
    return [(one, n) if g is None else (g, 1) for g, n in parts]


def _fixed(factors: list[tuple[int, int]], one: int) -> int | None:
    """The channel count if no part is a group, else None."""
    return sum(c for _, c in factors) if all(i == one for i, _ in factors) else None


def _macs_terms(module, name, fin, fout, in_shape, out_shape, one) -> list[tuple]:
    """``(coef, a, b)`` MACs terms of one layer call, as ``tp.utils.count_ops_and_params`` counts."""
    hw_in, hw_out = math.prod(in_shape[2:]), math.prod(out_shape[2:])
    per_out = [(c, b, one) for b, c in fout]  # one term per out-channel part: coef · n_b
    if isinstance(module, _ConvNd):
        k = math.prod(module.kernel_size)
        if module.groups == 1:
            terms = [(k * hw_out * ca * cb, a, b) for a, ca in fin for b, cb in fout]
        elif module.groups == module.in_channels == module.out_channels:  # depthwise: in == out group
            terms = [(k * hw_out * c, b, o) for c, b, o in per_out]
        else:
            terms = [(k * hw_out * _grouped(module, name, fin, fout, one), one, one)]
        bias = [(hw_out * c, b, o) for c, b, o in per_out] if module.bias is not None else []
        return terms + bias
    if isinstance(module, nn.Linear):
        rows = math.prod(in_shape[1:-1])  # 1 for [B, features]
        terms = [(rows * ca * cb, a, b) for a, ca in fin for b, cb in fout]
        return terms + ([(rows * c, b, o) for c, b, o in per_out] if module.bias is not None else [])
    if isinstance(module, _BatchNorm):
        return [((2 if module.affine else 1) * hw_out * c, b, o) for c, b, o in per_out]
    if isinstance(module, _ACTIVATIONS):
        return [(hw_out * c, b, o) for c, b, o in per_out]
    if isinstance(module, _POOLS):
        return [(hw_in * c, a, one) for a, c in fin]
    return []


def _grouped(module, name, fin, fout, one) -> float:
    """in/groups · out of a grouped conv, whose channels discovery keeps whole (groups.py)."""
    cin, cout = _fixed(fin, one), _fixed(fout, one)
    if cin is None or cout is None:
        raise StampError(f"{name}: a grouped convolution's channels are in a pruned group")
    return cin / module.groups * cout


def _param_terms(module, name, fin, fout, one) -> list[tuple]:
    """``(coef, a, b)`` parameter-count terms of one layer."""
    per_out = [(c, b, one) for b, c in fout]
    bias = per_out if getattr(module, "bias", None) is not None else []
    if isinstance(module, _ConvNd):
        k = math.prod(module.kernel_size)
        if module.groups == 1:
            return [(k * ca * cb, a, b) for a, ca in fin for b, cb in fout] + bias
        if module.groups == module.in_channels == module.out_channels:  # depthwise
            return [(k * c, b, o) for c, b, o in per_out] + bias
        return [(k * _grouped(module, name, fin, fout, one), one, one)] + bias
    if isinstance(module, nn.Linear):
        return [(ca * cb, a, b) for a, ca in fin for b, cb in fout] + bias
    if isinstance(module, _BatchNorm):
        return [(2 * c, b, o) for c, b, o in per_out] if module.affine else []
    n = sum(p.numel() for p in module.parameters(recurse=False))
    if n and (_fixed(fin, one) is None or _fixed(fout, one) is None):
        raise StampError(f"{name}: cannot count the parameters of a pruned {type(module).__name__} layer")
    return [(float(n), one, one)] if n else []


@torch.no_grad()
def _trace_shapes(model: nn.Module, input_size: Sequence[int]) -> list[tuple]:
    """``(name, module, input shape, output shape)`` of every leaf-module call, batch 1, eval mode."""
    calls: list[tuple] = []
    hooks = [m.register_forward_hook(
        lambda mod, i, o, n=n: calls.append((n, mod, tuple(i[0].shape) if i else (), tuple(o.shape))))
        for n, m in model.named_modules() if next(m.children(), None) is None]
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()  # BN in training mode rejects a 1×1 map of a single sample
        model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return calls
