"""Channel groups: the prunable units of a backbone, found by Torch-Pruning's dependency graph.

A group is a set of channels that must be removed together: a conv's out-channels, its BN, and
every layer coupled to them through residual adds. Besides the groups, discovery records for every
leaf-module call which group (if any) sets the channel count of its input and of its output; the
cost model and the masked forward are built from that record.

Everything is stored by qualified module name, so one ``ChannelGroups`` serves the model, its deep
copies and a freshly built model of the same architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import StampError


@dataclass
class Group:
    index: int
    name: str  # the first out-member in forward order, e.g. "layer1.0.conv1"
    channels: int
    out_members: list[str]  # modules whose OUT channels are this group (convs, BNs)
    in_members: list[str]  # modules whose IN channels are this group (next convs, the head)
    mask_points: list[str]  # out-members after whose output the mask is applied (see masking.py)


@dataclass
class LayerCall:
    """One call of a leaf module in the forward pass (a module called twice appears twice)."""

    name: str
    in_group: int | None  # None: the channel count is fixed (the image, or not a channel tensor)
    out_group: int | None


@dataclass
class ChannelGroups:
    groups: list[Group]
    calls: list[LayerCall]
    input_shape: tuple[int, ...] = ()  # the example input, batch dim included

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def __getitem__(self, i: int) -> Group:
        return self.groups[i]

    @property
    def sizes(self) -> list[int]:
        return [g.channels for g in self.groups]


def _is_leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def build_graph(model: nn.Module, example_input: torch.Tensor, record: list | None = None) -> tp.DependencyGraph:
    """Trace ``model`` into a Torch-Pruning dependency graph (training mode is restored after).

    With ``record``, each leaf-module call is appended as ``(name, input grad_fn, output grad_fn)``
    from the same forward pass the graph is traced from, so the grad_fns match the graph's nodes.
    """
    names = {m: n for n, m in model.named_modules()}

    def forward(m: nn.Module, x: torch.Tensor):
        def hook(mod, inputs, output):
            i, o = _first_tensor(inputs), _first_tensor(output)
            record.append((names[mod], getattr(i, "grad_fn", None), getattr(o, "grad_fn", None)))

        hooks = [] if record is None else [
            mod.register_forward_hook(hook) for mod in m.modules() if _is_leaf(mod)]
        try:
            return m(x)
        finally:
            for h in hooks:
                h.remove()

    was_training = model.training
    # The graph is read from autograd, so a frozen model (requires_grad=False) would trace empty.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_input, forward_fn=forward, verbose=False)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def discover_groups(model: nn.Module, example_input: torch.Tensor) -> ChannelGroups:
    """Find the prunable channel groups of ``model`` (any model Torch-Pruning can trace)."""
    record: list = []
    dg = build_graph(model, example_input, record)
    head = getattr(model, "fc", None)  # the classifier: its out-features are never pruned
    call_order = {}
    for i, (name, _, _) in enumerate(record):
        call_order.setdefault(name, i)
    names = {m: n for n, m in model.named_modules()}

    raw = []  # (out-members, in-members, grad_fns carrying the group's channels, size)
    for tp_group in dg.get_all_groups(ignored_layers=[head] if head is not None else [],
                                      root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        outs, ins, grad_fns = [], [], []
        for dep, _ in tp_group:
            node, pruner = dep.target, dg.get_pruner_of_module(dep.target.module)
            if dep.handler == pruner.prune_out_channels:
                # the node's output tensor holds this group's channels
                grad_fns.append(node.grad_fn)
                if node.module in names:
                    outs.append(names[node.module])
            elif node.module in names:
                ins.append(names[node.module])
        size = len(tp_group[0].idxs)
        raw.append((outs, ins, grad_fns, size))

    def forward_pos(name: str) -> int:
        return call_order.get(name, len(record))

    raw.sort(key=lambda r: min(forward_pos(n) for n in r[0]))
    grad_fn_group: dict = {}
    for gi, (_, _, grad_fns, _) in enumerate(raw):
        for fn in grad_fns:
            if grad_fn_group.setdefault(fn, gi) != gi:
                # a tensor holding channels of two groups (torch.cat, split …): not supported here
                raise StampError(f"{type(model).__name__}: a tensor mixes channels of several groups "
                                 "(concat/split); this pruning code supports only channel-aligned graphs")

    calls = [LayerCall(n, grad_fn_group.get(i), grad_fn_group.get(o)) for n, i, o in record]
    groups = []
    for gi, (outs, ins, _, size) in enumerate(raw):
        outs = sorted(set(outs), key=forward_pos)
        groups.append(Group(index=gi, name=outs[0], channels=size, out_members=outs,
                            in_members=sorted(set(ins), key=forward_pos),
                            mask_points=_mask_points(outs, record)))
    return ChannelGroups(groups, calls, tuple(example_input.shape))


def _mask_points(out_members: list[str], record: list) -> list[str]:
    """Out-members whose output is not fed straight into another out-member of the same group.

    Masking a conv's output *and* its BN's would scale the channel twice and a BN shift would revive
    a channel zeroed before it; masking after the last per-channel layer (conv → BN → mask) makes a
    hard mask equal the physically pruned network.
    """
    members = set(out_members)
    fed_into_member = {i for n, i, _ in record if n in members}
    return list(dict.fromkeys(n for n, _, o in record if n in members and o not in fed_into_member))
