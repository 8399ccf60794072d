"""Baseline channel selections: hard masks at the same MACs budget, pruned through the same surgery path.

Every score-based baseline gives one score per channel of every group (higher = keep) and turns the
scores into masks with :func:`uniform_ratio_masks`, i.e. the same fraction of channels is kept in
every group. Why the same fraction everywhere: raw scores are not comparable across groups (a
residual group has many more member layers than a plain one, so its summed scores are larger; weight
magnitudes follow each layer's initialisation scale), so a global threshold would mostly measure
layer size. The uniform rule uses a score only for what it is good at, ranking the channels within a
group, and the baselines then differ only in *which* channels they keep, not in how the budget is
spread over layers. (The cost: SNIP / GraSP / SynFlow lose the layer-wise allocation that their
papers' global thresholds give.)

Entry point: ``baseline_masks(method, model, groups, cost, budget, images, labels, seed)``; the
per-channel scores alone: ``baseline_scores``. ``SCORES`` is this layer's part of the method registry
(``stamp_dist/methods.py`` wraps each entry as a pruning method). The two baselines that train on the
target first live elsewhere: "learn gates on the target" in ``gates.py``, and "train then prune" (``l1``
below applied to the dense model after fine-tuning it on the target) in ``stamp_dist/methods.py``. Methods:

* ``random``: uniform random scores from ``seed``.
* ``l1`` (Li et al. 2017): for each out-member conv/linear ``m`` of the group, ``n_m[c] = Σ|W_m[c]|``
  (the L1 norm of the filter writing channel ``c``), divided by its mean over the group's channels
  ``mean_c n_m[c]``; the channel score is the sum of these normalised norms over the out-member
  convs. The division gives each conv coupled into a residual group an equal vote whatever its
  weight scale. BNs and the reading layers are not used (the classic filter-norm criterion).
* ``snip`` (Lee et al. 2019): per weight ``|θ ⊙ ∂L/∂θ|``.
* ``grasp`` (Wang et al. 2020): per weight the paper's score is ``S = -θ ⊙ Hg`` (``g = ∂L/∂θ``,
  ``H`` the Hessian of ``L``, ``Hg`` by double backprop) and GraSP *removes* the weights with the
  highest ``S`` (removing them least reduces the gradient flow), so the keep-score used here is
  ``-S = θ ⊙ Hg`` (signed; summed with signs). No softmax temperature is applied.
* ``synflow`` (Tanaka et al. 2020): data-independent. All parameters and float buffers replaced by
  their absolute values (float64, on copies, the model is untouched), eval mode, input all ones of
  one image's shape, ``R = Σ f(1)``; per weight ``|θ ⊙ ∂R/∂θ| / R`` (single shot). Dividing by ``R``
  keeps the numbers finite in float32 without changing any ranking (by SynFlow's conservation law a
  bias-free layer's scores then sum to 1).
* ``taylor`` / ``magnitude``: Torch-Pruning's ``GroupTaylorImportance`` / ``GroupMagnitudeImportance``
  (default settings: mean over the group's layers, mean-normalised) evaluated on Torch-Pruning's
  group rooted at our group's first out-member; Taylor reads ``∂L/∂θ`` from the batch.

``L`` is the cross-entropy of ``model(images)`` against ``labels`` on the whole given batch, computed
in **eval mode** (BN uses the pretrained running statistics): a few-shot batch would give noisy batch
statistics, and nothing in the model is changed (no running-stat updates, parameters, ``.grad``,
``requires_grad`` and the train/eval flag are as before).

Aggregation of per-weight scores (snip, grasp, synflow) to channels: for group ``g`` and channel
``c``, ``score[c] = Σ_{out-members m} Σ_{p ∈ params(m)} Σ_{i: p_i writes c} s(p_i)
+ Σ_{in-members m} Σ_{i: W_m,i reads c} s(W_m,i)``, i.e. over the out-member convs / BNs / linears
all of their parameter entries on output channel ``c`` (conv filter ``W[c]``, bias ``b[c]``, BN
``γ[c]``, ``β[c]``), plus over the in-member convs / linears the weight entries reading channel
``c`` (``W[:, c]``, the head's column ``c``; for a linear reading a flattened ``[C, H, W]`` map the
block of columns of ``c``). No per-member normalisation: these per-weight scores are additive
saliencies in one unit (first-order loss change, gradient-flow change, synaptic flow), so the plain
sum is the method's own estimate for removing every weight of the channel at once; a member with
more weights per channel counts more because removing the channel removes more weights there. Scale
differences between groups do not matter, as only the ranking within a group is used. Ties are
broken by channel index (stable sort), so every method but ``random`` ignores ``seed``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

from ..choices import Method
from ..errors import StampError
from .groups import ChannelGroups, Group, Parts, build_graph
from .hardmask import check_budget, uniform_ratio_masks
from .macs import CostModel

def dense_masks(groups: ChannelGroups) -> list[torch.Tensor]:
    """Keep every channel (the dense fine-tuning reference)."""
    return [torch.ones(g.channels, dtype=torch.bool) for g in groups]


def random_masks(groups: ChannelGroups, cost: CostModel, budget: float, seed: int) -> list[torch.Tensor]:
    """Uniformly random channels, the same fraction in every group."""
    return uniform_ratio_masks(random_scores(groups, seed), cost, budget)


def baseline_masks(method: str, model: nn.Module, groups: ChannelGroups, cost: CostModel, budget: float,
                   images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Hard keep masks (bool ``[C_g]`` per group) of baseline ``method`` at MACs ratio ``budget``.

    ``images``: normalised target images ``[B, 3, H, W]``; ``labels``: their classes ``0..N-1`` for the
    model's head ``fc`` (already sized for the target). See the module docstring for each method."""
    check_budget(budget)
    return uniform_ratio_masks(baseline_scores(method, model, groups, images, labels, seed), cost, budget)


