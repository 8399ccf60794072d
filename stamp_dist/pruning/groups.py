"""Channel groups: the prunable units of a backbone, found by Torch-Pruning's dependency graph.

A group is a set of channels that must be removed together: a conv's out-channels, its BN, and
every layer coupled to them through residual adds (and, for a depthwise conv, its in-channels).
Besides the groups, discovery records for every leaf-module call which groups make up the channels
of its input and of its output (several for a ``torch.cat`` of branches); the cost model and the
masked forward are built from that record.

Grouped convolutions other than depthwise are kept whole: the channels they read and write form no
group (pruning them would have to keep every conv group equally wide). What the graph cannot follow
(a layer that does not run on the example, channels that ``split``/slicing/reshapes rearrange) is a
``StampError`` naming the layer.

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


# The channels of one tensor in order, as runs (group index, or None for fixed channels, count):
# ((3, 16),) is group 3's 16 channels; ((0, 8), (1, 8)) a concatenation of groups 0 and 1.
Parts = tuple[tuple[int | None, int], ...]


@dataclass
class LayerCall:
    """One call of a leaf module in the forward pass (a module called twice appears twice)."""

    name: str
    inputs: Parts  # fixed: the image, or a tensor whose channels are never pruned
    outputs: Parts


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


def _channels(module: nn.Module, x) -> int:
    """The channel count of a layer's tensor: dim 1 of conv maps and ``[B, F]``, the last dim for a Linear."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return 1
    return x.shape[-1] if isinstance(module, nn.Linear) else x.shape[1]


