"""Find the small-stem change from the traced graph, for any family: the first strided conv with every strided layer
of the branches beside it, and the first pooling the whole stream passes through before the next strided layer (the
stem's max-pool); for a stem that downsamples by pooling alone (VGG), that pooling."""
from __future__ import annotations

from torch import nn

from clcli.models import StemChange

from ._graph import Graph
from ._taps import cut_points

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _stride(m: nn.Module) -> int:
    s = getattr(m, "stride", 1)
    s = s if isinstance(s, (tuple, list)) else (s, s)
    return max(int(x) for x in s) if s else 1


def _strided(m: nn.Module | None, kinds: tuple) -> bool:
    return isinstance(m, kinds) and _stride(m) > 1


def _input_size(nodes, i: int) -> tuple[int, ...] | None:
    shapes = [nodes[j].shape for j in nodes[i].inputs if nodes[j].shape is not None]
    return tuple(shapes[0][-2:]) if shapes else None


def find_small_stem(model: nn.Module, graph: Graph) -> StemChange:
    modules = dict(model.named_modules())
    nodes = graph.nodes
    change = StemChange()
    # only where the whole stream passes: a pooling beside a strided conv (DLA's and Xception's downsampled
    # shortcut, CoAtNet's pooled shortcut) belongs to a block, whose two paths must keep the same stride
    cuts = cut_points(nodes, features_only=True)
    first = next((i for i, n in enumerate(nodes) if n.op == "call_module"
                  and _strided(modules.get(n.target), nn.Conv2d)), None)
    first_pool = next((i for i in cuts if nodes[i].op == "call_module"
                       and _strided(modules.get(nodes[i].target), _POOLS)), None)
    if first_pool is not None and (first is None or first_pool < first):
        change.pool = nodes[first_pool].target  # a stem that downsamples by pooling alone (VGG)
        return change
    if first is None:
        return change
    change.conv = nodes[first].target
    # Branches beside the first strided conv (RepVGG / MobileOne stems, a block's strided shortcut) run until the
    # next cut point, where they merge: every strided layer among them changes with it, so that they still add up.
    # A branch reads a map of the first conv's input size; later downsamplings before the merge are the body's.
    merge = first if first in cuts else next((j for j in cuts if j > first), len(nodes))
    size = _input_size(nodes, first)
    for n in nodes[first + 1:merge]:
        if n.op == "call_module" and _strided(modules.get(n.target), (nn.Conv2d, *_POOLS)) \
                and _input_size(nodes, nodes.index(n)) == size and n.target not in change.convs:
            change.branches.append(n.target)
    for i in range(merge + 1, len(nodes)):
        n = nodes[i]
        if n.op != "call_module":
            continue
        m = modules.get(n.target)
        if _strided(m, _POOLS) and i in cuts:
            change.pool = n.target
            break
        if _strided(m, (nn.Conv2d, *_POOLS)):
            break  # past the stem: the next downsampling belongs to the body
    return change