def baseline_scores(method: str, model: nn.Module, groups: ChannelGroups, images: torch.Tensor,
                    labels: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Per-group channel scores (float ``[C_g]``, higher = more important) of baseline ``method``."""
    if method not in SCORES:
        raise StampError(f"unknown baseline {method!r}; choose one of {', '.join(SCORES)}")
    return SCORES[method].scores(model, groups, images, labels, seed)


# --- per-channel criteria ----------------------------------------------------------------------


def random_scores(groups: ChannelGroups, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(g.channels, generator=gen) for g in groups]


@torch.no_grad()
def l1_scores(model: nn.Module, groups: ChannelGroups) -> list[torch.Tensor]:
    """Sum over the out-member convs of each filter's L1 norm divided by that conv's mean filter norm."""
    out = []
    for g in groups:
        score = torch.zeros(g.channels, dtype=torch.float64)
        for name in g.out_members:
            m = model.get_submodule(name)
            if isinstance(m, (_ConvNd, nn.Linear)):
                norms = _per_channel(m.weight.abs(), 0).double().cpu()
                score += norms / norms.mean().clamp_min(1e-30)  # an all-zero conv adds nothing
        out.append(score.float())
    return out


def tp_scores(model: nn.Module, groups: ChannelGroups, importance: tp.importance.Importance,
              images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """A Torch-Pruning importance on each of our groups (Taylor criteria read ``.grad``, set from the
    batch's loss gradient for the duration and restored after)."""
    p = next(model.parameters())
    dg = build_graph(model, torch.zeros(groups.input_shape, device=p.device, dtype=p.dtype))
    grads = loss_grads(model, images, labels) if isinstance(importance, tp.importance.GroupTaylorImportance) else {}
    with _grads_set(model, grads):
        return [importance(_tp_group(dg, model, g)).detach().float().cpu() for g in groups]


def _tp_group(dg: tp.DependencyGraph, model: nn.Module, group: Group):
    """Torch-Pruning's group for all channels of ``group``, numbered as ours (root = our first member)."""
    root = model.get_submodule(group.name)
    return dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels,
                                list(range(group.channels)))




# --- per-weight criteria (dict: parameter name → score of the parameter's shape) -------------------


def snip_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity ``|θ ⊙ ∂L/∂θ|``."""
    grads = loss_grads(model, images, labels)
    return {n: (p.detach() * grads[n]).abs() for n, p in model.named_parameters()}


def grasp_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """GraSP keep-score ``θ ⊙ Hg`` (= minus the paper's removal score ``-θ ⊙ Hg``)."""
    with _eval(model):
        params = _leaf_copies(model)
        grads = torch.autograd.grad(_loss(model, params, images, labels), list(params.values()), create_graph=True)
        # Hg = ∂/∂θ (g(θ) · stop_grad(g)): a Hessian-vector product with the gradient held fixed
        gdotg = sum((g * g.detach()).sum() for g in grads)
        hg = torch.autograd.grad(gdotg, list(params.values()))
    return {n: p.detach() * h for (n, p), h in zip(params.items(), hg)}


def synflow_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """SynFlow ``|θ ⊙ ∂R/∂θ| / R`` with ``R = Σ f_|θ|(1)``; only the shape of ``images`` is used."""
    state = {n: t.detach().double().abs() for n, t in model.state_dict(keep_vars=True).items()
             if t.is_floating_point()}  # buffers too: BN running stats enter the eval-mode forward
    params = {n: state[n].requires_grad_() for n, _ in model.named_parameters()}
    ones = torch.ones(1, *images.shape[1:], dtype=torch.float64, device=next(iter(state.values())).device)
    with _eval(model):
        r = functional_call(model, state, (ones,)).sum()
        grads = torch.autograd.grad(r, list(params.values()))
    return {n: (p.detach() * g).abs() / r.detach() for (n, p), g in zip(params.items(), grads)}




def aggregate_scores(model: nn.Module, groups: ChannelGroups, weight_scores: dict[str, torch.Tensor]
                     ) -> list[torch.Tensor]:
    """Per-weight scores → per-channel scores by the rule in the module docstring."""
    inputs: dict[str, Parts] = {}
    for call in groups.calls:
        inputs.setdefault(call.name, call.inputs)
    out = []
    for g in groups:
        score = torch.zeros(g.channels, dtype=torch.float64)
        for name in g.out_members:  # every parameter entry writing channel c
            for pname, _ in model.get_submodule(name).named_parameters(recurse=False):
                score += _per_channel(weight_scores[f"{name}.{pname}"], 0).double().cpu()
        for name in g.in_members:  # every weight entry reading channel c
            score += _read_by(g, inputs[name], _per_channel(weight_scores[f"{name}.weight"], 1)).double().cpu()
        out.append(score.float())
    return out


def _read_by(group: Group, parts: Parts, per_input: torch.Tensor) -> torch.Tensor:
    """The entries of a layer's per-input-channel scores that read ``group``: its run(s) in the layer's input
    (a concatenation holds several groups side by side). A linear reading a flattened ``[C, H, W]`` map has
    ``H·W`` entries per channel, in c-major blocks."""
    total = sum(n for _, n in parts)
    if len(per_input) != total:
        if len(per_input) % total:
            raise StampError(f"a layer reads {len(per_input)} input entries from {total} channels; grouped "
                             "convolutions other than depthwise are not supported")
        per_input = per_input.view(total, -1).sum(1)
    runs, start = [], 0
    for index, n in parts:
        if index == group.index:
            runs.append(per_input[start:start + n])
        start += n
    return torch.cat(runs)


def _per_channel(score: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum a parameter-shaped score over every axis but ``dim`` (0: out-channels, 1: in-channels)."""
    if score.dim() == 1:  # biases, BN affine parameters
        return score.detach()
    return score.detach().transpose(0, dim).reshape(score.shape[dim], -1).sum(1)


# --- the registry --------------------------------------------------------------------------------------------

ChannelScores = Callable[[nn.Module, ChannelGroups, torch.Tensor, torch.Tensor, int], list[torch.Tensor]]


@dataclass(frozen=True)
class Score:
    """A score-based method: ``scores(model, groups, images, labels, seed)`` → one score per channel."""

    scores: ChannelScores
    reads_loss: bool = False  # reads the target's loss, so it scores the backbone with a head for the target
    chance: bool = False  # ignores network and data (random channels: the floor an informed method must beat)


def _per_weight(scores: Callable[..., dict[str, torch.Tensor]]) -> ChannelScores:
    return lambda model, groups, images, labels, seed: aggregate_scores(model, groups, scores(model, images, labels))


def _importance(importance: Callable[[], tp.importance.Importance]) -> ChannelScores:
    return lambda model, groups, images, labels, seed: tp_scores(model, groups, importance(), images, labels)


SCORES: dict[Method, Score] = {
    Method.RANDOM: Score(lambda model, groups, images, labels, seed: random_scores(groups, seed), chance=True),
    Method.L1: Score(lambda model, groups, images, labels, seed: l1_scores(model, groups)),
    Method.SNIP: Score(_per_weight(snip_scores), reads_loss=True),
    Method.GRASP: Score(_per_weight(grasp_scores), reads_loss=True),
    Method.SYNFLOW: Score(_per_weight(synflow_scores)),
    Method.TAYLOR: Score(_importance(tp.importance.GroupTaylorImportance), reads_loss=True),
    Method.MAGNITUDE: Score(_importance(tp.importance.GroupMagnitudeImportance)),
}


# --- helpers: gradients without side effects ---------------------------------------------------------


def loss_grads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``∂L/∂θ`` of the eval-mode cross-entropy on the batch, without touching the model's ``.grad``."""
    with _eval(model):
        params = _leaf_copies(model)
        grads = torch.autograd.grad(_loss(model, params, images, labels), list(params.values()))
    return dict(zip(params, grads))


def _leaf_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    # Copies that require grad, so a frozen backbone is scored too and its flags stay as they are.
    return {n: p.detach().requires_grad_() for n, p in model.named_parameters()}


def _loss(model: nn.Module, params: dict, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    p = next(iter(params.values()))
    logits = functional_call(model, params, (images.to(device=p.device, dtype=p.dtype),))
    return F.cross_entropy(logits, labels.to(p.device).long())


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _grads_set(model: nn.Module, grads: dict[str, torch.Tensor]):
    """Temporarily give the named parameters these ``.grad`` values (for Torch-Pruning's Taylor)."""
    params = dict(model.named_parameters())
    saved = {n: params[n].grad for n in grads}
    try:
        for n, g in grads.items():
            params[n].grad = g
        yield
    finally:
        for n, g in saved.items():
            params[n].grad = g