def _is_grouped(m: nn.Module) -> bool:
    """A grouped conv other than depthwise (groups == in == out, which Torch-Pruning prunes in and out together)."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not (
        m.groups == m.in_channels == m.out_channels)


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def build_graph(model: nn.Module, example_input: torch.Tensor, record: list | None = None) -> tp.DependencyGraph:
    """Trace ``model`` into a Torch-Pruning dependency graph (training mode is restored after).

    With ``record``, each leaf-module call is appended as ``(name, input grad_fn, output grad_fn,
    input channels, output channels)`` from the same forward pass the graph is traced from, so the
    grad_fns match the graph's nodes. Raises StampError if Torch-Pruning cannot trace the model.
    """
    names = {m: n for n, m in model.named_modules()}

    def forward(m: nn.Module, x: torch.Tensor):
        def hook(mod, inputs, output):
            i, o = _first_tensor(inputs), _first_tensor(output)
            record.append((names[mod], getattr(i, "grad_fn", None), getattr(o, "grad_fn", None),
                           _channels(mod, i), _channels(mod, o)))

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
    except StampError:
        raise
    except Exception as e:  # the forward itself, or an op Torch-Pruning's tracer does not know
        raise StampError(f"{type(model).__name__}: Torch-Pruning cannot trace it on a {list(example_input.shape)} "
                         f"batch ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "see README 'Bring your own network' for what a network must satisfy") from None
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def discover_groups(model: nn.Module, example_input: torch.Tensor) -> ChannelGroups:
    """Find the prunable channel groups of ``model`` (any model Torch-Pruning can trace; module docstring)."""
    record: list = []
    dg = build_graph(model, example_input, record)
    head = getattr(model, "fc", None)  # the classifier: its out-features are never pruned
    call_order = {}
    for i, (name, *_) in enumerate(record):
        call_order.setdefault(name, i)
    names = {m: n for n, m in model.named_modules()}
    _check_every_layer_runs(model, call_order, example_input)

    raw = []  # (out-members, in-members, {grad_fn: channel indices of this group in its tensor}, size)
    for tp_group in dg.get_all_groups(ignored_layers=[head] if head is not None else [],
                                      root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        if any(_is_grouped(dep.target.module) for dep, _ in tp_group):
            continue  # kept whole (module docstring)
        outs, ins, tensors = [], [], {}
        for dep, idxs in tp_group:
            node, pruner = dep.target, dg.get_pruner_of_module(dep.target.module)
            if dep.handler == pruner.prune_out_channels:
                # the node's output tensor holds this group's channels, at idxs (a concat's offsets)
                tensors.setdefault(node.grad_fn, set()).update(int(i) for i in idxs)
                if node.module in names:
                    outs.append(names[node.module])
            elif node.module in names:
                ins.append(names[node.module])
        raw.append((outs, ins, tensors, len(tp_group[0].idxs)))

    def forward_pos(name: str) -> int:
        return call_order.get(name, len(record))

    raw.sort(key=lambda r: min(forward_pos(n) for n in r[0]))
    owner: dict = {}  # grad_fn → {channel index: group}
    for gi, (_, _, tensors, _) in enumerate(raw):
        for fn, idxs in tensors.items():
            channel_group = owner.setdefault(fn, {})
            for i in idxs:
                if channel_group.setdefault(i, gi) != gi:
                    raise StampError(f"{type(model).__name__}: a tensor's channel {i} belongs to two channel groups "
                                     "of the dependency graph; this network cannot be pruned here")

    def parts(layer: str, fn, channels: int) -> Parts:
        channel_group = owner.get(fn, {})
        if channel_group and max(channel_group) >= channels:
            raise StampError(f"{type(model).__name__}: layer {layer!r} sees {channels} channels where the dependency "
                             "graph tracks more: an op before it rearranges channels in a way Torch-Pruning does not "
                             "follow (split/chunk, slicing, a reshape of the channel dim); build that part from "
                             "layers, or keep it out of the network")
        runs: list[list] = []
        for c in range(channels):
            g = channel_group.get(c)
            if runs and runs[-1][0] == g:
                runs[-1][1] += 1
            else:
                runs.append([g, 1])
        for g in {g for g, _ in runs if g is not None}:
            if sum(n for h, n in runs if h == g) % raw[g][3]:  # a tensor carries all of a group's channels
                raise StampError(f"{type(model).__name__}: layer {layer!r} sees part of a channel group: an op before "
                                 "it selects channels in a way Torch-Pruning does not follow (slicing, split/chunk, a "
                                 "reshape of the channel dim?); build that part from layers, or keep it out of the network")
        return tuple((g, n) for g, n in runs)

    calls = [LayerCall(n, parts(n, i, ci), parts(n, o, co)) for n, i, o, ci, co in record]
    groups = []
    for gi, (outs, ins, _, size) in enumerate(raw):
        outs = sorted(set(outs), key=forward_pos)
        groups.append(Group(index=gi, name=outs[0], channels=size, out_members=outs,
                            in_members=sorted(set(ins), key=forward_pos),
                            mask_points=_mask_points(outs, record)))
    return ChannelGroups(groups, calls, tuple(example_input.shape))


def _check_every_layer_runs(model: nn.Module, call_order: dict, example_input: torch.Tensor) -> None:
    """A layer with weights that the example forward never calls is invisible to the graph, so
    pruning would not adapt it (data-dependent control flow, or a layer the network does not use)."""
    for name, m in model.named_modules():
        if _is_leaf(m) and name not in call_order and any(True for _ in m.parameters(recurse=False)):
            raise StampError(f"{type(model).__name__}: layer {name!r} does not run on a {list(example_input.shape)} "
                             "batch, so the dependency graph cannot see it (data-dependent control flow, or an unused "
                             "layer?); every layer with weights must run on every input: remove it or make the forward "
                             "the same for all inputs")


def _mask_points(out_members: list[str], record: list) -> list[str]:
    """Out-members whose output is not fed straight into another out-member of the same group.

    Masking a conv's output *and* its BN's would scale the channel twice and a BN shift would revive
    a channel zeroed before it; masking after the last per-channel layer (conv → BN → mask) makes a
    hard mask equal the physically pruned network.
    """
    members = set(out_members)
    fed_into_member = {i for n, i, *_ in record if n in members}
    return list(dict.fromkeys(n for n, _, o, *_ in record if n in members and o not in fed_into_member))
