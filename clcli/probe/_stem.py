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


def _layer(n, modules: dict) -> tuple[str | None, nn.Module | None]:
    """(path, module) of the layer a node runs: its module, or for a conv or pooling function the module whose scope
    it runs in (a timm conv the tracer enters, as NFNet's ScaledStdConv2d or Conv2dSame calling F.conv2d)."""
    if n.op == "call_module":
        return n.target, modules.get(n.target)
    if n.op == "call_function" and n.scope and ("conv" in n.target or "pool" in n.target):
        return n.scope[-1], modules.get(n.scope[-1])
    return None, None


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
    layers = [_layer(n, modules) for n in nodes]
    first = next((i for i, (_, m) in enumerate(layers) if _strided(m, nn.Conv2d)), None)
    first_pool = next((i for i in cuts if _strided(layers[i][1], _POOLS)), None)
    if first_pool is not None and (first is None or first_pool < first):
        change.pool = layers[first_pool][0]  # a stem that downsamples by pooling alone (VGG)
        return change
    if first is None:
        return change
    change.conv = layers[first][0]
    # Branches beside the first strided conv (RepVGG / MobileOne stems, a block's strided shortcut) run until the
    # next cut point, where they merge: every strided layer among them changes with it, so that they still add up.
    # A branch reads a map of the first conv's input size; later downsamplings before the merge are the body's.
    merge = first if first in cuts else next((j for j in cuts if j > first), len(nodes))
    size = _input_size(nodes, first)
    for i in range(first + 1, merge):
        path, m = layers[i]
        if _strided(m, (nn.Conv2d, *_POOLS)) and _input_size(nodes, i) == size and path not in change.convs:
            change.branches.append(path)
    for i in range(merge + 1, len(nodes)):
        path, m = layers[i]
        if _strided(m, _POOLS) and i in cuts:
            change.pool = path
            break
        if _strided(m, (nn.Conv2d, *_POOLS)):
            break  # past the stem: the next downsampling belongs to the body
    return change
